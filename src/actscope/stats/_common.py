"""Plumbing shared by the accumulators: input checks, the prepared batch, state-dict checks,
where the state lives.

Every accumulator takes the same input: ``x`` of shape ``[N, U]`` (the N real tokens of a site,
padding already removed, U units) and optionally ``tok``, the ``[N]`` global token ids. The input
is checked and converted *once* per update (:func:`prepare`), so that a site bundle
(:class:`~actscope.stats.site.SiteStats`) pays the conversion and the finiteness test once for
all its statistics.

Devices and precision. An accumulator's state lives where its activations are: on the device of
the latest update (:func:`place`), so that no update copies anything to the host, and its results
and ``state_dict()`` gather it to the CPU once, when read. The work dtype of a batch
(:class:`Batch`) is float64 on the CPU (cheap there) and for float64 input; on other devices
(GPUs, where float64 arithmetic and float64 copies of ``[N, U]`` are slow) it is float32, which
holds every float32, float16 and bfloat16 value exactly, so comparisons (firing, histogram
slots, top-k) stay exact and only sums round: they are taken in blocks of :data:`BLOCK` rows in
float32 and the block sums added in float64 (:func:`column_sum`), which bounds the error of
each column sum by ``γ(BLOCK − 1) · Σ|x|`` (``γ(k) = k·u / (1 − k·u)``, ``u = 2**-24``)
whatever the number of rows.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from actscope.errors import InputError

F64 = torch.float64
F32 = torch.float32
I64 = torch.int64
STATE_VERSION = 1
# Devices whose batches are widened to float64; on the others the work dtype is float32.
FLOAT64_DEVICES = ("cpu",)
BLOCK = 32  # rows per float32 partial sum (see column_sum)
UNIT_ROUNDOFF = 2.0**-24  # float32's u


def compute_device(t: Tensor) -> torch.device:
    """The device on which one update's reductions run (and the accumulator's state lives)."""
    # Reducing on the accelerator and keeping the state there is far cheaper than copying
    # [N, U] activations; backends without float64 (MPS, ...) reduce on the CPU.
    return t.device if t.device.type in ("cpu", "cuda") else torch.device("cpu")


def work_dtype(t: Tensor) -> torch.dtype:
    """float64 on the CPU and for float64 input, float32 elsewhere (see the module docstring)."""
    return F64 if t.dtype == F64 or t.device.type in FLOAT64_DEVICES else F32


def sum_error_bound(abs_sum: Tensor) -> Tensor:
    """The bound on :func:`column_sum`'s error for float32 input whose ``Σ|x|`` is ``abs_sum``."""
    k = BLOCK - 1
    gamma = k * UNIT_ROUNDOFF / (1 - k * UNIT_ROUNDOFF)
    return gamma * abs_sum.to(F64) * (1 + 1e-9)  # the float64 additions of up to ~10**7 block sums


def column_sum(x: Tensor) -> Tensor:
    """``x.sum(0)`` in float64 (``[U]``): float64 input directly; float32 input in float32
    blocks of :data:`BLOCK` rows, the block sums added in float64 (no float64 copy of ``x``)."""
    if x.dtype == F64:
        return x.sum(0)
    n, u = x.shape
    full = n - n % BLOCK
    total = x[:full].reshape(full // BLOCK, BLOCK, u).sum(1).to(F64).sum(0)  # [U]
    if full < n:
        total = total + x[full:].sum(0).to(F64)
    return total


def place(owner: Any, names: tuple[str, ...], device: torch.device) -> None:
    """Move ``owner``'s state tensors ``names`` to ``device`` (once: they then stay there)."""
    first = getattr(owner, names[0])
    if first.device != device:
        for name in names:
            setattr(owner, name, getattr(owner, name).to(device))


def gathered(t: Tensor) -> Tensor:
    """A CPU copy of a state tensor, for results and state dicts (the one transfer)."""
    return t.detach().to("cpu", copy=True)


class Batch:
    """One update's real tokens, prepared once and shared by all accumulators of a site."""

    __slots__ = ("raw", "x", "col_sum", "finite", "tok", "_abs")

    def __init__(self, raw: Tensor, tok: Tensor | None):
        self.raw = raw  # [N, U] input dtype, on the compute device
        self.x = raw.to(work_dtype(raw))  # [N, U] float64, or float32 holding raw exactly
        self.col_sum = column_sum(self.x)  # [U] float64; the moments need it anyway
        # A NaN/±Inf entry makes its column's sum non-finite, so this cheap [U] test stands in
        # for an [N, U] isfinite pass on clean data. Only then is the mask built (an overflowing
        # sum of finite values also lands there, and is found to need no mask).
        self.finite = None  # [N, U] bool, or None when every entry is finite
        if not bool(torch.isfinite(self.col_sum).all()):
            finite = torch.isfinite(raw)
            self.finite = None if bool(finite.all()) else finite
        self.tok = tok  # [N] int64 on the compute device, or None
        self._abs: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def wide(self) -> bool:
        """Whether the work dtype is float64 (else float32, exact for the input)."""
        return self.x.dtype == F64

    def widened(self) -> Batch:
        """This batch with float64 work (for the rare float32 sums that overflow)."""
        batch = Batch.__new__(Batch)
        batch.raw, batch.x, batch.finite, batch.tok = self.raw, self.raw.to(F64), self.finite, self.tok
        batch.col_sum, batch._abs = batch.x.sum(0), None
        return batch

    @property
    def abs(self) -> Tensor:
        """``|x|`` in the work dtype, computed on first use and shared by the accumulators."""
        if self._abs is None:
            self._abs = self.x.abs()
        return self._abs

    @property
    def n_rows(self) -> int:
        return self.x.shape[0]

    @property
    def n_units(self) -> int:
        return self.x.shape[1]


def count_true(mask: Tensor, dim: int) -> Tensor:
    """Number of True entries of ``mask`` along ``dim``, as int64."""
    # Summing the bools as bytes into int32 is several times faster than a bool -> int64 sum;
    # one update never has 2**31 rows or units.
    return mask.view(torch.uint8).sum(dim, dtype=torch.int32).to(I64)


def check_n_units(
    n_units: Any, who: str, name: str = "n_units", hint: str = "n_units=x.shape[-1]"
) -> int:
    """``n_units`` (or n_heads) as a positive int, or an InputError saying what to pass."""
    try:
        if isinstance(n_units, bool):
            raise TypeError
        value = operator.index(n_units)
    except TypeError:
        raise InputError(
            f"{who}: {name} must be an int, got {n_units!r} ({type(n_units).__name__}); "
            f"pass the size of the site's unit dimension, e.g. {hint}."
        ) from None
    if value < 1:
        raise InputError(
            f"{who}: {name} must be at least 1, got {value}; pass the size of the site's "
            f"unit dimension, e.g. {hint}."
        )
    return value


def check_activations(x: Any, n_units: int | None, who: str) -> None:
    """Raise InputError unless ``x`` is a floating tensor ``[N, U]`` with ``U == n_units``."""
    if not isinstance(x, Tensor):
        raise InputError(
            f"{who}.update: x must be a torch.Tensor of shape [N, U], got {type(x).__name__}; "
            "convert it with torch.as_tensor."
        )
    if x.ndim != 2:
        raise InputError(
            f"{who}.update: x must have shape [N, U] (real tokens x units), got shape "
            f"{tuple(x.shape)}; flatten batch and position and drop padding first, e.g. x[mask] "
            "for x of shape [B, T, U] and a bool mask of shape [B, T]."
        )
    if not x.is_floating_point():
        raise InputError(
            f"{who}.update: x must have a floating dtype, got {x.dtype}; convert it with x.float()."
        )
    if n_units is not None and x.shape[1] != n_units:
        raise InputError(
            f"{who}.update: this accumulator was built for {n_units} units but x has "
            f"{x.shape[1]} (shape {tuple(x.shape)}); use one accumulator per site, built with "
            "n_units=x.shape[-1]."
        )


def check_tok(tok: Any, n_rows: int, who: str, required: bool) -> None:
    """Raise InputError unless ``tok`` is an integer tensor ``[N]`` (or None where allowed)."""
    if tok is None:
        if required:
            raise InputError(
                f"{who}.update: tok is required (the top examples record where each value "
                "occurred); pass tok, an int64 tensor [N] of global token ids of the rows of x."
            )
        return
    if not isinstance(tok, Tensor) or tok.ndim != 1 or tok.shape[0] != n_rows:
        shape = tuple(tok.shape) if isinstance(tok, Tensor) else type(tok).__name__
        raise InputError(
            f"{who}.update: tok must be a tensor of shape [N] = [{n_rows}] (one global token id "
            f"per row of x), got {shape}; select it with the same mask as x."
        )
    if tok.is_floating_point() or tok.is_complex() or tok.dtype == torch.bool:
        raise InputError(
            f"{who}.update: tok must hold integer token ids, got dtype {tok.dtype}; "
            "convert it with tok.long()."
        )
    if n_rows and bool((tok < 0).any()):
        raise InputError(
            f"{who}.update: tok must hold token ids >= 0 (-1 marks padding in the results), "
            f"got min {int(tok.min())}; number tokens from 0."
        )


def prepare(
    x: Any, tok: Any, n_units: int | None, who: str, need_tok: bool = False
) -> Batch | None:
    """Check one update's input and prepare it; None for an empty update (N = 0)."""
    check_activations(x, n_units, who)
    check_tok(tok, x.shape[0], who, need_tok)
    if x.shape[0] == 0:
        return None
    device = compute_device(x)
    raw = x.detach().to(device)
    tok64 = None if tok is None else tok.detach().to(device=device, dtype=I64)
    return Batch(raw, tok64)


def check_other(self: Any, other: Any, fields: tuple[str, ...]) -> None:
    """Raise InputError unless ``other`` is the same kind of accumulator with the same setup."""
    who = type(self).__name__
    if not isinstance(other, type(self)):
        raise InputError(
            f"{who}.merge: can only merge another {who}, got {type(other).__name__}."
        )
    for name in fields:
        mine, theirs = getattr(self, name), getattr(other, name)
        if mine != theirs:
            raise InputError(
                f"{who}.merge: {name} differs ({mine!r} here, {theirs!r} in the other); only "
                f"accumulators built with the same {name} can be merged."
            )


def check_state(sd: Any, kind: str, keys: tuple[str, ...]) -> None:
    """Raise InputError unless ``sd`` looks like a state dict written by ``kind``."""
    if not isinstance(sd, Mapping):
        raise InputError(
            f"{kind}: a state dict must be a dict returned by state_dict(), got "
            f"{type(sd).__name__}."
        )
    if sd.get("kind") != kind:
        raise InputError(
            f"this state dict was written by {sd.get('kind')!r}, not {kind!r}; load it with "
            "the from_state_dict of the class that wrote it."
        )
    if sd.get("version") != STATE_VERSION:
        raise InputError(
            f"{kind}: state dict version {sd.get('version')!r} is not supported (this actscope "
            f"writes version {STATE_VERSION}); recompute the statistics with this version."
        )
    missing = [key for key in keys if key not in sd]
    if missing:
        raise InputError(
            f"{kind}: the state dict lacks {missing}; it is incomplete or was not written by "
            f"{kind}.state_dict()."
        )


def state_header(kind: str) -> dict[str, Any]:
    return {"kind": kind, "version": STATE_VERSION}


def state_tensor(sd: Mapping, key: str, dtype: torch.dtype, shape: tuple, kind: str) -> Tensor:
    """A CPU copy of ``sd[key]`` after checking its dtype and shape."""
    t = sd[key]
    if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise InputError(
            f"{kind}: state_dict[{key!r}] must be a {dtype} tensor of shape {tuple(shape)}, "
            f"got {got}; the state is corrupt or belongs to an accumulator of another size."
        )
    return t.detach().to("cpu", copy=True)


def state_int(sd: Mapping, key: str, kind: str, minimum: int = 0) -> int:
    """``sd[key]`` as an int >= minimum (tensors of one element are accepted too)."""
    value = sd[key]
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(
            f"{kind}: state_dict[{key!r}] must be an int >= {minimum}, got {value!r}; the "
            "state is corrupt."
        )
    return value


def nan_where_empty(values: Tensor, count: Tensor) -> Tensor:
    """``values`` with NaN where ``count == 0`` (a statistic of nothing is undefined)."""
    return torch.where(count > 0, values, math.nan)


def safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` in float64, NaN where ``den == 0``."""
    return nan_where_empty(num.to(F64) / den.clamp(min=1).to(F64), den)


def check_state_config(sd: Mapping, kind: str, **expected: Any) -> None:
    """Raise InputError unless the state's setup (n_units, eps, k, ...) equals this object's."""
    for key, mine in expected.items():
        theirs = sd[key]
        if isinstance(mine, tuple) and isinstance(theirs, (list, tuple)):
            theirs = tuple(theirs)  # lists survive serialisation better than tuples
        if theirs != mine:
            short = kind.rsplit(".", 1)[-1]
            raise InputError(
                f"{kind}: the state dict has {key}={theirs!r} but this accumulator has "
                f"{key}={mine!r}; build a new one with {short}.from_state_dict(sd) instead."
            )
