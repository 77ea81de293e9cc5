"""Row-selective products for CUDA tensors, in Triton: sparse decoding on a GPU.

The same primitives as the C kernel of :mod:`actscope.sparse.kernels`, which dispatches to them
for CUDA tensors, plus one with the threshold fused in:

* ``dot_rows(x, w, index)``  → ``x @ w[index].T`` ``[n, k]`` — outputs of the selected units
  (``w`` ``[units, d_in]``: up/gate rows);
* ``axpy_rows(h, w, index)`` → ``h @ w[index]`` ``[n, d_out]`` — a sum of selected rows
  (``w`` ``[units, d_out]``: the down projection transposed, or any projection whose *input*
  is sparse, laid out transposed once so that an input channel owns one contiguous row);
* ``threshold_axpy_rows(x, w, threshold)`` → ``where(|x| > t, x, 0) @ w`` — TEAL's input-sparse
  GEMV (q, k, v, o, gate, up, down with ``w`` the transposed weight ``[d_in, d_out]``): each
  program thresholds its slice of ``x`` itself and loads only the rows of channels active for
  some token (the union, each token masked to its own), so no index is built on the host and
  nothing waits for the GPU: the call can be captured in a CUDA graph.

fp16, bf16 and fp32; products accumulate in float32 and are returned in the input's dtype. Batch
1 and small batches (up to ``MAX_TOKENS`` tokens per launch; more are cut into launches).

Design: memory-bound, so each selected weight row is read once per launch, in contiguous
segments of ``BD`` values (256 bytes of bf16). ``axpy`` splits the selected rows between
programs (``split``) when the output alone has too few column blocks to keep every
multiprocessor busy; the programs' float32 partial sums are then added with atomics (their order
varies: the result is deterministic to float32 rounding, not bit for bit), otherwise each
program stores its block directly. An index outside ``[0, rows of w)`` reads nothing (its term
is 0): the kernels never read out of bounds, and never synchronise to check.
"""
from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TOKENS = 16  # tokens per launch (the accumulators of one program stay in registers)
BD = 128  # output columns per axpy program
BK = 128  # input columns per dot step


tl: Any = None  # triton.language, bound by _kernels() on first use (importing this module never imports Triton)
_failed: list[str] = []  # the first compile/launch failure: the torch reference is used after it


def run(name: str, a: Tensor, w: Tensor, third: Any) -> Tensor | None:
    """``name(a, w, third)`` through the kernel where it applies (``applies``), else None; a
    compiler or driver failure is reported once and the caller's reference is used from then on."""
    if not (applies(a, w, third if name != "threshold_axpy_rows" else None) and enabled()):
        return None
    try:
        return _FUNCTIONS[name](a, w, third)
    except InputError:
        raise
    except Exception as error:
        if os.environ.get("ACTSCOPE_TRITON_STRICT") == "1":
            raise
        _failed.append(f"{type(error).__name__}: {error}")
        warnings.warn(f"actscope: the Triton sparse kernel failed ({_failed[0][:300]}); sparse products use the "
                      "torch gather from now on (ACTSCOPE_SPARSE_KERNEL=0 skips the kernels)", RuntimeWarning, stacklevel=3)
        return None


@lru_cache(maxsize=1)
def available() -> bool:
    """True when Triton imports (imported here on the first CUDA call only)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def enabled() -> bool:
    return not _failed and available()


def applies(a: Tensor, w: Tensor, index: Tensor | None = None) -> bool:
    """CUDA tensors on one device, one float dtype, rows of ``w`` contiguous, no autograd
    (``index`` None: the threshold product)."""
    return (
        a.is_cuda and w.is_cuda and a.device == w.device
        and a.dtype == w.dtype and a.dtype in DTYPES
        and a.dim() == 2 and w.dim() == 2 and w.stride(1) == 1
        and (index is None or (index.is_cuda and index.device == a.device and index.dim() == 1
                               and not index.is_floating_point()))
        and not ((a.requires_grad or w.requires_grad) and torch.is_grad_enabled())
        and cuda_runtime()
    )


@lru_cache(maxsize=1)
def cuda_runtime() -> bool:
    """A CUDA runtime is there (not only tensors that say they are on CUDA, as the tests'
    pretend devices on a CPU-only build)."""
    return torch.cuda.is_available()


def dot_rows(x: Tensor, w: Tensor, index: Tensor) -> Tensor:
    """``x [n, d_in]``, ``w [units, d_in]``, ``index [k]`` → ``x @ w[index].T``, ``[n, k]``."""
    if x.shape[1] != w.shape[1]:
        raise _shape_error("dot_rows", x, w, index.shape, "w.shape[1] (d_in)", w.shape[1])
    n, k = x.shape[0], index.shape[0]
    out = torch.empty((n, k), dtype=x.dtype, device=x.device)
    if n == 0 or k == 0:
        return out
    x = _rows(x)
    index = index.contiguous()
    bj = _dot_rows_per_program(k, x.device)
    kernel = _kernels()["dot"]
    for t0 in range(0, n, MAX_TOKENS):
        nt = min(MAX_TOKENS, n - t0)
        kernel[(_cdiv(k, bj),)](
            x[t0:], x.stride(0), nt, w, w.stride(0), w.shape[0], w.shape[1], index, k, out[t0:], out.stride(0),
            NT=_pow2(nt), BJ=bj, BK=BK,
        )
    return out


def axpy_rows(h: Tensor, w: Tensor, index: Tensor) -> Tensor:
    """``h [n, k]``, ``w [units, d_out]``, ``index [k]`` → ``h @ w[index]``, ``[n, d_out]``."""
    if h.shape[1] != index.shape[0]:
        raise _shape_error("axpy_rows", h, w, index.shape, "index.shape[0] (k)", index.shape[0])
    return _axpy(h, w, index.contiguous(), None)


def threshold_axpy_rows(x: Tensor, w: Tensor, threshold: Tensor | float) -> Tensor:
    """``x [n, d_in]``, ``w [d_in, d_out]`` → ``where(|x| > threshold, x, 0) @ w``, reading only
    the rows of ``w`` whose channel is above the threshold for some token. ``threshold``: a
    number, a one-element tensor or one per channel ``[d_in]``."""
    if x.shape[1] != w.shape[0]:
        raise _shape_error("threshold_axpy_rows", x, w, None, "w.shape[0] (d_in)", w.shape[0])
    if isinstance(threshold, Tensor):
        t = threshold.to(device=x.device, dtype=torch.float32).reshape(-1)
    else:  # a fill on the device: no host-to-device copy (capturable in a CUDA graph)
        t = torch.full((1,), float(threshold), dtype=torch.float32, device=x.device)
    if t.numel() not in (1, x.shape[1]):
        raise InputError(f"threshold_axpy_rows: threshold has {t.numel()} values; pass one, or one per input "
                         f"channel ({x.shape[1]})")
    return _axpy(x, w, None, t.contiguous())


_FUNCTIONS = {"dot_rows": dot_rows, "axpy_rows": axpy_rows, "threshold_axpy_rows": threshold_axpy_rows}


# ---- launching ---------------------------------------------------------------------------------

def _axpy(a: Tensor, w: Tensor, index: Tensor | None, threshold: Tensor | None) -> Tensor:
    n, d_out = a.shape[0], w.shape[1]
    k = index.shape[0] if index is not None else a.shape[1]
    if n == 0 or k == 0 or d_out == 0:
        return torch.zeros((n, d_out), dtype=a.dtype, device=a.device)
    a = _rows(a)
    bj = max(1, 32 // _pow2(min(n, MAX_TOKENS)))
    d_blocks = _cdiv(d_out, BD)
    split = _split(k, bj, d_blocks, a.device)
    chunk = _cdiv(_cdiv(k, split), bj) * bj
    split = _cdiv(k, chunk)
    atomic = split > 1
    out = torch.zeros((n, d_out), dtype=torch.float32, device=a.device) if atomic else \
        torch.empty((n, d_out), dtype=a.dtype, device=a.device)
    kernel = _kernels()["axpy"]
    dummy = w  # a pointer for the unused index / threshold argument
    for t0 in range(0, n, MAX_TOKENS):
        nt = min(MAX_TOKENS, n - t0)
        kernel[(d_blocks, split)](
            a[t0:], a.stride(0), nt, w, w.stride(0), w.shape[0], d_out,
            index if index is not None else dummy, k, chunk,
            threshold if threshold is not None else dummy, 1 if threshold is not None and threshold.numel() > 1 else 0,
            out[t0:], out.stride(0),
            NT=_pow2(nt), BJ=bj, BD=BD, HAS_INDEX=index is not None, HAS_THRESHOLD=threshold is not None,
            ATOMIC=atomic,
        )
    return out.to(a.dtype) if atomic and a.dtype != torch.float32 else out


def _rows(a: Tensor) -> Tensor:
    return a if a.stride(1) == 1 else a.contiguous()


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split(k: int, bj: int, d_blocks: int, device: torch.device) -> int:
    """Row chunks per column block: about four programs per multiprocessor, each at least four
    steps of ``bj`` rows long."""
    wanted = _cdiv(4 * _sms(device), d_blocks)
    return max(1, min(wanted, k // (4 * bj)))


def _dot_rows_per_program(k: int, device: torch.device) -> int:
    """Selected rows per dot program: 8, fewer when that leaves multiprocessors idle."""
    bj = 8
    while bj > 1 and _cdiv(k, bj) < 4 * _sms(device):
        bj //= 2
    return bj


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _shape_error(name: str, a: Tensor, w: Tensor, index: Any, inner_name: str, inner: int) -> InputError:
    shapes = f"w {tuple(w.shape)}" + (f", index {tuple(index)}" if index is not None else "")
    return InputError(
        f"{name}: the input has {a.shape[1]} columns (shape {tuple(a.shape)}) but {inner_name} is "
        f"{inner} ({shapes}); pass matching shapes"
    )


# ---- Triton source (made kernels on first use, in the mode in force then) ------------------------

def _dot_kernel(x_ptr, stride_x, n, w_ptr, stride_w, n_rows, d_in, idx_ptr, k, out_ptr, stride_o,
                NT: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    j = tl.program_id(0) * BJ + tl.arange(0, BJ)  # [BJ] positions in the selection
    j_ok = j < k
    r = tl.load(idx_ptr + j, mask=j_ok, other=0).to(tl.int64)
    r_ok = j_ok & (r >= 0) & (r < n_rows)  # an index out of range reads nothing
    t = tl.arange(0, NT)
    t_ok = t < n
    acc = tl.zeros([NT, BJ], dtype=tl.float32)
    for k0 in range(0, d_in, BK):
        c = k0 + tl.arange(0, BK)
        c_ok = c < d_in
        xv = tl.load(x_ptr + t[:, None] * stride_x + c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        wv = tl.load(w_ptr + r[:, None] * stride_w + c[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        acc += tl.sum(xv.to(tl.float32)[:, None, :] * wv.to(tl.float32)[None, :, :], axis=2)
    tl.store(out_ptr + t[:, None] * stride_o + j[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & j_ok[None, :])


def _axpy_kernel(a_ptr, stride_a, n, w_ptr, stride_w, n_rows, d_out, idx_ptr, k, chunk, thr_ptr, thr_stride,
                 out_ptr, stride_o,
                 NT: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr,
                 HAS_INDEX: tl.constexpr, HAS_THRESHOLD: tl.constexpr, ATOMIC: tl.constexpr):
    d = tl.program_id(0) * BD + tl.arange(0, BD)  # [BD] output columns
    d_ok = d < d_out
    t = tl.arange(0, NT)
    t_ok = t < n
    acc = tl.zeros([NT, BD], dtype=tl.float32)
    j0 = tl.program_id(1) * chunk
    for jb in range(j0, j0 + chunk, BJ):
        j = jb + tl.arange(0, BJ)  # [BJ] positions in the selection (or input channels)
        j_ok = j < k
        if HAS_INDEX:
            r = tl.load(idx_ptr + j, mask=j_ok, other=0).to(tl.int64)
        else:
            r = j.to(tl.int64)
        r_ok = j_ok & (r >= 0) & (r < n_rows)
        hv = tl.load(a_ptr + t[:, None] * stride_a + j[None, :], mask=t_ok[:, None] & j_ok[None, :], other=0.0)
        hv = hv.to(tl.float32)  # [NT, BJ]
        if HAS_THRESHOLD:
            limit = tl.load(thr_ptr + j * thr_stride, mask=j_ok, other=float("inf"))
            keep = tl.abs(hv) > limit[None, :]
            hv = tl.where(keep, hv, 0.0)
            r_ok = r_ok & (tl.max(keep.to(tl.int32), axis=0) > 0)  # the union over tokens
        wv = tl.load(w_ptr + r[:, None] * stride_w + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(hv[:, :, None] * wv.to(tl.float32)[None, :, :], axis=1)
    where = out_ptr + t[:, None] * stride_o + d[None, :]
    mask = t_ok[:, None] & d_ok[None, :]
    if ATOMIC:
        tl.atomic_add(where, acc, mask=mask)
    else:
        tl.store(where, acc.to(out_ptr.dtype.element_ty), mask=mask)


_BUILT: dict[bool, dict[str, Any]] = {}


def _kernels() -> dict[str, Any]:
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret not in _BUILT:
        import triton
        import triton.language as language

        globals()["tl"] = language
        _BUILT[interpret] = {"dot": triton.jit(_dot_kernel), "axpy": triton.jit(_axpy_kernel)}
    return _BUILT[interpret]
