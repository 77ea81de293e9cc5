"""Feeding data to a model: the one place that turns "a model and some data" into forward calls.

``profile`` and every measurement share it, so text sources, padding masks, example numbers
and model-input dicts behave the same everywhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from .errors import DataError
from .models import Model, load, wrap


def as_model(model: Any, device: str | None = None) -> Model:
    """A Model from a Model, any ``nn.Module``, a Hugging Face directory, or None (the default)."""
    if isinstance(model, Model):
        return model
    if isinstance(model, torch.nn.Module):
        return wrap(model)
    return load(model, device=device)


@dataclass
class Source:
    """Where batches come from: a tokenized corpus, or the user's own input dicts."""

    batches: Iterable[Any]
    corpus: Any = None
    tokenizer: Any = None


@dataclass(frozen=True)
class Call:
    """One forward call: its keyword arguments (on the model's device), real tokens, and the
    example number of each row (None when the data does not say)."""

    inputs: dict
    tokens: int
    examples: torch.Tensor | None


def source_for(model: Model, data: Any, *, batch_size: int = 8, max_length: int = 128, max_tokens: int | None = None, column: str | None = None) -> Source:
    """Batches for ``data``: text sources are tokenized with the model's tokenizer (right
    padding, truncation); one input dict or an iterable of them is fed as is."""
    from .data import load_corpus, token_batches

    if not is_text_source(data):
        return Source([data] if isinstance(data, Mapping) else data)
    corpus = load_corpus(data, column=column)
    if model.tokenizer is None:
        raise DataError(
            f"{model.name} has no tokenizer, so text data cannot be fed to it; load a model directory "
            "that includes its tokenizer, pass actscope.wrap(module, tokenizer=...), or pass model-input dicts"
        )
    return Source(token_batches(corpus, model.tokenizer, batch_size, max_length, max_tokens), corpus, model.tokenizer)


def is_text_source(data: Any) -> bool:
    from .data import Corpus

    if data is None or isinstance(data, (str, os.PathLike, Corpus)):
        return True
    return isinstance(data, (list, tuple)) and (not data or isinstance(data[0], str))


def calls(model: Model, source: Source) -> Iterator[Call]:
    """The forward calls of a source, inputs moved to the model's device."""
    device = model.device
    for batch in source.batches:
        yield unpack(batch, device)


def unpack(batch: Any, device: torch.device) -> Call:
    from .data import Batch

    if isinstance(batch, Batch):
        return Call({k: v.to(device) for k, v in batch.model_inputs().items()}, batch.n_tokens, batch.doc_ids)
    if isinstance(batch, Mapping):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        mask = inputs.get("attention_mask")
        first = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        count = int(mask.sum()) if isinstance(mask, torch.Tensor) else (first.shape[0] if first is not None else 1)
        return Call(inputs, count, None)
    raise DataError(f"cannot feed a {type(batch).__name__} to the model; pass text data or dicts of model inputs")


def feed(tracer: Any, source: Source, progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Run ``tracer.model`` over ``source`` with the tracer's hooks attached, telling it each
    call's example numbers; return (examples, real tokens)."""
    model = tracer.model
    examples = tokens = 0
    with torch.no_grad(), tracer.attached():
        for call in calls(model, source):
            tracer.next_examples = call.examples
            model(**call.inputs)
            examples += len(call.examples) if call.examples is not None else 1
            tokens += call.tokens
            if progress is not None:
                progress(examples, call.tokens)
    return examples, tokens
