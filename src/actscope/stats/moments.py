"""Per-unit count, mean, variance, min and max, streamed and mergeable."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from actscope.stats._common import (
    F32,
    F64,
    I64,
    Batch,
    check_n_units,
    check_other,
    check_state,
    check_state_config,
    column_sum,
    count_true,
    gathered,
    nan_where_empty,
    place,
    prepare,
    state_header,
    state_tensor,
)


class UnitMoments:
    """Per-unit moments of the finite activations of a site.

    For each unit: ``count`` (finite entries seen), ``nonfinite`` (NaN/±Inf entries, excluded
    from everything else), ``mean``, population variance ``var`` (ddof = 0), ``std``, ``min`` and
    ``max``. Statistics of a unit with ``count == 0`` are NaN. Batches are combined with Chan et
    al.'s parallel formula on (count, mean, M2) in float64, which is numerically stable and makes
    ``merge`` exact up to rounding.

    ``update(x, tok=None)``: ``x`` is ``[N, U]`` (real tokens only), ``tok`` is ignored. The
    state stays on the device of the updates; the results are CPU tensors.
    """

    KIND = "actscope.stats.UnitMoments"
    _SETUP = ("n_units",)  # what must match for a merge
    _STATE = ("_count", "_nonfinite", "_mean", "_m2", "_min", "_max")  # tensors, on one device

    def __init__(self, n_units: int):
        self.n_units = check_n_units(n_units, "UnitMoments")
        self._count = torch.zeros(self.n_units, dtype=I64)  # [U]
        self._nonfinite = torch.zeros(self.n_units, dtype=I64)  # [U]
        self._mean = torch.zeros(self.n_units, dtype=F64)  # [U], 0 where count == 0
        self._m2 = torch.zeros(self.n_units, dtype=F64)  # [U] sum of squared deviations
        self._min = torch.full((self.n_units,), math.inf, dtype=F64)  # [U]
        self._max = torch.full((self.n_units,), -math.inf, dtype=F64)  # [U]

    # -- streaming -------------------------------------------------------------------------
    def update(self, x: Tensor, tok: Tensor | None = None) -> None:
        """Add the real tokens ``x`` ``[N, U]``; ``tok`` is accepted and ignored."""
        batch = prepare(x, tok, self.n_units, "UnitMoments")
        if batch is not None:
            self._update_batch(batch)

    def _update_batch(self, batch: Batch) -> None:
        place(self, self._STATE, batch.device)
        count, mean, m2, lo, hi = _batch_moments(batch)
        self._nonfinite += batch.n_rows - count
        self._combine(count, mean, m2, lo, hi)

    def merge(self, other: UnitMoments) -> UnitMoments:
        """Add ``other``'s data to this accumulator (in place); returns self."""
        check_other(self, other, self._SETUP)
        theirs = [getattr(other, name).to(self._count.device) for name in self._STATE]
        self._nonfinite += theirs[1]
        self._combine(theirs[0], *theirs[2:])
        return self

    def _absorb(self, part: dict[str, Tensor]) -> None:
        """Add one batch's partial counts and moments (from the fused kernel, on the CPU)."""
        place(self, self._STATE, part["count"].device)
        self._nonfinite += part["nonfinite"]
        self._combine(part["count"], part["mean"], part["m2"], part["min"], part["max"])

    def _combine(self, n_b: Tensor, mean_b: Tensor, m2_b: Tensor, lo: Tensor, hi: Tensor):
        # Chan et al.: the deltas are between means, never between raw values and a far-away
        # running mean, so there is no catastrophic cancellation. Units unseen on either side
        # carry mean 0 and weight 0, so they pass through unchanged.
        n_a = self._count
        n = n_a + n_b
        w_b = n_b.to(F64) / n.clamp(min=1).to(F64)
        delta = mean_b - self._mean
        self._mean = self._mean + delta * w_b
        self._m2 = self._m2 + m2_b + delta * delta * n_a.to(F64) * w_b
        self._count = n
        self._min = torch.minimum(self._min, lo)
        self._max = torch.maximum(self._max, hi)

    # -- results ---------------------------------------------------------------------------
    @property
    def count(self) -> Tensor:
        """``[U]`` int64: finite entries seen per unit."""
        return gathered(self._count)

    @property
    def nonfinite(self) -> Tensor:
        """``[U]`` int64: NaN/±Inf entries seen per unit."""
        return gathered(self._nonfinite)

    @property
    def mean(self) -> Tensor:
        """``[U]`` float64 mean of the finite entries (NaN where count == 0)."""
        return nan_where_empty(self._mean, self._count).cpu()

    @property
    def var(self) -> Tensor:
        """``[U]`` float64 population variance, ddof = 0 (NaN where count == 0)."""
        return nan_where_empty(self._m2 / self._count.clamp(min=1).to(F64), self._count).cpu()

    @property
    def std(self) -> Tensor:
        """``[U]`` float64 population standard deviation (NaN where count == 0)."""
        return self.var.sqrt()

    @property
    def min(self) -> Tensor:
        """``[U]`` float64 smallest finite entry (NaN where count == 0)."""
        return nan_where_empty(self._min, self._count).cpu()

    @property
    def max(self) -> Tensor:
        """``[U]`` float64 largest finite entry (NaN where count == 0)."""
        return nan_where_empty(self._max, self._count).cpu()

    # -- persistence -----------------------------------------------------------------------
    _STATE_KEYS = ("n_units", "count", "nonfinite", "mean", "m2", "min", "max")

    def state_dict(self) -> dict[str, Any]:
        """Plain CPU tensors and ints; ``from_state_dict`` rebuilds an equal accumulator."""
        return {
            **state_header(self.KIND),
            "n_units": self.n_units,
            "count": gathered(self._count),
            "nonfinite": gathered(self._nonfinite),
            "mean": gathered(self._mean),
            "m2": gathered(self._m2),
            "min": gathered(self._min),
            "max": gathered(self._max),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Replace this accumulator's state by ``sd`` (same n_units required)."""
        check_state(sd, self.KIND, self._STATE_KEYS)
        check_state_config(sd, self.KIND, n_units=self.n_units)
        shape = (self.n_units,)
        self._count = state_tensor(sd, "count", I64, shape, self.KIND)
        self._nonfinite = state_tensor(sd, "nonfinite", I64, shape, self.KIND)
        self._mean = state_tensor(sd, "mean", F64, shape, self.KIND)
        self._m2 = state_tensor(sd, "m2", F64, shape, self.KIND)
        self._min = state_tensor(sd, "min", F64, shape, self.KIND)
        self._max = state_tensor(sd, "max", F64, shape, self.KIND)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> UnitMoments:
        """A new accumulator holding the state ``sd``."""
        check_state(sd, cls.KIND, cls._STATE_KEYS)
        acc = cls(sd["n_units"])
        acc.load_state_dict(sd)
        return acc

    def __repr__(self) -> str:
        return f"UnitMoments(n_units={self.n_units}, tokens={int(self._count.max())})"


def _batch_moments(batch: Batch) -> tuple[Tensor, ...]:
    """Per-unit (count, mean, M2, min, max) of one batch's finite entries, on its device."""
    if not batch.wide:
        moments = _float32_moments(batch)
        # Finite float32 values beyond ~1e18 can overflow a float32 sum of squares; such a
        # batch (never seen in practice) is redone in float64.
        return moments if bool(torch.isfinite(moments[2]).all()) else _batch_moments(batch.widened())
    x, finite = batch.x, batch.finite  # [N, U]
    if finite is None:
        count = torch.full_like(batch.col_sum, batch.n_rows)
        mean = batch.col_sum / batch.n_rows
        dev = x - mean  # two passes (mean, then deviations) keep M2 accurate
        m2 = dev.mul_(dev).sum(0)
        lo, hi = x.amin(0), x.amax(0)  # two reductions beat aminmax several times on CPU
    else:
        count = count_true(finite, 0).to(F64)
        mean = torch.where(finite, x, 0.0).sum(0) / count.clamp(min=1)
        dev = torch.where(finite, x - mean, 0.0)
        m2 = dev.mul_(dev).sum(0)
        lo = torch.where(finite, x, math.inf).amin(0)
        hi = torch.where(finite, x, -math.inf).amax(0)
    return count.to(I64), mean, m2, lo, hi


def _float32_moments(batch: Batch) -> tuple[Tensor, ...]:
    """The moments of a float32-work batch: two passes, every sum a :func:`column_sum`.

    The first pass gives the mean ``m`` (rounded to float32, ``m32``); the second sums
    ``d = x − m32`` and ``d²``, so that ``mean = m32 + Σd / n`` and ``M2 = Σd² − (Σd)² / n``
    (exact in exact arithmetic, and ``Σd`` is tiny, so nothing cancels)."""
    x, finite = batch.x, batch.finite  # [N, U] float32
    if finite is None:
        count = torch.full_like(batch.col_sum, batch.n_rows)
        s1 = batch.col_sum
    else:
        count = count_true(finite, 0).to(F64)
        x = torch.where(finite, x, 0.0)
        s1 = column_sum(x)
    n = count.clamp(min=1)
    m32 = (s1 / n).to(F32)  # [U]
    dev = x - m32  # [N, U] float32
    if finite is not None:
        dev = torch.where(finite, dev, 0.0)
    d1 = column_sum(dev)
    d2 = column_sum(dev.mul_(dev))
    mean = m32.to(F64) + d1 / n
    m2 = (d2 - d1 * d1 / n).clamp(min=0)
    if finite is None:
        lo, hi = batch.x.amin(0), batch.x.amax(0)
    else:
        lo = torch.where(finite, batch.x, math.inf).amin(0)
        hi = torch.where(finite, batch.x, -math.inf).amax(0)
    return count.to(I64), mean, m2, lo.to(F64), hi.to(F64)
