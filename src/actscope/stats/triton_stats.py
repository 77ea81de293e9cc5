"""The statistics kernel for CUDA tensors, in Triton: what ``stats/_fused.c`` computes on the CPU.

Entry points: :func:`usable` (is this batch for the kernel?) and :func:`update_site`, which
``SiteStats.update`` calls for a CUDA batch; :func:`site_partials` is the kernel itself, with the
same partial counts and sums as :func:`actscope.stats.fused.site_partials`. Where Triton is
missing, switched off (``ACTSCOPE_TRITON=0``) or fails to compile (reported once as a warning;
``ACTSCOPE_TRITON_STRICT=1`` raises instead), ``SiteStats`` keeps its pure-torch path.

Two stages. **Triton**: a grid of (column block × row range) programs, each reading its tile of
``x`` ``[N, U]`` once in its own dtype (float32/16/bfloat16, widened exactly to float32) and
producing, per column, its partial count of finite values, mean and M2, min and max, firing
counts of every criterion of the ladder, its top-k candidates, and per program the |a|
histogram slots; per-token firing counts are added across column blocks with integer atomics
(exact and order-free). **torch**: a small merge of the per-program partials (``[R, U]`` with R
a handful of row ranges) and a ``bincount`` of the per-token counts.

Exactness (the same rules as the C kernel, independent of a GPU's flush-to-zero modes):

* firing and the histogram compare float32 *bit patterns* as integers: ``a > 0`` is
  ``bits > 0``, ``|a| > eps`` is ``bits(|a|) > bits(eps_f)`` with ``eps_f`` the largest float
  <= eps (``fused.float_thresholds``); the slot of ``|a|`` comes from the C kernel's exact
  tables (``fused.slot_tables``);
* top-k: a value enters when it beats its unit's k-th kept value; among equal values the
  earliest row wins (each candidate's key is ``(ordered value bits << 32) | (2**32 - 1 -
  row)``, unique), so, with rows in token order, equal values keep the earliest tokens, as in
  the C kernel.

Moments: each tile of ``BN`` rows is reduced from registers with the corrected two-pass
algorithm (the tile's mean m0, then the sums of ``d = x - m0`` and of ``d²``: the tile's mean is
``m0 + Σd/n`` and its M2 ``Σd² - (Σd)²/n``, both formed in float64), and tiles, programs and
batches are combined with Chan's formula in float64, so no sum cancels catastrophically (there is
no shift to choose, unlike the C kernel's). The tile sums run

* in float64 (``ACTSCOPE_TRITON_MOMENTS=float64``), the default where float64 is fast (data-
  centre GPUs: compute capability 6.0, 7.0, 8.0, 9.0, 10.0; and the interpreter): a few float64
  operations per value, well under the time to read it there; tested to 1e-9 relative against
  float64 (measured: about 1e-13);
* or in float32 (``float32``), the default on GPUs whose float64 runs at 1/32 to 1/64 of the
  float32 rate (where a float64 pass per value could cost more than reading it): only the
  per-tile terms are float64, once per ``BN`` values. A deviation ``x - m0`` is exact or nearly
  (x and m0 are close), so what remains is float32 rounding in sums of at most ``BN = 32``
  terms without cancellation; tested to 1e-7·mean|x| for means and 1e-6 relative for
  variances on data whose mean lies 10⁴ standard deviations from zero (measured: 4e-9 and 2e-7).
"""
from __future__ import annotations

import math
import os
import warnings
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from actscope.stats import fused

F64, I64, I32 = torch.float64, torch.int64, torch.int32
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_CRITERIA = 16  # as _fused.c
MAX_K = 64  # top-k beyond this takes the torch path (k selection rounds per tile)
BN, BU = 32, 64  # a tile: rows x columns (a row of a tile is 64 contiguous values)
_SENTINEL = -(2**63)  # below every candidate key
# Compute capabilities whose float64 runs at half the float32 rate (P100, V100, A100, H100, B200).
FAST_FLOAT64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}

tl: Any = None  # triton.language, bound by _kernels() on first use (importing this module never imports Triton)
_failed: list[str] = []  # the first compile/launch failure; the torch path is used after it


# ---- choosing the path -----------------------------------------------------------------------

@lru_cache(maxsize=1)
def available() -> bool:
    """True when Triton imports (it is only imported here, on the first CUDA batch)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install: the torch path serves
        return False
    return True


def enabled() -> bool:
    return os.environ.get("ACTSCOPE_TRITON", "1") != "0" and not _failed and available()


def usable(x: Tensor) -> bool:
    """A CUDA float32/16/bfloat16 batch, Triton present and not switched off."""
    return x.device.type == "cuda" and x.dtype in DTYPES and cuda_runtime() and enabled()


@lru_cache(maxsize=1)
def cuda_runtime() -> bool:
    """A CUDA runtime is there: a tensor that only says it is on CUDA (the tests' pretend
    devices on a CPU-only build) is not for the kernel."""
    return torch.cuda.is_available()


def moments_precision(device: torch.device) -> str:
    """``float64`` or ``float32`` tile sums (see the module docstring), ``ACTSCOPE_TRITON_MOMENTS``
    overriding the choice by device."""
    chosen = os.environ.get("ACTSCOPE_TRITON_MOMENTS", "")
    if chosen in ("float64", "float32"):
        return chosen
    if device.type != "cuda":
        return "float64"
    return "float64" if torch.cuda.get_device_capability(device) in FAST_FLOAT64 else "float32"


# ---- SiteStats' entry ------------------------------------------------------------------------

def update_site(site: Any, x: Tensor, tok: Tensor) -> bool:
    """Feed ``x`` ``[N, U]`` / ``tok`` ``[N]`` to a ``SiteStats`` through the kernel; False (site
    untouched) when the kernel cannot take it, so that the caller takes the torch path."""
    k = site.top.k
    if k > MAX_K or len(site.ladder.eps) + 1 > MAX_CRITERIA or x.shape[0] >= 2**31:
        return False
    try:
        part = site_partials(x.detach(), site.ladder.eps, site.hist._edges, site.top._values[:, -1], tok, k)
    except Exception as error:  # a compiler or driver failure: say it once, then use torch
        if os.environ.get("ACTSCOPE_TRITON_STRICT") == "1":
            raise
        _failed.append(f"{type(error).__name__}: {error}")
        warnings.warn(f"actscope: the Triton statistics kernel failed ({_failed[0][:300]}); using the "
                      "pure-torch statistics from now on (ACTSCOPE_TRITON=0 skips the kernel)", RuntimeWarning, stacklevel=3)
        return False
    absorb(site, part)
    return True


def absorb(site: Any, part: dict[str, Tensor]) -> None:
    """Add one batch's partials (as from :func:`site_partials`) to a SiteStats' parts, on the
    device the statistics are kept on (:func:`_home`)."""
    home = _home(site, part["count"].device)
    moved = {key: value.to(home) for key, value in part.items()}
    site.moments._absorb(moved)
    site.ladder._absorb(moved)
    site.hist._absorb(moved)
    top, values, tokens = site.top, moved["top_values"], moved["top_tokens"]  # [U, k]
    if hasattr(top, "_STATE"):
        from actscope.stats._common import place

        place(top, top._STATE, home)
    if home.type == "cpu":  # only the units with a candidate
        units = (values[:, 0] > -math.inf).nonzero().squeeze(1)
        if units.numel():
            top._keep_best(values.index_select(0, units), tokens.index_select(0, units), units)
    else:  # every unit: no host synchronisation
        top._keep_best(values, tokens)


def _home(site: Any, device: torch.device) -> torch.device:
    """Where the statistics are kept: the updates' device for accumulators whose state follows
    their updates (they declare ``_STATE``), else the device their state is on now."""
    return device if hasattr(site.moments, "_STATE") else site.moments._count.device


# ---- the kernel ------------------------------------------------------------------------------

def site_partials(x: Tensor, eps: tuple[float, ...], edges: Tensor, floor: Tensor, tok: Tensor, k: int,
                  precision: str | None = None, rows_per_program: int | None = None) -> dict[str, Tensor]:
    """Per-batch counts and sums of ``x`` ``[N, U]`` (on x's device), as ``fused.site_partials``:
    ``count``, ``nonfinite``, ``mean``, ``m2``, ``min``, ``max`` ``[U]``; ``fired`` ``[C, U]``,
    ``firing_hist`` ``[C, U + 1]``; ``slots`` ``[zero, underflow, overflow, nonfinite, bins…]``;
    and the batch's top-k candidates ``top_values`` ``[U, k]`` float64 (value descending, then
    token; ``-inf`` padding) and ``top_tokens`` ``[U, k]`` (``-1`` padding): the finite values
    above ``floor`` ``[U]`` (a unit's k-th kept value), the earliest rows among equal ones.
    """
    if x.dim() != 2 or x.dtype not in DTYPES:
        raise ValueError(f"site_partials takes a [N, U] float32/16/bfloat16 tensor, got {x.dtype} {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    n, u = x.shape
    device = x.device
    kern = _kernels()
    criteria = 1 + len(eps)
    thresholds = _device_table(device, ("eps", tuple(eps)), lambda: _criterion_bits(eps))
    edge_values = tuple(edges.tolist())
    slot_of_key, key_shift, next_slot_at = fused.slot_tables(edge_values)
    n_slots = len(next_slot_at)
    key_table = _device_table(device, ("keys", edge_values), lambda: slot_of_key)
    next_table = _device_table(device, ("next", edge_values), lambda: _next_bits(next_slot_at))
    floor32 = _on(floor.to(torch.float32).contiguous(), device)
    kp = _pow2(k)
    rows = rows_per_program or _rows_per_program(n, u, device)
    r_count = -(-n // rows)
    c_blocks = -(-u // BU)
    empty = lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device=device)  # noqa: E731
    part_count = empty(r_count, u, dtype=I32)
    part_mean, part_m2 = empty(r_count, u, dtype=F64), empty(r_count, u, dtype=F64)
    part_min, part_max = empty(r_count, u, dtype=torch.float32), empty(r_count, u, dtype=torch.float32)
    part_fired = empty(r_count, criteria, u, dtype=I32)
    part_slots = empty(r_count * c_blocks, _pow2(n_slots), dtype=I32)
    part_keys = empty(r_count, kp, u, dtype=I64)
    token_fired = torch.zeros(n, criteria, dtype=I32, device=device)
    use64 = (precision or moments_precision(device)) == "float64"
    kern[(c_blocks, r_count)](
        x, x.stride(0), n, u, rows,
        thresholds, key_table, key_shift, next_table, n_slots, floor32,
        part_count, part_mean, part_m2, part_min, part_max, part_fired, token_fired, part_slots, part_keys,
        CRITERIA=criteria, CP=_pow2(criteria), NBP=_pow2(n_slots), K=k, KP=kp, F64=use64, BN=BN, BU=BU,
    )
    out = _merge_moments(part_count, part_mean, part_m2, part_min, part_max, n)
    out["fired"] = part_fired.sum(0, dtype=I64)
    out["firing_hist"] = _bincount_columns(token_fired, u + 1)
    raw = part_slots.sum(0, dtype=I64)[:n_slots]
    out["slots"] = torch.cat([raw[:2], raw[n_slots - 2:], raw[2:n_slots - 2]])  # zero, under, over, nonfinite, bins
    out["top_values"], out["top_tokens"] = _merge_candidates(part_keys, tok, k)
    return out


def _merge_moments(count: Tensor, mean: Tensor, m2: Tensor, lo: Tensor, hi: Tensor, n: int) -> dict[str, Tensor]:
    """Combine the per-program (count, mean, M2) ``[R, U]``: the exact pooled formula in float64
    (deviations between means, never raw sums of squares)."""
    c = count.to(F64)
    total = c.sum(0)  # [U]
    pooled = (c * mean).sum(0) / total.clamp(min=1)
    m2_all = m2.sum(0) + (c * (mean - pooled) ** 2).sum(0)
    counts = total.to(I64)
    return {
        "count": counts, "nonfinite": n - counts, "mean": pooled, "m2": m2_all.clamp(min=0),
        "min": lo.amin(0).to(F64), "max": hi.amax(0).to(F64),
    }


def _bincount_columns(values: Tensor, n_bins: int) -> Tensor:
    """``[C, n_bins]``: per column c of ``values`` ``[N, C]``, how many rows hold each count."""
    c = values.shape[1]
    offsets = torch.arange(c, device=values.device, dtype=I64) * n_bins
    flat = (values.to(I64) + offsets).T.reshape(-1)
    return torch.bincount(flat, minlength=c * n_bins).view(c, n_bins)


def _merge_candidates(keys: Tensor, tok: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of each unit's candidate keys ``[R, KP, U]`` → ``(values, tokens)`` ``[U, k]``."""
    u = keys.shape[2]
    best = keys.permute(2, 0, 1).reshape(u, -1).topk(k, dim=1).values  # [U, k], keys are unique
    real = best != _SENTINEL
    ordered = (best >> 32).to(I32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    values = torch.where(real, bits.view(torch.float32).to(F64), -math.inf)
    rows = (0xFFFFFFFF - (best & 0xFFFFFFFF)).clamp(max=tok.shape[0] - 1)
    tokens = torch.where(real, _on(tok.to(I64), keys.device)[rows], -1)
    return values, tokens


def _on(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; a CPU tensor goes through pinned memory, asynchronously (a pageable
    copy would wait for the GPU to finish the forward so far, at every site)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _criterion_bits(eps: tuple[float, ...]) -> Tensor:
    """Per criterion, the int32 bits a value must exceed: 0 for ``a > 0`` (compared on the
    signed bits of a) and ``bits(eps_f)`` for ``|a| > eps`` (on the bits of |a|)."""
    eps_f = fused.float_thresholds(eps)
    return torch.cat([torch.zeros(1, dtype=I32), eps_f.view(I32)])


def _next_bits(next_slot_at: Tensor) -> Tensor:
    """``next_slot_at`` as int32 bits; NaN ('never') as the largest int32, beyond every finite
    |a| (a NaN with that payload moves up and is clamped back to the non-finite slot)."""
    bits = next_slot_at.view(I32).clone()
    bits[torch.isnan(next_slot_at)] = 0x7FFFFFFF
    return bits


_TABLES: dict[tuple, Tensor] = {}


def _device_table(device: torch.device, key: tuple, make: Any) -> Tensor:
    """A small constant table on ``device``, made and copied there once."""
    full = (str(device), *key)
    if full not in _TABLES:
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[full] = make().to(device).contiguous()
    return _TABLES[full]


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _rows_per_program(n: int, u: int, device: torch.device) -> int:
    """Rows per program: enough programs for about four per multiprocessor, each at least one
    tile tall (fewer row ranges mean fewer partials to merge)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    row_ranges = max(1, (4 * sms) // -(-u // BU))
    rows = -(-n // row_ranges)
    return -(-rows // BN) * BN


# ---- Triton source ---------------------------------------------------------------------------
# The body is a plain function made a kernel on first use (``_kernels``), so that the mode
# (compiled, or the interpreter with TRITON_INTERPRET=1) is the one in force at that moment, and
# so that importing this module never imports Triton.

def _site_kernel(x_ptr, stride_x, n, u, rows,
                 thr_ptr, key_ptr, key_shift, next_ptr, n_slots, floor_ptr,
                 count_ptr, mean_ptr, m2_ptr, min_ptr, max_ptr, fired_ptr, token_fired_ptr, slots_ptr, keys_ptr,
                 CRITERIA: tl.constexpr, CP: tl.constexpr, NBP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                 F64: tl.constexpr, BN: tl.constexpr, BU: tl.constexpr):
    # Values are compared as integers: `ordered` (float order as signed int32, -0 as +0) for
    # min, max and top-k, the raw bits for a > 0 and the bits of |a| for the rest. No float
    # comparison, so a flush-to-zero mode cannot change a subnormal's count.
    pid_u = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_u * BU + tl.arange(0, BU)  # [BU]
    col_ok = cols < u
    crit = tl.arange(0, CP)
    krow = tl.arange(0, KP)
    lowest_key = -9223372036854775808  # below every candidate key
    floor_bits = tl.load(floor_ptr + cols, mask=col_ok, other=float("inf")).to(tl.int32, bitcast=True)
    floor = tl.where((floor_bits & 0x7FFFFFFF) == 0, 0, tl.where(floor_bits >= 0, floor_bits, floor_bits ^ 0x7FFFFFFF))
    acc_t = tl.float64 if F64 else tl.float32
    cnt = tl.zeros([BU], dtype=tl.int32)
    mean = tl.zeros([BU], dtype=tl.float64)
    m2 = tl.zeros([BU], dtype=tl.float64)
    lo = tl.full([BU], 2147483647, dtype=tl.int32)
    hi = tl.full([BU], -2147483647 - 1, dtype=tl.int32)
    fired = tl.zeros([CP, BU], dtype=tl.int32)
    hist = tl.zeros([NBP], dtype=tl.int32)
    best = tl.full([KP, BU], lowest_key, dtype=tl.int64)  # candidate keys, descending
    start = pid_r * rows
    end = tl.minimum(start + rows, n)
    for r0 in range(start, end, BN):
        row = r0 + tl.arange(0, BN)  # [BN]
        ok = (row < end)[:, None] & col_ok[None, :]  # [BN, BU]
        v = tl.load(x_ptr + row[:, None].to(tl.int64) * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        bits = v.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF  # the bits of |v|
        fin = ok & (mag < 0x7F800000)
        ordered = tl.where(mag == 0, 0, tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF))
        # moments: the tile's mean m0, then the sums of the deviations d = x - m0 and of their
        # squares (the corrected two-pass algorithm, from registers); the tile's mean is
        # m0 + S/n and its M2 is sum d^2 - S^2/n, both formed in float64, then Chan's merge
        n_t = tl.sum(fin.to(tl.int32), axis=0)  # [BU]
        n_f = tl.maximum(n_t, 1).to(tl.float64)
        va = tl.where(fin, v, 0.0).to(acc_t)
        m0 = tl.sum(va, axis=0) / tl.maximum(n_t, 1).to(acc_t)
        dev = tl.where(fin, va - m0[None, :], 0.0)
        s_d = tl.sum(dev, axis=0).to(tl.float64)
        m2_t = tl.maximum(tl.sum(dev * dev, axis=0).to(tl.float64) - s_d * s_d / n_f, 0.0)
        total = cnt + n_t
        w_t = n_t.to(tl.float64) / tl.maximum(total, 1).to(tl.float64)
        delta = m0.to(tl.float64) + s_d / n_f - mean
        mean = mean + delta * w_t
        m2 = m2 + m2_t + delta * delta * cnt.to(tl.float64) * w_t
        cnt = total
        lo = tl.minimum(lo, tl.min(tl.where(fin, ordered, 2147483647), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(fin, ordered, -2147483647 - 1), axis=0))
        # the ladder: criterion 0 is a > 0 (signed bits > 0), c > 0 is |a| > eps[c - 1]
        token = tl.zeros([BN, CP], dtype=tl.int32)
        for c in tl.static_range(CRITERIA):
            t = tl.load(thr_ptr + c)
            above = (fin & ((bits if c == 0 else mag) > t)).to(tl.int32)
            fired += tl.where(crit[:, None] == c, tl.sum(above, axis=0)[None, :], 0)
            token += tl.where(crit[None, :] == c, tl.sum(above, axis=1)[:, None], 0)
        tl.atomic_add(token_fired_ptr + row[:, None] * CRITERIA + crit[None, :], token,
                      mask=(row < end)[:, None] & (crit < CRITERIA)[None, :])
        # the |a| histogram: the C kernel's exact tables, compared on bits
        s0 = tl.load(key_ptr + (mag >> key_shift), mask=ok, other=0)
        step = tl.load(next_ptr + s0, mask=ok, other=0)
        slot = tl.minimum(s0 + (mag >= step).to(tl.int32), n_slots - 1)
        hist += tl.histogram(tl.reshape(slot, [BN * BU]), NBP, mask=tl.reshape(ok, [BN * BU]))
        # top-k: finite values above the unit's floor and above the k-th candidate kept here
        kth = tl.max(tl.where(krow[:, None] == K - 1, best, lowest_key), axis=0)  # [BU]
        bar = tl.where(kth == lowest_key, floor, tl.maximum(floor, (kth >> 32).to(tl.int32)))
        enter = fin & (ordered > bar[None, :])
        if tl.sum(enter.to(tl.int32)) > 0:
            keys = tl.where(enter, (ordered.to(tl.int64) << 32) | (4294967295 - row[:, None].to(tl.int64)), lowest_key)
            kept = best
            best = tl.full([KP, BU], lowest_key, dtype=tl.int64)
            for r in tl.static_range(K):
                top = tl.maximum(tl.max(kept, axis=0), tl.max(keys, axis=0))  # [BU]
                best = tl.where(krow[:, None] == r, top[None, :], best)
                kept = tl.where(kept == top[None, :], lowest_key, kept)
                keys = tl.where(keys == top[None, :], lowest_key, keys)
    out = pid_r * u + cols
    tl.store(count_ptr + out, cnt, mask=col_ok)
    tl.store(mean_ptr + out, mean, mask=col_ok)
    tl.store(m2_ptr + out, m2, mask=col_ok)
    lo_bits = tl.where(lo >= 0, lo, lo ^ 0x7FFFFFFF)
    hi_bits = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
    tl.store(min_ptr + out, tl.where(cnt > 0, lo_bits.to(tl.float32, bitcast=True), float("inf")), mask=col_ok)
    tl.store(max_ptr + out, tl.where(cnt > 0, hi_bits.to(tl.float32, bitcast=True), float("-inf")), mask=col_ok)
    tl.store(fired_ptr + pid_r * CRITERIA * u + crit[:, None] * u + cols[None, :], fired,
             mask=(crit < CRITERIA)[:, None] & col_ok[None, :])
    bins = tl.arange(0, NBP)
    tl.store(slots_ptr + (pid_r * tl.num_programs(0) + pid_u) * NBP + bins, hist)
    tl.store(keys_ptr + pid_r * KP * u + krow[:, None] * u + cols[None, :], best, mask=col_ok[None, :])


_BUILT: dict[bool, Any] = {}


def _kernels() -> Any:
    """The kernel, made with ``triton.jit`` in the mode in force now (compiled or interpreted)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret not in _BUILT:
        import triton
        import triton.language as language

        globals()["tl"] = language  # the body's annotations and calls resolve `tl` here
        _BUILT[interpret] = triton.jit(_site_kernel)
    return _BUILT[interpret]
