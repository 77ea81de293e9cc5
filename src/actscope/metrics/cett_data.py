"""Model-input batches for the CETT search: calibration and evaluation data, one format.

``data`` is what :func:`actscope.profile` takes: a list of strings (tokenized with the model's
tokenizer, right-padded; padding is excluded from every statistic through the attention mask),
any text source (a path, a Corpus), or model-input dicts (one dict or a list of them, e.g.
``{"input_ids": ..., "attention_mask": ...}``).
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from ..errors import DataError


def input_batches(
    model: Any, data: Any, *, batch_size: int = 16, max_length: int = 128, max_tokens: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the keyword arguments of each forward call, on the model's device."""
    from ..feeding import calls, source_for
    from ..profiling import ProfileConfig

    if data is None:
        raise DataError("no data given; pass a list of strings, a text file, or model-input dicts")
    config = ProfileConfig(batch_size=batch_size, max_length=max_length, max_tokens=max_tokens).checked()
    source = source_for(model, data, batch_size=config.batch_size, max_length=config.max_length, max_tokens=config.max_tokens)
    for call in calls(model, source):
        yield call.inputs


def materialised(model: Any, data: Any, *, batch_size: int, max_length: int, what: str) -> list[dict[str, torch.Tensor]]:
    """All batches of ``data`` as a list (evaluation data is read many times); refuse no input."""
    batches = list(input_batches(model, data, batch_size=batch_size, max_length=max_length))
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
