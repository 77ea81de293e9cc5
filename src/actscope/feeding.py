"""Feeding data to a model: the one place that turns (model, data, limits) into checked batches
and forward calls, for profiling, every measurement, calibration and explanation alike.

``data`` is any of:

* a text source: ``None`` (the built-in corpus), a path (text, jsonl, csv, tsv, parquet, a saved
  dataset), a :class:`~actscope.data.Corpus` or a list of strings. Documents are tokenized with
  the model's tokenizer (its default special tokens), truncated to ``max_length`` tokens,
  right-padded into batches of ``batch_size``, and cut after ``max_tokens`` real tokens; each row
  carries its document number, so statistics know which example a token came from and padding
  is excluded through the attention mask. An encoder-decoder model (T5, BART …) gets the same
  tokens shifted right as its decoder's input (:meth:`~actscope.models.Model.with_decoder_inputs`);
* token-id rows (:func:`token_rows`): right-padded the same way, the row number the example;
* model-input dicts, one or an iterable of them (``{"input_ids": …, "attention_mask": …}`` or
  whatever a wrapped module takes), fed as they are; padding is excluded through their
  ``attention_mask`` when they have one;
* image data (:mod:`actscope.data.images`: a folder, an array, a data set of (image, label), a
  saved HF image data set, or :class:`~actscope.data.images.Images`): normalised pixels in
  batches of ``batch_size`` under the model's input name (``pixel_values`` for a Hugging Face
  vision model, else the first argument of the module's ``forward``), image ``i`` being example
  ``i``; ``max_tokens`` caps the number of images.

The limits are checked once, here (:class:`Limits`), with the CLI's flag names in the messages.

Held-out data (:func:`split_held_out`): where a method needs data it was not fitted on (the CETT
search's evaluation set, ``actscope sparsify``'s perplexity report), the last ``HELD_OUT`` share
of the documents is held out, at least one document on each side; every caller takes the share
as an option.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from .errors import DataError, InputError
from .models import Model

HELD_OUT = 0.2


@dataclass(frozen=True)
class Limits:
    """How data is cut into forward calls (see the module docstring)."""

    batch_size: int = 8
    max_length: int = 128
    max_tokens: int | None = None
    column: str | None = None

    def checked(self) -> "Limits":
        for name, flag in (("batch_size", "--batch-size"), ("max_length", "--max-length"), ("max_tokens", "--max-tokens")):
            value = getattr(self, name)
            if value is None and name == "max_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"{flag} must be a whole number, got {value!r}")
            if value < 1:
                raise InputError(f"{flag} must be at least 1, got {value}")
        return self


@dataclass
class Source:
    """Where batches come from: a tokenized corpus, token-id rows, or the user's own input dicts."""

    batches: Iterable[Any]
    corpus: Any = None
    tokenizer: Any = None
    images: Any = None  # the Images fed, when the data are images


@dataclass(frozen=True)
class Call:
    """One forward call: its keyword arguments (on the model's device), real tokens, and the
    example number of each row (None when the data does not say)."""

    inputs: dict
    tokens: int
    examples: torch.Tensor | None


def source_for(model: Model, data: Any, *, batch_size: int = 8, max_length: int = 128, max_tokens: int | None = None,
               column: str | None = None) -> Source:
    """The batches of ``data`` (see the module docstring); a :class:`Source` passes through."""
    from .data import load_corpus, token_batches

    if isinstance(data, Source):
        return data
    limits = Limits(batch_size, max_length, max_tokens, column).checked()
    from .data.images import is_image_data

    if is_image_data(data):
        return image_source(model, images_for(model, data, limit=limits.max_tokens), batch_size=limits.batch_size)
    if not is_text_source(data):
        return Source([data] if isinstance(data, Mapping) else data)
    corpus = load_corpus(data, column=limits.column)
    tokenizer = _tokenizer(model, "text data")
    return Source(token_batches(corpus, tokenizer, limits.batch_size, limits.max_length, limits.max_tokens), corpus, tokenizer)


def token_rows(model: Model, rows: Sequence[Sequence[int]], *, batch_size: int = 8) -> Source:
    """Token-id rows as right-padded batches, row ``r`` being example ``r``."""
    from .data import pad_id
    from .data.batching import Batch, pad_right

    Limits(batch_size=batch_size).checked()
    pad = pad_id(model.tokenizer)

    def batches() -> Iterator[Batch]:
        for start in range(0, len(rows), batch_size):
            input_ids, mask = pad_right(rows[start:start + batch_size], pad)
            yield Batch(input_ids, mask, torch.arange(start, start + len(input_ids)), int(mask.sum()))

    return Source(batches(), tokenizer=model.tokenizer)


def images_for(model: Model, data: Any, *, preprocess: Any = None, limit: int | None = None) -> Any:
    """``data`` read as :class:`~actscope.data.images.Images` for ``model``: its channel count
    and (for a Hugging Face vision model) size, and its directory's preprocessing when it has one."""
    from .data.images import Images, Preprocess, load_images

    if isinstance(data, Images):
        return data
    config = model.config
    chosen = preprocess or Preprocess()
    size = getattr(config, "image_size", None) if chosen.size is None else chosen.size
    size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
    channels = chosen.channels or getattr(config, "num_channels", None) or _first_conv_channels(model.module)
    from dataclasses import replace

    return load_images(data, preprocess=replace(chosen, size=size, channels=channels), model_dir=_model_dir(model), limit=limit)


def image_source(model: Model, images: Any, *, batch_size: int = 8) -> Source:
    """Batches of normalised pixels under the model's input name, image ``i`` being example ``i``."""
    Limits(batch_size=batch_size).checked()
    key = image_key(model)

    def batches() -> Iterator[ImageBatch]:
        for start in range(0, len(images), batch_size):
            pixels = images.normalised(slice(start, start + batch_size))
            yield ImageBatch({key: pixels}, examples=torch.arange(start, start + len(pixels)))

    return Source(batches(), images=images)


class ImageBatch(dict):
    """One call's pixels (a model-input dict) and the numbers of its images."""

    def __init__(self, inputs: dict, *, examples: torch.Tensor) -> None:
        super().__init__(inputs)
        self.examples = examples


def image_key(model: Model) -> str:
    """The keyword a model takes its pixels by: ``pixel_values`` when its forward has it (Hugging
    Face vision models), else the first parameter of its ``forward`` (``input`` for ``nn.Sequential``)."""
    import inspect

    parameters = [p for p in inspect.signature(model.module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = [p.name for p in parameters]
    if "pixel_values" in names:
        return "pixel_values"
    if not names:
        raise InputError(f"{model.name}'s forward takes no named argument, so images cannot be fed to it; wrap it in a module whose forward(x) takes them")
    return names[0]


def _first_conv_channels(module: torch.nn.Module) -> int | None:
    conv = next((m for m in module.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    return int(conv.in_channels) if conv is not None else None


def _model_dir(model: Model) -> str | None:
    source = model.source
    return source if source and os.path.isdir(source) else None


def tokenize(model: Model, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Each text's token ids, as :func:`source_for` would feed them (truncated to ``max_length``);
    a text that tokenizes to nothing is refused, naming it."""
    from .data.batching import effective_max_length

    Limits(max_length=max_length).checked()
    tokenizer = _tokenizer(model, "texts")
    limit = effective_max_length(tokenizer, max_length)
    ids = [list(row)[:limit] for row in tokenizer(list(texts), truncation=True, max_length=limit)["input_ids"]]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise DataError(f"texts[{empty[0]}] = {texts[empty[0]]!r:.60} tokenizes to nothing; drop it or give it some words")
    return ids


def _tokenizer(model: Model, what: str) -> Any:
    if model.tokenizer is None:
        raise DataError(
            f"{model.name} has no tokenizer, so {what} cannot be fed to it; load a model directory "
            "that includes its tokenizer, pass actscope.wrap(module, tokenizer=...), or pass model-input dicts"
        )
    return model.tokenizer


def is_text_source(data: Any) -> bool:
    from .data import Corpus

    if data is None or isinstance(data, (str, os.PathLike, Corpus)):
        return True
    return isinstance(data, (list, tuple)) and (not data or isinstance(data[0], str))


def calls(model: Model, source: Source) -> Iterator[Call]:
    """The forward calls of a source, inputs moved to the model's device (``Model.device``)."""
    device = model.device
    for batch in source.batches:
        yield unpack(batch, device, model)


def unpack(batch: Any, device: torch.device, model: Model) -> Call:
    """One batch as a forward call on ``device``; tokenized text fed to ``model``, an
    encoder-decoder, also gives its decoder the same text (:meth:`Model.with_decoder_inputs`)."""
    from .data import Batch

    if isinstance(batch, Batch):
        inputs = {k: v.to(device) for k, v in batch.model_inputs().items()}
        return Call(model.with_decoder_inputs(inputs), batch.n_tokens, batch.doc_ids)
    if isinstance(batch, ImageBatch):
        return Call({k: v.to(device) for k, v in batch.items()}, len(batch.examples), batch.examples)
    if isinstance(batch, Mapping):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        mask = inputs.get("attention_mask")
        first = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        count = int(mask.sum()) if isinstance(mask, torch.Tensor) else (first.shape[0] if first is not None else 1)
        return Call(inputs, count, None)
    raise DataError(f"cannot feed a {type(batch).__name__} to the model; pass text data or dicts of model inputs")


def input_batches(model: Model, data: Any, **limits: Any) -> Iterator[dict[str, torch.Tensor]]:
    """The keyword arguments of each forward call of ``data``, on the model's device."""
    if data is None:
        raise DataError("no data given; pass a list of strings, a text file, or model-input dicts")
    for call in calls(model, source_for(model, data, **limits)):
        yield call.inputs


def materialised(model: Model, data: Any, *, what: str, **limits: Any) -> list[dict[str, torch.Tensor]]:
    """All batches of ``data`` as a list (data read many times, e.g. for evaluation); refuse no input."""
    batches = list(input_batches(model, data, **limits))
    if not batches:
        raise DataError(f"the {what} data produced no batch (is it empty?); pass some text or model inputs")
    return batches


def real_token_mask(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[batch, pos]`` bool: the attention mask, or all True when the batch has none."""
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.bool()
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        raise DataError("a model-input dict needs input_ids (and preferably attention_mask) for this objective")
    return torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)


Progress = Callable[[int, int], None]  # (examples done, real tokens in this call)


def feed(tracer: Any, data: Any, *, progress: Progress | None = None, **limits: Any) -> tuple[int, int]:
    """Run ``tracer.model`` over ``data`` (or a :class:`Source`) with the tracer's hooks attached,
    telling it each call's example numbers; return (examples, real tokens). No token at all is
    a :class:`DataError`: a statistic of nothing is a mistake, not a result."""
    model = tracer.model
    examples = tokens = 0
    with torch.no_grad(), tracer.attached():
        for call in calls(model, source_for(model, data, **limits)):
            tracer.next_examples = call.examples
            model(**call.inputs)
            examples += len(call.examples) if call.examples is not None else 1
            tokens += call.tokens
            if progress is not None:
                progress(examples, call.tokens)
    if tokens == 0:
        raise DataError("no real token was observed; the data produced no input, or only padding (is it empty?)")
    return examples, tokens


def split_held_out(items: Sequence[Any], share: float = HELD_OUT) -> tuple[list[Any], list[Any]]:
    """``(fitted on, held out)``: the last ``share`` of ``items`` held out, at least one on each side."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise InputError(f"the held-out share must be a fraction between 0 and 1, got {share!r}; e.g. {HELD_OUT}")
    if len(items) < 2:
        raise DataError(f"{len(items)} document given; pass at least 2, since some are held out for evaluation")
    held = min(len(items) - 1, max(1, round(share * len(items))))
    return list(items[:-held]), list(items[-held:])
