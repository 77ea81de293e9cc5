"""What the MLPs need to know about the current forward call, read by one root pre-hook.

* ``token_mask`` ``[batch, q]``: the real (non-padding) query tokens. Under a KV cache the
  attention mask covers past and present positions, so the present ones are its last ``q``.
* ``prefill``: the call starts a sequence (no cache, or an empty one, as ``generate`` passes).
  CoreInfer chooses its core sets on prefill calls and keeps them for the following ones
  *(our choice: a prefill split over several cached calls counts as decoding after its first
  chunk)*.

An MLP sees its input as ``[batch, q, d]`` or, in OPT, ``[batch·q, d]``: row ``r`` of the
flattened input belongs to example ``r // q``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ..hooks import Hooks


@dataclass(frozen=True)
class CallInfo:
    batch: int
    q: int
    token_mask: torch.Tensor  # [batch, q] bool
    prefill: bool

    def rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(example of each row [n], real-token flag of each row [n])`` for an MLP input of
        ``n`` rows; None when ``n`` is not ``batch · q`` (a call this record does not describe)."""
        return self._rows if n == self.batch * self.q else None

    @cached_property
    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed once per model call, shared by every layer.
        return torch.arange(self.batch).repeat_interleave(self.q), self.token_mask.reshape(-1)


class CallTracker:
    """Keeps the :class:`CallInfo` of the latest call of the model."""

    def __init__(self) -> None:
        self.current: CallInfo | None = None

    def attach(self, registry: Hooks) -> "CallTracker":
        """Read every call of the registry's root model for as long as the registry lives."""
        registry.before(registry.root, self._on_call, with_kwargs=True)
        return self

    def _on_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            ids = kwargs.get("inputs_embeds")
        if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
            self.current = None
            return
        batch, q = int(ids.shape[0]), int(ids.shape[1])
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= q:
            token_mask = mask[:, -q:].detach().bool().cpu()
        else:
            token_mask = torch.ones(batch, q, dtype=torch.bool)
        self.current = CallInfo(batch, q, token_mask, _is_prefill(kwargs))


# transformers 5.x calls the KV cache ``cache``; earlier versions and old callers use these.
CACHE_NAMES = ("cache", "past_key_values", "cache_params")


def _is_prefill(kwargs: dict) -> bool:
    past = next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)
    if past is None:
        return True
    length = getattr(past, "get_seq_length", None)
    if callable(length):
        return int(length()) == 0
    return len(past) == 0


def choose_cores(values: torch.Tensor, info: CallInfo | None, alpha: float, beta: float) -> torch.Tensor:
    """CoreInfer sentence-wise core sets of each example of a prefill call.

    ``values`` ``[n, U]``: the neurons of the call's rows. Returns ``[batch, U]`` bool, from the
    real tokens of each example only (definitions in :mod:`actscope.metrics.core`).
    """
    from ..metrics.core import sentence_core, token_core

    rows = info.rows(values.shape[0]) if info is not None else None
    if rows is None:  # unknown grid: every row is one sequence's real token
        rows = torch.zeros(values.shape[0], dtype=torch.long), torch.ones(values.shape[0], dtype=torch.bool)
        batch = 1
    else:
        batch = info.batch
    examples, real = rows
    cores = torch.zeros(batch, values.shape[1], dtype=torch.bool)
    for example in range(batch):
        mine = values[((examples == example) & real).to(values.device)]  # [tokens, U]
        counts = token_core(mine.float(), alpha).sum(0).cpu().numpy().astype(np.int64)  # [U]
        cores[example, torch.from_numpy(sentence_core(counts, beta))] = True
    return cores.to(values.device)
