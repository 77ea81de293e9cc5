"""How often each unit fires, and how many units fire per token, at a ladder of thresholds."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from actscope.errors import InputError
from actscope.stats.fused import float_thresholds
from actscope.stats._common import (
    F64,
    I64,
    Batch,
    check_n_units,
    check_other,
    check_state,
    check_state_config,
    count_true,
    gathered,
    place,
    prepare,
    safe_ratio,
    state_header,
    state_tensor,
)

#: Magnitude thresholds of the default ladder. 0.0 gives "non-zero" (``|a| > 0``).
DEFAULT_EPS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)


class ThresholdLadder:
    """Firing counts per unit and the per-token distribution of firing units (METHODS.md,
    "Activation ratio" and "Dead neurons").

    A unit *fires* on a token under criterion ``c``:

    * ``c = 0``: ``a > 0`` (the ReLU-family definition);
    * ``c = j + 1``: ``|a| > eps[j]`` (for activations without exact zeros).

    Per unit: ``count`` (finite entries), ``pos`` (``[U]``, fired under criterion 0) and
    ``abs_gt`` (``[len(eps), U]``); ``frac_pos`` / ``frac_abs_gt`` divide them by ``count``.
    Per token: ``firing_hist[c, m]`` is the number of tokens on which exactly ``m`` of the ``U``
    units fired under criterion ``c`` (shape ``[1 + len(eps), U + 1]``).

    A NaN/±Inf entry never fires; it is left out of ``count`` (so of ``frac_*``) but its token
    still counts in ``firing_hist`` (as that unit not firing). A unit is *dead* under a
    criterion when it fired on no token; a unit that never had a finite value is dead too.

    ``update(x, tok=None)``: ``x`` is ``[N, U]`` (real tokens only), ``tok`` is ignored. The
    state stays on the device of the updates; the results are CPU tensors.
    """

    KIND = "actscope.stats.ThresholdLadder"
    _SETUP = ("n_units", "eps")  # what must match for a merge
    _STATE = ("_count", "_fired", "_firing_hist")  # tensors, on one device

    def __init__(self, n_units: int, eps: Sequence[float] = DEFAULT_EPS):
        self.n_units = check_n_units(n_units, "ThresholdLadder")
        self.eps = _check_eps(eps)
        c = self.n_criteria
        self._count = torch.zeros(self.n_units, dtype=I64)  # [U]
        self._fired = torch.zeros(c, self.n_units, dtype=I64)  # [C, U]
        self._firing_hist = torch.zeros(c, self.n_units + 1, dtype=I64)  # [C, U + 1]

    @property
    def n_criteria(self) -> int:
        """``1 + len(eps)``: criterion 0 is ``a > 0``, criterion j + 1 is ``|a| > eps[j]``."""
        return 1 + len(self.eps)

    # -- streaming -------------------------------------------------------------------------
    def update(self, x: Tensor, tok: Tensor | None = None) -> None:
        """Add the real tokens ``x`` ``[N, U]``; ``tok`` is accepted and ignored."""
        batch = prepare(x, tok, self.n_units, "ThresholdLadder")
        if batch is not None:
            self._update_batch(batch)

    def _update_batch(self, batch: Batch) -> None:
        place(self, self._STATE, batch.device)
        per_unit, per_token = [], []
        for fired in self._fired_masks(batch):  # [N, U] per criterion
            per_unit.append(count_true(fired, 0))
            per_token.append(count_true(fired, 1))
        count = (
            torch.full_like(per_unit[0], batch.n_rows)
            if batch.finite is None
            else count_true(batch.finite, 0)
        )
        self._fired += torch.stack(per_unit)  # [C, U]
        self._count += count
        self._firing_hist += _bincount_rows(torch.stack(per_token), self.n_units + 1)  # [C, U + 1]

    def _absorb(self, part: dict[str, Tensor]) -> None:
        """Add one batch's partial counts (from the fused kernel, on the CPU)."""
        place(self, self._STATE, part["count"].device)
        self._count += part["count"]
        self._fired += part["fired"]
        self._firing_hist += part["firing_hist"]

    def _fired_masks(self, batch: Batch):
        """Yield, per criterion, the ``[N, U]`` bool mask of entries that fire.

        The same buffer is reused for every criterion: use each mask before the next.
        """
        # One criterion at a time: a [C, N, U] stack falls out of cache and is slower.
        fired = torch.empty_like(batch.x, dtype=torch.bool)
        tests = [(batch.x, 0.0)] + list(zip([batch.abs] * len(self.eps), self._thresholds(batch)))
        for values, threshold in tests:
            torch.gt(values, threshold, out=fired)
            if batch.finite is not None:
                fired &= batch.finite  # +Inf would fire; NaN compares False anyway
            yield fired

    def _thresholds(self, batch: Batch) -> list[float]:
        """``eps`` as compared with the batch's values: a float32 batch's comparison with a
        Python float happens in float32, so each ε becomes the largest float32 <= ε, for which
        ``a > that  ⇔  a > ε`` holds exactly for every float32 ``a``."""
        return list(self.eps) if batch.wide else _float32_thresholds(self.eps)

    def merge(self, other: ThresholdLadder) -> ThresholdLadder:
        """Add ``other``'s data to this accumulator (in place); returns self."""
        check_other(self, other, self._SETUP)
        device = self._count.device
        self._count += other._count.to(device)
        self._fired += other._fired.to(device)
        self._firing_hist += other._firing_hist.to(device)
        return self

    # -- results ---------------------------------------------------------------------------
    @property
    def count(self) -> Tensor:
        """``[U]`` int64: finite entries seen per unit."""
        return gathered(self._count)

    @property
    def pos(self) -> Tensor:
        """``[U]`` int64: finite entries with ``a > 0`` per unit."""
        return gathered(self._fired[0])

    @property
    def abs_gt(self) -> Tensor:
        """``[len(eps), U]`` int64: finite entries with ``|a| > eps[j]`` per unit."""
        return gathered(self._fired[1:])

    @property
    def frac_pos(self) -> Tensor:
        """``[U]`` float64: ``pos / count`` (NaN where count == 0)."""
        return safe_ratio(self._fired[0], self._count).cpu()

    @property
    def frac_abs_gt(self) -> Tensor:
        """``[len(eps), U]`` float64: ``abs_gt / count`` (NaN where count == 0)."""
        return safe_ratio(self._fired[1:], self._count).cpu()

    @property
    def firing_hist(self) -> Tensor:
        """``[1 + len(eps), U + 1]`` int64: tokens by number of units firing, per criterion."""
        return gathered(self._firing_hist)

    @property
    def n_tokens(self) -> int:
        """Number of tokens seen (every token lands in exactly one bin of each criterion)."""
        return int(self._firing_hist[0].sum())

    def firing_count(self, criterion: int = 0) -> Tensor:
        """``[U]`` int64: tokens on which each unit fired under ``criterion``."""
        return gathered(self._fired[self._check_criterion(criterion)])

    def activation_ratio(self, criterion: int = 0) -> float:
        """Mean over tokens of (units firing / U) under ``criterion``; NaN before any token.

        Sparsity is ``1 - activation_ratio``. Non-finite entries count as not firing.
        """
        hist = self._firing_hist[self._check_criterion(criterion)].to("cpu", F64)  # [U + 1]
        n_tokens = hist.sum()
        if n_tokens == 0:
            return math.nan
        units = torch.arange(self.n_units + 1, dtype=F64)
        return float((hist * units).sum() / (n_tokens * self.n_units))

    def dead_units(self, criterion: int = 0) -> Tensor:
        """``[U]`` bool: units that fired on no token under ``criterion``.

        Units that never had a finite value are dead as well (they never fired).
        """
        return self.firing_count(criterion) == 0

    def _check_criterion(self, criterion: Any) -> int:
        if (
            isinstance(criterion, bool)
            or not isinstance(criterion, numbers.Integral)
            or not 0 <= criterion < self.n_criteria
        ):
            raise InputError(
                f"ThresholdLadder: criterion must be an int in [0, {self.n_criteria - 1}] "
                f"(0 is a > 0, j + 1 is |a| > eps[j] with eps={self.eps}), got {criterion!r}."
            )
        return int(criterion)

    # -- persistence -----------------------------------------------------------------------
    _STATE_KEYS = ("n_units", "eps", "count", "fired", "firing_hist")

    def state_dict(self) -> dict[str, Any]:
        """Plain CPU tensors, ints and a list; ``from_state_dict`` rebuilds an equal one."""
        return {
            **state_header(self.KIND),
            "n_units": self.n_units,
            "eps": list(self.eps),
            "count": gathered(self._count),
            "fired": gathered(self._fired),
            "firing_hist": gathered(self._firing_hist),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Replace this accumulator's state by ``sd`` (same n_units and eps required)."""
        check_state(sd, self.KIND, self._STATE_KEYS)
        check_state_config(sd, self.KIND, n_units=self.n_units, eps=self.eps)
        c, u = self.n_criteria, self.n_units
        self._count = state_tensor(sd, "count", I64, (u,), self.KIND)
        self._fired = state_tensor(sd, "fired", I64, (c, u), self.KIND)
        self._firing_hist = state_tensor(sd, "firing_hist", I64, (c, u + 1), self.KIND)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> ThresholdLadder:
        """A new accumulator holding the state ``sd``."""
        check_state(sd, cls.KIND, cls._STATE_KEYS)
        acc = cls(sd["n_units"], eps=sd["eps"])
        acc.load_state_dict(sd)
        return acc

    def __repr__(self) -> str:
        return f"ThresholdLadder(n_units={self.n_units}, eps={self.eps}, tokens={self.n_tokens})"


def _check_eps(eps: Any) -> tuple[float, ...]:
    """``eps`` as a strictly increasing tuple of finite floats >= 0."""
    fix = "pass a strictly increasing sequence of finite thresholds >= 0, e.g. (0.0, 1e-2, 1e-1)"
    if isinstance(eps, (str, bytes)) or not isinstance(eps, Sequence):
        raise InputError(f"ThresholdLadder: eps must be a sequence, got {eps!r}; {fix}.")
    values = []
    for e in eps:
        if isinstance(e, bool) or not isinstance(e, numbers.Real) or not math.isfinite(e) or e < 0:
            raise InputError(f"ThresholdLadder: bad threshold {e!r} in eps={eps!r}; {fix}.")
        values.append(float(e))
    if any(b <= a for a, b in zip(values, values[1:])):
        raise InputError(f"ThresholdLadder: eps={eps!r} is not strictly increasing; {fix}.")
    return tuple(values)


@lru_cache(maxsize=32)
def _float32_thresholds(eps: tuple[float, ...]) -> list[float]:
    return float_thresholds(eps).tolist()


def _bincount_rows(values: Tensor, n_bins: int) -> Tensor:
    """Row-wise bincount of ``values`` ``[R, N]`` (ints in [0, n_bins)) as ``[R, n_bins]``."""
    # One bincount over offset values instead of a Python loop over rows.
    offsets = torch.arange(values.shape[0], device=values.device).unsqueeze(1) * n_bins
    flat = (values + offsets).reshape(-1)
    return torch.bincount(flat, minlength=values.shape[0] * n_bins).view(-1, n_bins)
