"""One log-spaced histogram of |a|, pooled over all units of a site."""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from actscope.errors import InputError
from actscope.stats._common import (
    F64,
    I64,
    Batch,
    check_other,
    check_state,
    check_state_config,
    count_true,
    prepare,
    state_header,
    state_int,
    state_tensor,
)

# Bounds on lo/hi keep every edge inside float32's normal range: binning runs in float32.
_MIN_LO, _MAX_HI = 1e-30, 1e30
_MAX_BINS_PER_DECADE = 100


class AbsHistogram:
    """Histogram of ``|a|`` over every finite entry of a site (all units pooled).

    Bins are log-spaced: ``edges[i] = lo * 10 ** (i / bins_per_decade)`` from ``lo`` to ``hi``
    (``hi / lo`` must span a whole number of bins); bin ``i`` holds
    ``edges[i] <= |a| < edges[i + 1]``, the same as ``np.histogram`` with these edges for values
    below ``hi``. Outside the bins: ``zero`` (``|a| == 0``), ``underflow`` (``0 < |a| < lo``),
    ``overflow`` (``|a| >= hi``). NaN/±Inf entries are counted in ``nonfinite`` only. This is
    what threshold calibration reads (TEAL/CATS: the threshold for a target sparsity is a
    quantile of ``|a|``).

    ``update(x, tok=None)``: ``x`` is ``[N, U]`` (real tokens only, any U), ``tok`` is ignored.
    """

    KIND = "actscope.stats.AbsHistogram"
    _SETUP = ("lo", "hi", "bins_per_decade")  # what must match for a merge

    def __init__(self, lo: float = 1e-6, hi: float = 1e4, bins_per_decade: int = 8):
        self.lo, self.hi, self.bins_per_decade = _check_params(lo, hi, bins_per_decade)
        self.n_bins = _n_bins(self.lo, self.hi, self.bins_per_decade)
        self._log_lo = math.log10(self.lo)
        self._edges = _log_edges(self.lo, self.hi, self.bins_per_decade, self.n_bins)
        # Float32 binning is exact except within this distance (in bins) of an edge, where the
        # float64 values are re-binned against the edges themselves (see _slot_index).
        self._near_edge = 2e-4 * self.bins_per_decade
        self._floor = self.lo * 10 ** (-0.5 / self.bins_per_decade)  # mid-underflow, normal
        self._counts = torch.zeros(self.n_bins, dtype=I64)  # [n_bins]
        self.zero = 0
        self.underflow = 0
        self.overflow = 0
        self.nonfinite = 0

    @property
    def edges(self) -> Tensor:
        """``[n_bins + 1]`` float64 bin edges, ``edges[0] == lo`` and ``edges[-1] == hi``."""
        return self._edges.clone()

    @property
    def counts(self) -> Tensor:
        """``[n_bins]`` int64 counts of ``edges[i] <= |a| < edges[i + 1]``."""
        return self._counts.clone()

    @property
    def total(self) -> int:
        """Finite entries seen: ``zero + underflow + counts.sum() + overflow``."""
        return self.zero + self.underflow + int(self._counts.sum()) + self.overflow

    # -- streaming -------------------------------------------------------------------------
    def update(self, x: Tensor, tok: Tensor | None = None) -> None:
        """Add the real tokens ``x`` ``[N, U]``; ``tok`` is accepted and ignored."""
        batch = prepare(x, tok, None, "AbsHistogram")
        if batch is not None:
            self._update_batch(batch)

    def _update_batch(self, batch: Batch) -> None:
        a64 = batch.abs  # [N, U] float64
        a32 = batch.raw.abs().float()  # exact for float32/16 inputs; float64 is fixed up below
        if batch.finite is None:
            a64, a32 = a64.reshape(-1), a32.reshape(-1)
        else:
            a64, a32 = a64[batch.finite], a32[batch.finite]  # [M] finite entries only
        slots = torch.bincount(self._slot_index(a32, a64), minlength=self.n_bins + 2)
        n_zero = count_true(a64 == 0, 0)
        slots = torch.cat([slots, n_zero.view(1)]).cpu()  # one transfer
        zero = int(slots[-1])
        self.zero += zero
        self.underflow += int(slots[0]) - zero  # slot 0 holds |a| < lo, zeros included
        self._counts += slots[1:-2]
        self.overflow += int(slots[-2])
        self.nonfinite += batch.x.numel() - a64.numel()

    def _absorb(self, part: dict[str, Tensor]) -> None:
        """Add one batch's slots (from the fused kernel): zero, underflow, overflow,
        non-finite, then one count per bin."""
        slots = part["slots"]
        self.zero += int(slots[0])
        self.underflow += int(slots[1])
        self.overflow += int(slots[2])
        self.nonfinite += int(slots[3])
        self._counts += slots[4:]

    def _slot_index(self, a32: Tensor, a64: Tensor) -> Tensor:
        """Slot of each value: 0 below ``lo`` (zeros included), ``1 + bin``, ``n_bins + 1`` at
        or above ``hi``. ``a32`` is a scratch copy of the values and is overwritten."""
        # log10 in float32 is several times faster than torch.bucketize against the edges. Its
        # rounding can only move values lying within _near_edge of an edge, so those few are
        # re-binned exactly with bucketize on their float64 values. Values under lo are first
        # raised to half a bin below lo: they all underflow anyway, and log10 of zeros and
        # subnormals takes a slow path. In-place ops: fresh [N, U] buffers cost page faults.
        t = a32.clamp_(min=self._floor).log10_().sub_(self._log_lo).mul_(self.bins_per_decade)
        idx = t.floor()
        near = t.sub_(idx).sub_(0.5).abs_() > 0.5 - self._near_edge  # NaN (from +inf): not near
        idx = idx.clamp_(-1, self.n_bins).add_(1).to(torch.int32)
        if bool(near.any()):
            where = near.nonzero().squeeze(1)  # one scan of the mask, then cheap gathers
            edges = self._edges.to(a64.device)
            exact = torch.bucketize(a64.index_select(0, where), edges, right=True, out_int32=True)
            idx.index_copy_(0, where, exact)
        return idx

    def merge(self, other: AbsHistogram) -> AbsHistogram:
        """Add ``other``'s counts (in place; identical edges required); returns self."""
        check_other(self, other, self._SETUP)
        self._counts += other._counts
        self.zero += other.zero
        self.underflow += other.underflow
        self.overflow += other.overflow
        self.nonfinite += other.nonfinite
        return self

    # -- persistence -----------------------------------------------------------------------
    _STATE_KEYS = ("lo", "hi", "bins_per_decade", "counts", "zero", "underflow", "overflow",
                   "nonfinite")

    def state_dict(self) -> dict[str, Any]:
        """Plain floats, ints and one CPU tensor; ``from_state_dict`` rebuilds an equal one."""
        return {
            **state_header(self.KIND),
            "lo": self.lo,
            "hi": self.hi,
            "bins_per_decade": self.bins_per_decade,
            "counts": self._counts.clone(),
            "zero": self.zero,
            "underflow": self.underflow,
            "overflow": self.overflow,
            "nonfinite": self.nonfinite,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Replace this histogram's state by ``sd`` (same lo, hi, bins_per_decade required)."""
        check_state(sd, self.KIND, self._STATE_KEYS)
        check_state_config(
            sd, self.KIND, lo=self.lo, hi=self.hi, bins_per_decade=self.bins_per_decade
        )
        self._counts = state_tensor(sd, "counts", I64, (self.n_bins,), self.KIND)
        self.zero = state_int(sd, "zero", self.KIND)
        self.underflow = state_int(sd, "underflow", self.KIND)
        self.overflow = state_int(sd, "overflow", self.KIND)
        self.nonfinite = state_int(sd, "nonfinite", self.KIND)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> AbsHistogram:
        """A new histogram holding the state ``sd``."""
        check_state(sd, cls.KIND, cls._STATE_KEYS)
        acc = cls(sd["lo"], sd["hi"], sd["bins_per_decade"])
        acc.load_state_dict(sd)
        return acc

    def __repr__(self) -> str:
        return (
            f"AbsHistogram(lo={self.lo}, hi={self.hi}, bins_per_decade={self.bins_per_decade}, "
            f"total={self.total})"
        )


def _check_params(lo: Any, hi: Any, bins_per_decade: Any) -> tuple[float, float, int]:
    for name, value in (("lo", lo), ("hi", hi)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InputError(f"AbsHistogram: {name} must be a number, got {value!r}.")
    if not _MIN_LO <= lo < hi <= _MAX_HI:
        raise InputError(
            f"AbsHistogram: need {_MIN_LO:g} <= lo < hi <= {_MAX_HI:g}, got lo={lo!r}, "
            f"hi={hi!r}; the defaults lo=1e-6, hi=1e4 cover most activations."
        )
    if (
        isinstance(bins_per_decade, bool)
        or not isinstance(bins_per_decade, numbers.Integral)
        or not 1 <= bins_per_decade <= _MAX_BINS_PER_DECADE
    ):
        raise InputError(
            f"AbsHistogram: bins_per_decade must be an int in [1, {_MAX_BINS_PER_DECADE}], got "
            f"{bins_per_decade!r}."
        )
    return float(lo), float(hi), int(bins_per_decade)


def _n_bins(lo: float, hi: float, bins_per_decade: int) -> int:
    """Number of bins between lo and hi; hi / lo must span a whole number of them."""
    exact = bins_per_decade * math.log10(hi / lo)
    n = round(exact)
    if n < 1 or abs(exact - n) > 1e-6:
        good_hi = lo * 10 ** (max(n, 1) / bins_per_decade)
        raise InputError(
            f"AbsHistogram: lo={lo!r} to hi={hi!r} spans {exact:.4f} bins at "
            f"bins_per_decade={bins_per_decade}, not a whole number; choose hi = lo * "
            f"10 ** (n / bins_per_decade), e.g. hi={good_hi:.6g}."
        )
    return n


def _log_edges(lo: float, hi: float, bins_per_decade: int, n_bins: int) -> Tensor:
    """``[n_bins + 1]`` float64 edges ``lo * 10 ** (i / bins_per_decade)``, ends exact."""
    steps = torch.arange(n_bins + 1, dtype=F64) / bins_per_decade
    edges = torch.pow(10.0, math.log10(lo) + steps)
    edges[0], edges[-1] = lo, hi
    return edges
