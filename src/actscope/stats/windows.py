"""Per unit, the activations on the tokens around each of its top-activating examples.

:class:`TopWindows` follows a :class:`~actscope.stats.topk.TopExamples` table: whenever a token
enters a unit's top-k, the unit's values on the ``before`` tokens preceding it and the ``after``
tokens following it in the same example are read from the batch it came in (the batch holds
them: a window never crosses into another example, and never waits for a later batch). A unit's
windows cost ``k × (before + 1 + after) × 4`` bytes (float32): 512 bytes for the default 8 × 16.
"""
from __future__ import annotations

import ctypes
import math
from typing import Any

import torch
from torch import Tensor

from actscope.stats._common import I64, check_n_units, check_state, check_state_config, gathered, state_header, state_tensor

F32 = torch.float32
BEFORE, AFTER = 10, 5  # tokens of context kept on each side of a top example (16 in all)


class TopWindows:
    """``values`` ``[U, k, before + 1 + after]`` float32: unit u's activation on the tokens
    ``pos - before … pos + after`` of the example whose top-k slot is ``[u, s]`` (``tok[u, s]``
    the slot's global token id, as in the followed top-k table); NaN where there is no token
    (before the example's start, past its end) and, like the statistics, for NaN activations.
    """

    KIND = "actscope.stats.TopWindows"
    _STATE_KEYS = ("n_units", "k", "before", "after", "values", "tok")

    def __init__(self, n_units: int, k: int = 8, before: int = BEFORE, after: int = AFTER):
        self.n_units = check_n_units(n_units, "TopWindows")
        self.k, self.before, self.after = int(k), int(before), int(after)
        self._tok = torch.full((self.n_units, self.k), -1, dtype=I64)  # [U, k] the slots' tokens
        self._values = torch.full((self.n_units, self.k, self.width), math.nan, dtype=F32)  # [U, k, W]

    @property
    def width(self) -> int:
        return self.before + 1 + self.after

    # -- streaming -------------------------------------------------------------------------
    def follow(self, top_tok: Tensor, x: Tensor, tok: Tensor) -> None:
        """Bring the windows in line with ``top_tok`` ``[U, k]`` (the top-k table after it took
        the batch ``x`` ``[N, U]`` with token ids ``tok`` ``[N]``): slots whose token moved keep
        its window, slots with a new token read it from the batch."""
        top_tok = top_tok.to(self._tok.device)
        if self._follow_kernel(top_tok, x, tok):
            return
        changed = (top_tok != self._tok).any(1).nonzero().squeeze(1)  # [C] units whose table moved
        if changed.numel() == 0:
            return
        old_tok, new_tok = self._tok.index_select(0, changed), top_tok.index_select(0, changed)  # [C, k]
        old_values = self._values.index_select(0, changed)  # [C, k, W]
        values, found = _carried(old_tok, old_values, new_tok)
        fresh = (~found & (new_tok >= 0)).nonzero()  # [F, 2] (row in changed, slot)
        if fresh.numel():
            units = changed.index_select(0, fresh[:, 0])
            values[fresh[:, 0], fresh[:, 1]] = self._read(x, tok, units.to(x.device), new_tok[fresh[:, 0], fresh[:, 1]])
        self._values = self._values.index_copy(0, changed, values)
        self._tok = self._tok.index_copy(0, changed, new_tok)

    def _follow_kernel(self, top_tok: Tensor, x: Tensor, tok: Tensor) -> bool:
        """The CPU fast path (``_sample.c``), the same result in place; False where it does not apply."""
        from actscope.stats import fused, sampling

        if not (fused.usable(x) and self._tok.device.type == "cpu" and self.k <= 256) or sampling._library() is None:
            return False
        x = x.detach().to(F32).contiguous()
        tok = tok.to("cpu", I64).contiguous()
        sorted_tok, order = torch.sort(tok)
        self._tok, self._values = self._tok.contiguous(), self._values.contiguous()
        ptr = sampling._ptr
        status = sampling._library().actscope_follow_windows(
            ptr(x), ctypes.c_int64(x.shape[0]), ctypes.c_int64(x.shape[1]), ptr(tok), ptr(order.contiguous()),
            ptr(sorted_tok.contiguous()), ptr(top_tok.contiguous()), ptr(self._tok), ptr(self._values),
            ctypes.c_int32(self.k), ctypes.c_int32(self.before), ctypes.c_int32(self.after))
        return status == 0

    def _read(self, x: Tensor, tok: Tensor, units: Tensor, wanted: Tensor) -> Tensor:
        """``[F, W]`` the values of ``units`` on the windows around the tokens ``wanted``."""
        tok = tok.to(x.device)
        order = torch.argsort(tok)
        sorted_tok = tok.index_select(0, order)
        wanted = wanted.to(x.device)
        at = torch.searchsorted(sorted_tok, wanted).clamp(max=len(tok) - 1)
        row = order.index_select(0, at)  # [F] the batch row of each wanted token
        offsets = torch.arange(-self.before, self.after + 1, device=x.device)  # [W]
        rows = row[:, None] + offsets[None, :]  # [F, W]
        inside = (rows >= 0) & (rows < len(tok))
        rows = rows.clamp(0, len(tok) - 1)
        # a row belongs to the window when it holds exactly that example's token at that offset
        same = inside & (tok.index_select(0, rows.reshape(-1)).view(rows.shape) == wanted[:, None] + offsets[None, :])
        values = x[rows, units[:, None]].to(F32)  # [F, W]
        return torch.where(same, values, torch.full_like(values, math.nan)).to(self._values.device)

    def merge(self, other: "TopWindows", top_tok: Tensor) -> "TopWindows":
        """The windows of ``top_tok`` (the top-k table after merging ``other``'s) from this
        accumulator's or ``other``'s (in place); returns self."""
        device = self._tok.device
        tok = torch.cat([self._tok, other._tok.to(device)], 1)  # [U, 2k]
        values = torch.cat([self._values, other._values.to(device)], 1)  # [U, 2k, W]
        self._values, _ = _carried(tok, values, top_tok.to(device))
        self._tok = top_tok.to(device).clone()
        return self

    # -- results ---------------------------------------------------------------------------
    @property
    def values(self) -> Tensor:
        """``[U, k, W]`` float32 on the CPU, aligned with the followed top-k table."""
        return gathered(self._values)

    @property
    def tok(self) -> Tensor:
        return gathered(self._tok)

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**state_header(self.KIND), "n_units": self.n_units, "k": self.k, "before": self.before, "after": self.after,
                "values": gathered(self._values), "tok": gathered(self._tok)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        check_state(sd, self.KIND, self._STATE_KEYS)
        check_state_config(sd, self.KIND, n_units=self.n_units, k=self.k, before=self.before, after=self.after)
        self._values = state_tensor(sd, "values", F32, (self.n_units, self.k, self.width), self.KIND)
        self._tok = state_tensor(sd, "tok", I64, (self.n_units, self.k), self.KIND)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> "TopWindows":
        check_state(sd, cls.KIND, cls._STATE_KEYS)
        acc = cls(sd["n_units"], sd["k"], sd["before"], sd["after"])
        acc.load_state_dict(sd)
        return acc

    def __repr__(self) -> str:
        return f"TopWindows(n_units={self.n_units}, k={self.k}, before={self.before}, after={self.after})"


def _carried(old_tok: Tensor, old_values: Tensor, new_tok: Tensor) -> tuple[Tensor, Tensor]:
    """``(values [C, k, W], found [C, k])``: for each slot of ``new_tok`` ``[C, k]`` the window
    that ``old_tok`` ``[C, m]`` held for the same token (NaN and False where none did)."""
    match = (new_tok[:, :, None] == old_tok[:, None, :]) & (new_tok[:, :, None] >= 0)  # [C, k, m]
    found = match.any(2)
    source = match.to(torch.int8).argmax(2)  # [C, k] the old slot (0 where none)
    values = old_values.gather(1, source[:, :, None].expand(-1, -1, old_values.shape[2]))
    values = torch.where(found[:, :, None], values, torch.full_like(values, math.nan))
    return values, found
