"""Uniform samples of tokens chosen by a hash of their global token id (bottom-k sampling).

Every token gets a key in [0, 1) from a fixed hash of its global token id (:func:`token_keys`);
a sample of size R keeps the R tokens with the smallest keys. That is a uniform random sample
without replacement, and it depends only on *which* tokens were seen, never on how they were
batched, sharded over processes or resumed: two halves merged give exactly the one-pass sample.

* :class:`FiringSample` — per unit, R of the tokens it fires on (``a > 0``, finite), with the
  values: the unit's activation distribution, from which the unit pages draw examples per
  quantile bin and the unit's histogram. Cost: ``R × 12`` bytes a unit (token id + float32).
* :class:`TokenSample` — S tokens of the whole stream with, per unit, whether it fired on each
  (one bit): the co-firing of units is measured on these. Cost: ``S / 8`` bytes a unit.

Updates look only where a token can still enter: a unit whose sample is full takes only tokens
below its largest kept key, which after n tokens is about R / (rate · n); rows are sorted by key
and only the first ones are read, except for the few units (rare or dead ones) whose samples are
still open, which read their own columns (see :func:`_candidates`).
"""
from __future__ import annotations

import ctypes
import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from actscope.stats._common import (F64, I64, check_n_units, check_other, check_state, check_state_config, gathered, state_header,
                                    state_tensor)

F32 = torch.float32
SAMPLE = 64  # firing tokens sampled per unit
TOKENS = 1024  # tokens in the co-firing sample


def token_keys(tok: Tensor) -> Tensor:
    """``[N]`` float64 keys in [0, 1): the splitmix64 hash of each global token id (53 bits)."""
    z = tok.detach().to("cpu", torch.int64).numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0**-53)


class FiringSample:
    """Per unit, the ``size`` tokens with the smallest keys among those it fired on.

    ``tok`` ``[U, R]`` int64 (ascending key, ``-1`` padding), ``value`` ``[U, R]`` float32 (the
    unit's activation there, NaN padding); ``filled`` ``[U]`` how many are real. Every firing
    token of a unit is equally likely to be in its sample.
    """

    KIND = "actscope.stats.FiringSample"
    _STATE_KEYS = ("n_units", "size", "tok", "value")

    def __init__(self, n_units: int, size: int = SAMPLE):
        self.n_units = check_n_units(n_units, "FiringSample")
        self.size = int(size)
        self._tok = torch.full((self.n_units, self.size), -1, dtype=I64)  # [U, R]
        self._value = torch.full((self.n_units, self.size), math.nan, dtype=F32)  # [U, R]
        self._key = torch.full((self.n_units, self.size), math.inf, dtype=F64)  # [U, R] derived from _tok

    def update(self, x: Tensor, tok: Tensor, keys: Tensor | None = None) -> None:
        """Add the real tokens ``x`` ``[N, U]`` with global token ids ``tok`` ``[N]``
        (``keys``: their :func:`token_keys`, when already computed)."""
        if x.shape[0] == 0:
            return
        self._on(x.device)
        keys = (token_keys(tok) if keys is None else keys).to(x.device)
        if _kernel_fits(x) and self._update_kernel(x, keys, tok):
            return
        rows, units = _candidates(x, keys, self._key[:, -1])
        if rows.numel():
            tok = tok.to(x.device)
            self._absorb(units, keys[rows], tok[rows], x[rows, units].to(F32))

    def _update_kernel(self, x: Tensor, keys: Tensor, tok: Tensor) -> bool:
        """The CPU fast path (``_sample.c``): the same result as the torch path, in place."""
        lib = _library()
        x = x.detach().to(F32).contiguous()
        keys, order = torch.sort(keys, stable=True)
        tok = tok.to("cpu", I64).contiguous()
        for name in ("_key", "_tok", "_value"):
            setattr(self, name, getattr(self, name).contiguous())
        status = lib.actscope_firing_sample(
            _ptr(x), ctypes.c_int64(x.shape[0]), ctypes.c_int64(x.shape[1]), _ptr(order.contiguous()), _ptr(keys.contiguous()),
            _ptr(tok), ctypes.c_int32(self.size), _ptr(self._key), _ptr(self._tok), _ptr(self._value),
            ctypes.c_int32(max(torch.get_num_threads(), 1)))
        return status == 0

    def _on(self, device: torch.device) -> None:
        if self._tok.device != device:
            self._tok, self._value, self._key = (t.to(device) for t in (self._tok, self._value, self._key))

    def _absorb(self, units: Tensor, key: Tensor, tok: Tensor, value: Tensor) -> None:
        """Keep, per unit, the ``size`` smallest keys of its sample and these candidates (which
        come in key order: :func:`_candidates` reads rows by key)."""
        order = torch.argsort(units, stable=True)  # by unit, then key
        units, key, tok, value = units[order], key[order], tok[order], value[order]
        counts = torch.bincount(units, minlength=self.n_units)
        rank = torch.arange(len(units), device=units.device) - (torch.cumsum(counts, 0) - counts)[units]
        keep = rank < self.size  # only a unit's `size` smallest candidates can enter
        units, rank, key, tok, value = units[keep], rank[keep], key[keep], tok[keep], value[keep]
        touched = torch.unique_consecutive(units)  # [T]
        slot = torch.full((self.n_units,), -1, dtype=I64, device=units.device)
        slot[touched] = torch.arange(len(touched), device=units.device)
        shape = (len(touched), int(rank.max()) + 1)  # padded to the most candidates any unit has
        new_key = torch.full(shape, math.inf, dtype=F64, device=units.device)
        new_tok = torch.full(shape, -1, dtype=I64, device=units.device)
        new_value = torch.full(shape, math.nan, dtype=F32, device=units.device)
        where = (slot[units], rank)
        new_key[where], new_tok[where], new_value[where] = key, tok, value
        merged = _smallest(torch.cat([self._key[touched], new_key], 1), torch.cat([self._tok[touched], new_tok], 1),
                           torch.cat([self._value[touched], new_value], 1), self.size)
        self._key = self._key.index_copy(0, touched, merged[0])
        self._tok = self._tok.index_copy(0, touched, merged[1])
        self._value = self._value.index_copy(0, touched, merged[2])

    def merge(self, other: "FiringSample") -> "FiringSample":
        """Add ``other``'s samples (same n_units and size; in place); returns self."""
        check_other(self, other, ("n_units", "size"))
        device = self._tok.device
        self._key, self._tok, self._value = _smallest(
            torch.cat([self._key, other._key.to(device)], 1), torch.cat([self._tok, other._tok.to(device)], 1),
            torch.cat([self._value, other._value.to(device)], 1), self.size)
        return self

    # -- results ---------------------------------------------------------------------------
    @property
    def tok(self) -> Tensor:
        return gathered(self._tok)

    @property
    def value(self) -> Tensor:
        return gathered(self._value)

    @property
    def filled(self) -> Tensor:
        return gathered((self._tok >= 0).sum(1))

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**state_header(self.KIND), "n_units": self.n_units, "size": self.size,
                "tok": gathered(self._tok), "value": gathered(self._value)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        check_state(sd, self.KIND, self._STATE_KEYS)
        check_state_config(sd, self.KIND, n_units=self.n_units, size=self.size)
        shape = (self.n_units, self.size)
        self._tok = state_tensor(sd, "tok", I64, shape, self.KIND)
        self._value = state_tensor(sd, "value", F32, shape, self.KIND)
        self._key = _keys_of(self._tok)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> "FiringSample":
        check_state(sd, cls.KIND, cls._STATE_KEYS)
        acc = cls(sd["n_units"], sd["size"])
        acc.load_state_dict(sd)
        return acc

    def __repr__(self) -> str:
        return f"FiringSample(n_units={self.n_units}, size={self.size})"


class TokenSample:
    """The ``size`` tokens of the stream with the smallest keys, and on which of them each unit
    fired (``a > 0``): ``tok`` ``[S]`` (ascending key, ``-1`` padding), ``firing()`` ``[n, U]``
    bool over the ``n`` real ones. Bits are kept packed, 8 units a byte."""

    KIND = "actscope.stats.TokenSample"
    _STATE_KEYS = ("n_units", "size", "tok", "bits")

    def __init__(self, n_units: int, size: int = TOKENS):
        self.n_units = check_n_units(n_units, "TokenSample")
        self.size = int(size)
        self._tok = torch.full((self.size,), -1, dtype=I64)  # [S]
        self._key = torch.full((self.size,), math.inf, dtype=F64)  # [S] derived from _tok
        self._bits = torch.zeros((self.size, _bytes(self.n_units)), dtype=torch.uint8)  # [S, ceil(U / 8)]

    def update(self, x: Tensor, tok: Tensor, keys: Tensor | None = None) -> None:
        """Add the real tokens ``x`` ``[N, U]`` with global token ids ``tok`` ``[N]``."""
        keys = token_keys(tok) if keys is None else keys.cpu()
        rows = (keys < self._key[-1]).nonzero().squeeze(1)  # [m] tokens that can enter
        if rows.numel() == 0:
            return
        if self._bits.device != x.device:
            self._bits = self._bits.to(x.device)
        fired = x.index_select(0, rows.to(x.device)) > 0  # [m, U]
        tok = tok.to("cpu")
        key, order = torch.sort(torch.cat([self._key, keys[rows]]), stable=True)
        keep = order[: self.size]
        self._key, self._tok = key[: self.size], torch.cat([self._tok, tok[rows]])[keep]
        self._bits = torch.cat([self._bits, pack_bits(fired)]).index_select(0, keep.to(self._bits.device))

    def merge(self, other: "TokenSample") -> "TokenSample":
        """Add ``other``'s sample (same n_units and size; in place); returns self."""
        check_other(self, other, ("n_units", "size"))
        key, order = torch.sort(torch.cat([self._key, other._key]), stable=True)
        keep = order[: self.size]
        self._key, self._tok = key[: self.size], torch.cat([self._tok, other._tok])[keep]
        bits = torch.cat([self._bits, other._bits.to(self._bits.device)])
        self._bits = bits.index_select(0, keep.to(bits.device))
        return self

    # -- results ---------------------------------------------------------------------------
    @property
    def tok(self) -> Tensor:
        return self._tok[self._tok >= 0].clone()

    def firing(self) -> Tensor:
        """``[n, U]`` bool on the CPU: whether each unit fired on each sampled token."""
        real = int((self._tok >= 0).sum())
        return unpack_bits(gathered(self._bits[:real]), self.n_units)

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**state_header(self.KIND), "n_units": self.n_units, "size": self.size,
                "tok": self._tok.clone(), "bits": gathered(self._bits)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        check_state(sd, self.KIND, self._STATE_KEYS)
        check_state_config(sd, self.KIND, n_units=self.n_units, size=self.size)
        self._tok = state_tensor(sd, "tok", I64, (self.size,), self.KIND)
        self._bits = state_tensor(sd, "bits", torch.uint8, (self.size, _bytes(self.n_units)), self.KIND)
        self._key = _keys_of(self._tok)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> "TokenSample":
        check_state(sd, cls.KIND, cls._STATE_KEYS)
        acc = cls(sd["n_units"], sd["size"])
        acc.load_state_dict(sd)
        return acc

    def __repr__(self) -> str:
        return f"TokenSample(n_units={self.n_units}, size={self.size})"


# -- helpers ---------------------------------------------------------------------------------
def _kernel_fits(x: Tensor) -> bool:
    from actscope.stats import fused

    return fused.usable(x) and _library() is not None  # CPU float32/16/bfloat16, kernels allowed


@lru_cache(maxsize=1)
def _library() -> Any:
    """``_sample.c`` (the firing sample and the windows' kernels) compiled on first use (see
    actscope.native); None when impossible."""
    from actscope.native import compiled_library
    from actscope.stats.fused import FLAG_SETS

    lib = compiled_library("actscope.stats", "_sample.c", "firing_sample", FLAG_SETS, "using the slower torch firing sample")
    if lib is not None:
        lib.actscope_firing_sample.restype = ctypes.c_int
        lib.actscope_follow_windows.restype = ctypes.c_int
    return lib


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _candidates(x: Tensor, keys: Tensor, limit: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, units)`` of the entries of ``x`` ``[N, U]`` that fire (``0 < a < inf``) on a
    token whose key is below the unit's ``limit`` ``[U]``, in ascending key order per unit.

    Only rows with a key below a limit can hold one. Rows are sorted by key; the units with the
    ``j`` largest limits read all their rows (their own columns), every other unit only the first
    rows, up to the largest of the other limits. ``j`` is chosen from a few sizes to read the
    fewest entries: after the first batches that is a small corner of ``x``.
    """
    n, u = x.shape
    order = torch.argsort(keys)
    sorted_keys = keys.index_select(0, order)
    limits, widest = torch.sort(limit, descending=True)
    best = None
    choices = sorted({0, u} | {u >> shift for shift in range(1, 12)} | {3 * u >> shift for shift in range(2, 12)})
    index = torch.tensor([j for j in choices if j < u], device=limits.device)
    bounds = limits.index_select(0, index)  # [c] the largest limit left to the other units
    firsts = torch.searchsorted(sorted_keys, bounds).tolist()  # rows with key < bound, per choice
    for j, first in zip(choices, firsts + [0]):
        cost = n * j + u * first
        if best is None or cost < best[0]:
            best = (cost, j, first)
    _, j, first = best
    found_rows, found_units = [], []
    if first:
        head = order[:first]
        part = x.index_select(0, head)  # [first, U]
        hit = ((part > 0) & (part < math.inf) & (keys.index_select(0, head)[:, None] < limit[None, :])).nonzero()
        found_rows.append(head.index_select(0, hit[:, 0]))
        found_units.append(hit[:, 1])
    if j and first < n:
        tail, wide = order[first:], widest[:j]
        part = x.index_select(1, wide).index_select(0, tail)  # [n - first, j]
        hit = ((part > 0) & (part < math.inf) & (keys.index_select(0, tail)[:, None] < limit.index_select(0, wide)[None, :])).nonzero()
        found_rows.append(tail.index_select(0, hit[:, 0]))
        found_units.append(wide.index_select(0, hit[:, 1]))
    if not found_rows:
        empty = torch.zeros(0, dtype=I64, device=x.device)
        return empty, empty
    return torch.cat(found_rows), torch.cat(found_units)


def _smallest(key: Tensor, tok: Tensor, value: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, the ``size`` entries with the smallest keys, ascending."""
    key, order = torch.sort(key, dim=1, stable=True)
    order = order[:, :size]
    return key[:, :size].contiguous(), tok.gather(1, order), value.gather(1, order)


def _keys_of(tok: Tensor) -> Tensor:
    keys = token_keys(tok.reshape(-1)).view(tok.shape)
    return torch.where(tok >= 0, keys, torch.full_like(keys, math.inf))


def _bytes(units: int) -> int:
    return (units + 7) // 8


def pack_bits(fired: Tensor) -> Tensor:
    """``[m, U]`` bool → ``[m, ceil(U / 8)]`` uint8, unit ``8b + i`` in bit ``i`` of byte ``b``."""
    m, u = fired.shape
    padded = torch.nn.functional.pad(fired.to(torch.uint8), (0, _bytes(u) * 8 - u)).view(m, -1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=fired.device)
    return (padded * weights).sum(2, dtype=torch.uint8)


def unpack_bits(bits: Tensor, units: int) -> Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits[:, :, None] >> shifts) & 1).bool().reshape(bits.shape[0], -1)[:, :units]
