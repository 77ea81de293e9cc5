"""The one-pass C kernel behind ``SiteStats.update`` on the CPU, compiled on first use.

The kernel (``_fused.c``) is plain C with no Python or torch headers, so it builds in well
under a second with the system's C compiler and is called through ``ctypes`` on the tensor's
own memory. Where no compiler is available, or ``ACTSCOPE_FUSED=0`` is set, SiteStats uses the
pure-torch path; both are tested against the same naive computation.
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor


F64, I64 = torch.float64, torch.int64
SOURCE = "_fused.c"
# -fopenmp first: the kernel then runs on torch's own OpenMP team (one libgomp per process),
# whose workers are still spinning from the layer that just ran; threads of its own would
# compete with them for the cores. Without OpenMP it falls back to pthreads.
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3", "-fopenmp"], ["-O3"], ["-O2"])


def enabled() -> bool:
    return os.environ.get("ACTSCOPE_FUSED", "1") != "0" and library() is not None


def usable(x: Tensor) -> bool:
    """The kernel takes CPU float32/16/bfloat16 batches (the latter two are widened exactly)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and enabled()


@lru_cache(maxsize=1)
def library() -> Any:
    """The compiled kernel, building it into the cache on first use; None when impossible."""
    from actscope.native import compiled_library

    lib = compiled_library("actscope.stats", SOURCE, "site_partials", FLAG_SETS, "using the slower pure-torch statistics")
    if lib is not None:
        lib.actscope_site_partials.restype = ctypes.c_int
    return lib


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def site_partials(x: Tensor, eps: tuple[float, ...], edges: Tensor, top: tuple[Tensor, Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """Per-batch counts and sums of ``x`` ``[N, U]``, for SiteStats to merge.

    Histogram slots come back as ``[zero, underflow, overflow, nonfinite, bins…]``. ``top``:
    ``(values [U, k] float64, tokens [U, k] int64, tok [N] int64)``, a TopExamples state (sorted
    by value descending then token, -inf / -1 padding) that the kernel updates in place with
    the rows of ``x``, whose token ids are ``tok``.
    """
    x = x.detach().to(torch.float32).contiguous()
    n, u = x.shape
    criteria = 1 + len(eps)
    shift = _shift(x)
    edge_values = tuple(edges.tolist())
    slot_of_key, key_shift, next_slot_at = slot_tables(edge_values)
    window, key_lo = slot_window(edge_values)  # empty: the kernel uses the tables
    n_slots = len(next_slot_at)
    out = {
        "count": torch.zeros(u, dtype=I64),
        "nonfinite": torch.zeros(u, dtype=I64),
        "sum": torch.zeros(u, dtype=F64),
        "sumsq": torch.zeros(u, dtype=F64),
        "min": torch.empty(u, dtype=F64),
        "max": torch.empty(u, dtype=F64),
        "fired": torch.zeros(criteria, u, dtype=I64),
        "firing_hist": torch.zeros(criteria, u + 1, dtype=I64),
        "raw_slots": torch.zeros(n_slots, dtype=I64),
    }
    top_values, top_tokens, tok = top if top is not None else (torch.empty(0, dtype=F64), torch.empty(0, dtype=I64), torch.empty(0, dtype=I64))
    k = top_values.shape[1] if top is not None else 0
    _check_top(top_values, top_tokens, tok, u, n, k)
    eps_f = float_thresholds(eps)
    status = library().actscope_site_partials(
        _ptr(x), ctypes.c_int64(n), ctypes.c_int64(u),
        _ptr(eps_f), ctypes.c_int32(len(eps)),
        _ptr(slot_of_key), ctypes.c_int32(key_shift), _ptr(next_slot_at), ctypes.c_int32(n_slots),
        _ptr(window if len(window) else slot_of_key), ctypes.c_int32(key_lo), ctypes.c_int32(len(window)),
        _ptr(shift), ctypes.c_int32(max(torch.get_num_threads(), 1)),
        ctypes.c_int32(k), _ptr(top_values), _ptr(top_tokens), _ptr(tok),
        *(_ptr(out[key]) for key in ("count", "nonfinite", "sum", "sumsq", "min", "max", "fired", "firing_hist", "raw_slots")),
    )
    if status != 0:
        raise RuntimeError(f"statistics kernel failed with status {status}")
    raw = out.pop("raw_slots")
    out["slots"] = torch.cat([raw[:2], raw[-2:], raw[2:-2]])  # zero, under, over, nonfinite, bins
    counts = out["count"].to(F64)
    seen = counts > 0
    mean_shifted = torch.where(seen, out["sum"] / counts.clamp(min=1), torch.zeros_like(counts))
    out["mean"] = torch.where(seen, shift + mean_shifted, torch.zeros_like(counts))
    out["m2"] = (out["sumsq"] - out["sum"] * mean_shifted).clamp(min=0)
    return out


def _check_top(values: Tensor, tokens: Tensor, tok: Tensor, u: int, n: int, k: int) -> None:
    """The kernel writes into the top-k state: refuse anything but the exact layout."""
    shapes_ok = k == 0 or (values.shape == (u, k) and tokens.shape == (u, k) and tok.shape == (n,))
    layout_ok = all(t.is_contiguous() and t.device.type == "cpu" for t in (values, tokens, tok))
    types_ok = values.dtype == F64 and tokens.dtype == I64 and tok.dtype == I64
    if not (shapes_ok and layout_ok and types_ok):
        raise RuntimeError("site_partials: the top-k state must be contiguous CPU float64/int64 [U, k] tensors and tok int64 [N]")


def _shift(x: Tensor) -> Tensor:
    """A value from each column (the first row, non-finite → 0) to centre the sums on."""
    first = x[0].to(F64)
    return torch.where(torch.isfinite(first), first, torch.zeros_like(first)).contiguous()


def float_thresholds(eps: tuple[float, ...]) -> Tensor:
    """The largest float32 <= each ε: for a float32 a, a > that  ⇔  a > ε exactly."""
    values = np.asarray(eps, dtype=np.float32)
    below = values.astype(np.float64) > np.asarray(eps, dtype=np.float64)
    values[below] = np.nextafter(values[below], np.float32(-np.inf))
    return torch.from_numpy(values.copy())


@lru_cache(maxsize=8)
def slot_tables(edges: tuple[float, ...]) -> tuple[Tensor, int, Tensor]:
    """Lookup tables for the exact histogram slot of a float32 |a| from its top bits.

    Slots: 0 zero, 1 underflow (< edges[0]), 2… bins, then overflow (>= edges[-1]) and
    non-finite. A key is the exponent and the top ``m`` mantissa bits (``bits >> key_shift``);
    ``m`` is the smallest that makes a key span a ratio (at most 1 + 2**-m) below one bin's, so
    the slot is the key's first float's slot or the next one. ``slot_of_key[k]`` is that first
    slot; ``next_slot_at[s]`` is the first float of slot s + 1 (NaN: never). Small tables stay
    in the L1 cache.
    """
    edge = np.asarray(edges, dtype=np.float64)
    n_bins = len(edge) - 1
    nonfinite = n_bins + 3  # overflow (n_bins + 2) and non-finite never move up a slot
    bin_ratio = float(np.min(edge[1:] / edge[:-1]))
    mantissa_bits = next(m for m in range(1, 24) if 1 + 2.0**-m < bin_ratio)
    key_shift = 23 - mantissa_bits
    with np.errstate(invalid="ignore"):  # the keys of NaN bit patterns
        keys = (np.arange(1 << (31 - key_shift), dtype=np.uint32) << key_shift).view(np.float32).astype(np.float64)
        slot = np.searchsorted(edge, keys, side="right") + 1  # 1 below lo, 2 + bin, n_bins + 2 at hi
    slot[keys == 0] = 0
    slot[~np.isfinite(keys)] = nonfinite
    first = np.full(n_bins + 4, np.nan, dtype=np.float32)
    first[0] = np.float32(np.finfo(np.float32).smallest_subnormal)
    first[1 : n_bins + 2] = [_float_at_or_above(e) for e in edge]
    return torch.from_numpy(slot.astype(np.int32)), key_shift, torch.from_numpy(first)


MAX_WINDOW = 384  # keys the AVX-512 path holds in registers (MAX_CHUNKS * 32 in _fused.c)


@lru_cache(maxsize=8)
def slot_window(edges: tuple[float, ...]) -> tuple[Tensor, int]:
    """The register table of the AVX-512 slot path: ``(window, key_lo)``.

    ``window[i]`` (uint32 bits in an int32 tensor) is for the key ``key_lo + i``, the keys from
    lo's first float to hi's: ``(slot << key_shift) + 2**key_shift - t``, with slot the key's
    first slot (as ``slot_of_key``) and t the offset inside the key (its low ``key_shift``
    bits) of the next slot's first float, ``2**key_shift`` when that lies in a later key. A
    value whose low bits reach t thus carries into the next slot. Keys below the window are
    zero or underflow, above it overflow or non-finite. Empty (the kernel then uses the
    tables) when the window exceeds MAX_WINDOW keys or an entry does not fit 32 bits.
    """
    slot_of_key, key_shift, next_slot_at = slot_tables(edges)
    key_lo = int(_float_at_or_above(edges[0]).view(np.uint32)) >> key_shift  # lo's first float
    key_hi = int(_float_at_or_above(edges[-1]).view(np.uint32)) >> key_shift
    keys = np.arange(key_lo, key_hi + 1, dtype=np.int64)
    first = slot_of_key.numpy()[keys].astype(np.int64)
    step = next_slot_at.numpy()[first].view(np.uint32).astype(np.int64)  # NaN: a later key
    inside = (step >> key_shift) == keys
    t = np.where(inside, step & ((1 << key_shift) - 1), 1 << key_shift)
    entry = (first << key_shift) + (1 << key_shift) - t
    fits = len(keys) <= MAX_WINDOW and (int(first.max()) + 2) << key_shift <= 1 << 32
    window = entry.astype(np.uint32).view(np.int32) if fits else np.zeros(0, dtype=np.int32)
    return torch.from_numpy(window.copy()), key_lo


def _float_at_or_above(value: float) -> np.float32:
    f = np.float32(value)
    return np.nextafter(f, np.float32(np.inf)) if float(f) < value else f
