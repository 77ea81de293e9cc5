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
    gathered,
    place,
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
    The counts stay on the device of the updates; ``counts`` and the four totals are read on
    the CPU.
    """

    KIND = "actscope.stats.AbsHistogram"
    _SETUP = ("lo", "hi", "bins_per_decade")  # what must match for a merge
    _STATE = ("_counts", "_outside")  # tensors, on one device

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
        self._outside = torch.zeros(4, dtype=I64)  # zero, underflow, overflow, nonfinite

    @property
    def zero(self) -> int:
        """Entries with ``|a| == 0``."""
        return int(self._outside[0])

    @property
    def underflow(self) -> int:
        """Entries with ``0 < |a| < lo``."""
        return int(self._outside[1])

    @property
    def overflow(self) -> int:
        """Entries with ``|a| >= hi``."""
        return int(self._outside[2])

    @property
    def nonfinite(self) -> int:
        """NaN/±Inf entries (counted nowhere else)."""
        return int(self._outside[3])

    @property
    def edges(self) -> Tensor:
        """``[n_bins + 1]`` float64 bin edges, ``edges[0] == lo`` and ``edges[-1] == hi``."""
        return self._edges.clone()

    @property
    def counts(self) -> Tensor:
        """``[n_bins]`` int64 counts of ``edges[i] <= |a| < edges[i + 1]``."""
        return gathered(self._counts)

    @property
    def total(self) -> int:
        """Finite entries seen: ``zero + underflow + counts.sum() + overflow``."""
        return int(self._outside[:3].sum() + self._counts.sum())

    # -- streaming -------------------------------------------------------------------------
    def update(self, x: Tensor, tok: Tensor | None = None) -> None:
        """Add the real tokens ``x`` ``[N, U]``; ``tok`` is accepted and ignored."""
        batch = prepare(x, tok, None, "AbsHistogram")
        if batch is not None:
            self._update_batch(batch)

    def _update_batch(self, batch: Batch) -> None:
        place(self, self._STATE, batch.device)
        a = batch.abs  # [N, U] exact |x| (float64, or float32 holding the input exactly)
        a32 = batch.raw.abs().float()  # exact for float32/16 inputs; float64 is fixed up below
        if batch.finite is None:
            a, a32 = a.reshape(-1), a32.reshape(-1)
        else:
            a, a32 = a[batch.finite], a32[batch.finite]  # [M] finite entries only
        slots = torch.bincount(self._slot_index(a32, a), minlength=self.n_bins + 2)
        n_zero = count_true(a == 0, 0)
        # slot 0 holds |a| < lo, zeros included
        outside = torch.stack([n_zero, slots[0] - n_zero, slots[-1], n_zero.new_tensor(batch.x.numel() - a.numel())])
        self._outside += outside
        self._counts += slots[1:-1]

    def _absorb(self, part: dict[str, Tensor]) -> None:
        """Add one batch's slots (from the fused kernel, on the CPU): zero, underflow,
        overflow, non-finite, then one count per bin."""
        slots = part["slots"]
        place(self, self._STATE, slots.device)
        self._outside += slots[:4]
        self._counts += slots[4:]

    def _slot_index(self, a32: Tensor, a: Tensor) -> Tensor:
        """Slot of each value: 0 below ``lo`` (zeros included), ``1 + bin``, ``n_bins + 1`` at
        or above ``hi``. ``a32`` is a scratch copy of the values and is overwritten; ``a`` holds
        them exactly (float64, or float32 for float32/16 inputs)."""
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
            edges = self._edges.to(a.device)
            exact = torch.bucketize(a.index_select(0, where).to(F64), edges, right=True, out_int32=True)
            idx.index_copy_(0, where, exact)
        return idx

    def merge(self, other: AbsHistogram) -> AbsHistogram:
        """Add ``other``'s counts (in place; identical edges required); returns self."""
        check_other(self, other, self._SETUP)
        self._counts += other._counts.to(self._counts.device)
        self._outside += other._outside.to(self._outside.device)
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
            "counts": gathered(self._counts),
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
        names = ("zero", "underflow", "overflow", "nonfinite")
        self._outside = torch.tensor([state_int(sd, name, self.KIND) for name in names], dtype=I64)

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
