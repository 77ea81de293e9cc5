"""Row-selective matrix products: the two primitives sparse MLP execution is built from.

Weights are laid out once (at calibration time) so that every unit that can be skipped owns one
contiguous row; a product then reads only the rows of the active units.

* ``dot_rows(x, w, index)``  → ``x @ w[index].T``   — outputs of the selected units only
  (up/gate projections with the unit as output; ``w`` is ``[units, d_in]``).
* ``axpy_rows(h, w, index)`` → ``h @ w[index]``     — a sum of selected rows weighted by ``h``
  (down projections, or any projection whose *input* is sparse; ``w`` is ``[units, d_out]``,
  i.e. the transposed weight).

Two implementations with the same signatures and results (to float rounding):

* ``reference_dot_rows`` / ``reference_axpy_rows``: plain PyTorch, which gathers (copies) the
  selected rows and multiplies. Any dtype, device and autograd.
* A C kernel (``_kernels.c``) compiled on first use with the system C compiler (``-O3
  -march=native``: it is built on the machine that runs it) and cached under
  ``$ACTSCOPE_CACHE/kernels``, with the build helper of ``actscope.stats.fused``. It reads the
  selected rows in place, each once per block of up to 8 tokens, on ``torch.get_num_threads()``
  threads (a persistent pthreads pool that never waits for a descheduled thread; see the C
  file). Its results equal the reference to float32 rounding (summation order differs) and
  are deterministic.

``dot_rows`` / ``axpy_rows`` take the C kernel when it applies and pays: CPU float32, rows
contiguous in memory (``w.stride(1) == 1``), no autograd, and few tokens (``n <=
MAX_KERNEL_TOKENS``, decoding; for prefill-sized batches torch's GEMM on the gathered rows is
faster, as measured by ``benchmarks/sparse_decode.py --kernels``). CUDA tensors (fp32/fp16/bf16,
up to ``MAX_TRITON_TOKENS`` tokens) take the Triton kernels of ``triton_rows.py`` where Triton is
installed, which also provide ``threshold_axpy_rows`` (TEAL's thresholded input-sparse product,
thresholding fused). Everything else — bf16/fp16 on the CPU, transposed weight views, long
prompts, no C compiler or no Triton, or ``ACTSCOPE_SPARSE_KERNEL=0`` — takes the reference path.
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from actscope.errors import InputError


SOURCE = "_kernels.c"
# Up to this many tokens the C kernel beats gather + GEMM: it reads each row once per 8 tokens,
# so its traffic grows with n, while the gather copies every row once. Measured on a 2-core
# AVX-512 machine with benchmarks/sparse_decode.py --kernels: C ahead at 16 tokens in every run
# (up to 2x), at 32-64 in some runs and behind in others. Longer prompts take the GEMM.
MAX_KERNEL_TOKENS = 16
# -O3 -march=native: the library is built on the machine that runs it (the CPU's flags are part
# of its cache name); the plainer sets are for compilers that refuse -march=native.
def _prefetch_flags() -> list[str]:
    """Intel CPUs: prefetch the next rows into every cache level (``_kernels.c``,
    PREFETCH_LOCALITY: the non-temporal hint halves the row kernels' rate there; measured on a
    Xeon, docs/benchmarks.md). Other CPUs keep the default the kernels were tuned with."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            intel = "GenuineIntel" in info.read(4096)
    except OSError:
        intel = False
    return ["-DPREFETCH_LOCALITY=3"] if intel else []


FLAG_SETS = tuple([*flags, *_prefetch_flags()] for flags in (["-pthread", "-O3", "-march=native"], ["-pthread", "-O3"],
                                                            ["-pthread", "-O2"]))
_FUNCTIONS = ("actscope_dot_rows", "actscope_axpy_rows")  # one signature; actscope_threshold_axpy_rows has its own


# ---- reference (plain PyTorch: gathers the rows) -------------------------------------------

def reference_dot_rows(x: Tensor, w: Tensor, index: Tensor) -> Tensor:
    """``x [n, d_in]``, ``w [units, d_in]``, ``index [k]`` (int64) → ``[n, k]``."""
    return x @ w.index_select(0, index).T


def reference_axpy_rows(h: Tensor, w: Tensor, index: Tensor) -> Tensor:
    """``h [n, k]``, ``w [units, d_out]``, ``index [k]`` (int64) → ``[n, d_out]``."""
    return h @ w.index_select(0, index)


def reference_threshold_axpy_rows(x: Tensor, w: Tensor, threshold: Tensor | float) -> Tensor:
    """``x [n, d_in]``, ``w [d_in, d_out]`` → ``where(|x| > threshold, x, 0) @ w`` (every row read)."""
    return torch.where(x.abs() > threshold, x, 0) @ w


# ---- public primitives ---------------------------------------------------------------------

def dot_rows(x: Tensor, w: Tensor, index: Tensor) -> Tensor:
    """``x [n, d_in]``, ``w [units, d_in]``, ``index [k]`` (int64) → ``x @ w[index].T``, ``[n, k]``."""
    if not _kernel_applies(x, w, index):
        out = _triton_rows("dot_rows", x, w, index)
        return out if out is not None else reference_dot_rows(x, w, index)
    if x.shape[1] != w.shape[1]:
        raise _shape_error("dot_rows", x, w, index, "w.shape[1] (d_in)", w.shape[1])
    out = torch.empty((x.shape[0], index.shape[0]), dtype=torch.float32)
    _call(_library.actscope_dot_rows, _rows_contiguous(x), w, index, out, w.shape[1])
    return out


def axpy_rows(h: Tensor, w: Tensor, index: Tensor) -> Tensor:
    """``h [n, k]``, ``w [units, d_out]``, ``index [k]`` (int64) → ``h @ w[index]``, ``[n, d_out]``."""
    if not _kernel_applies(h, w, index):
        out = _triton_rows("axpy_rows", h, w, index)
        return out if out is not None else reference_axpy_rows(h, w, index)
    if h.shape[1] != index.shape[0]:
        raise _shape_error("axpy_rows", h, w, index, "index.shape[0] (k)", index.shape[0])
    out = torch.empty((h.shape[0], w.shape[1]), dtype=torch.float32)
    _call(_library.actscope_axpy_rows, _rows_contiguous(h), w, index, out, w.shape[1])
    return out


def threshold_axpy_rows(x: Tensor, w: Tensor, threshold: Tensor | float) -> Tensor:
    """TEAL's input-sparse product ``where(|x| > threshold, x, 0) @ w`` (``w`` the transposed
    weight ``[d_in, d_out]``); on CUDA a Triton kernel that reads only the rows of channels above
    the threshold for some token, with no index built on the host (no synchronisation)."""
    out = _triton_rows("threshold_axpy_rows", x, w, threshold)
    return out if out is not None else reference_threshold_axpy_rows(x, w, threshold)


def fused_threshold_axpy(x: Tensor, w: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor, int] | None:
    """TEAL's input-sparse product with what sparse execution tallies, in one C call:
    ``(where(|x| > threshold, x, 0) @ w, kept [n] int64: the channels each row of x kept, k: the
    rows of w read, their union)``; the kernel finds the union and masks each row in one pass over
    ``x`` and streams the union's rows. None where it does not apply (not the CPU float32 case of
    :func:`axpy_rows`'s kernel, or a threshold of more than one value): the caller then builds the
    index in torch (``sparse/forwards._thresholded``)."""
    if not (_rows_apply(x, w) and w.shape[0] == x.shape[1] and threshold.numel() == 1):
        return None
    return _fused_threshold_axpy(_rows_contiguous(x), w, float(threshold))


def _fused_threshold_axpy(x: Tensor, w: Tensor, threshold: float) -> tuple[Tensor, Tensor, int]:
    n, d_in = x.shape
    index = torch.empty(d_in, dtype=torch.int64)
    h = torch.empty((n, d_in), dtype=torch.float32)
    kept = torch.empty(n, dtype=torch.int64)
    union = ctypes.c_int64(0)
    out = torch.empty((n, w.shape[1]), dtype=torch.float32)
    status = _library.actscope_threshold_axpy_rows(
        x.data_ptr(), n, x.stride(0), w.data_ptr(), d_in, w.stride(0), w.shape[1], threshold, index.data_ptr(),
        h.data_ptr(), kept.data_ptr(), ctypes.byref(union), out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"sparse kernel actscope_threshold_axpy_rows failed with status {status}")
    return out, kept, union.value


def kernel_enabled() -> bool:
    """True when the C kernel is switched on (``ACTSCOPE_SPARSE_KERNEL`` is not ``0``) and built."""
    return os.environ.get("ACTSCOPE_SPARSE_KERNEL", "1") != "0" and library() is not None


_F32, _I64 = torch.float32, torch.int64
_library: Any = None  # set by library(); read directly on the hot path


def _kernel_applies(a: Tensor, w: Tensor, index: Tensor) -> bool:
    return index.dtype is _I64 and index.is_cpu and index.dim() == 1 and _rows_apply(a, w)


def _rows_apply(a: Tensor, w: Tensor) -> bool:
    # This runs once per projection per decoded token, so it is a single cheap expression.
    return (
        a.dtype is _F32 and w.dtype is _F32
        and a.is_cpu and w.is_cpu
        and a.dim() == 2 and w.dim() == 2
        and 0 < a.shape[0] <= MAX_KERNEL_TOKENS
        and w.stride(1) == 1 and w.stride(0) >= w.shape[1]  # rows readable in place
        and not ((a.requires_grad or w.requires_grad) and torch.is_grad_enabled())
        and kernel_enabled()
    )


# CUDA tensors: the Triton kernels (sparse/triton_rows.py) up to this many tokens; longer
# prompts take the reference (gather + cuBLAS GEMM). benchmarks/gpu_check.py times both.
MAX_TRITON_TOKENS = 16
TRITON_ON_CPU = False  # tests set it (with triton_rows.applies) to run the kernels interpreted


def _triton_rows(name: str, a: Tensor, w: Tensor, third: Any) -> Tensor | None:
    """The Triton kernel's result for CUDA tensors; None where it does not apply (or failed)."""
    if not (a.is_cuda or TRITON_ON_CPU) or a.dim() != 2 or not 0 < a.shape[0] <= MAX_TRITON_TOKENS:
        return None
    if os.environ.get("ACTSCOPE_SPARSE_KERNEL", "1") == "0":
        return None
    from . import triton_rows

    return triton_rows.run(name, a, w, third)


def _shape_error(name: str, a: Tensor, w: Tensor, index: Tensor, inner_name: str, inner: int) -> InputError:
    return InputError(
        f"{name}: the input has {a.shape[1]} columns (shape {tuple(a.shape)}) but {inner_name} is "
        f"{inner} (w {tuple(w.shape)}, index {tuple(index.shape)}); pass matching shapes"
    )


def _rows_contiguous(a: Tensor) -> Tensor:
    """The kernel reads rows with a leading stride; a small activation block is copied otherwise."""
    return a if a.stride(1) == 1 and a.stride(0) >= a.shape[1] else a.contiguous()


def _call(function: Any, a: Tensor, w: Tensor, index: Tensor, out: Tensor, width: int) -> None:
    if not index.is_contiguous():
        index = index.contiguous()
    status = function(
        a.data_ptr(), a.shape[0], a.stride(0), w.data_ptr(), w.shape[0], w.stride(0), width,
        index.data_ptr(), index.shape[0], out.data_ptr(), torch.get_num_threads(),
    )
    if status == -3:
        bad = index[(index < 0) | (index >= w.shape[0])][:5].tolist()
        raise InputError(
            f"{function.__name__[9:]}: index values {bad} are outside the {w.shape[0]} rows of w; "
            f"pass indices in [0, {w.shape[0]})"
        )
    if status != 0:
        raise RuntimeError(f"sparse kernel {function.__name__} failed with status {status}")


# ---- build and load ------------------------------------------------------------------------

def kernel_info() -> str:
    """How the kernel runs here, for reports: e.g. 'C, pthreads pool' or 'unavailable'."""
    if os.environ.get("ACTSCOPE_SPARSE_KERNEL", "1") == "0":
        return "off (ACTSCOPE_SPARSE_KERNEL=0): torch gather"
    return "C, pthreads pool" if library() is not None else "unavailable (no C compiler): torch gather"


@lru_cache(maxsize=1)
def library() -> Any:
    """The compiled kernel, building it into the cache on first use; None when impossible."""
    from actscope.native import compiled_library

    global _library
    lib = compiled_library("actscope.sparse", SOURCE, "sparse_rows", FLAG_SETS, "sparse products use the pure-torch gather")
    _library = _declare(lib) if lib is not None else None
    return _library


def _declare(lib: Any) -> Any:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for name in _FUNCTIONS:
        function = getattr(lib, name)
        function.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, ptr, ctypes.c_int32]
        function.restype = ctypes.c_int
    fused = lib.actscope_threshold_axpy_rows
    fused.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ctypes.c_float, ptr, ptr, ptr, ptr, ptr, ctypes.c_int32]
    fused.restype = ctypes.c_int
    return lib
