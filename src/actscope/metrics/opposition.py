"""Opposing signals ("Outliers with opposing signals have an outsized effect on neural network
optimization"): groups of examples whose losses move in opposition during training,
:func:`opposing_groups`, and the input feature that separates them, :func:`separating_feature`.

Input: per-example loss trajectories ``losses`` ``[T, n]`` (``actscope.train.loss_trajectories``
records them with bounded memory). With ``Δ_i(t) = ℓ_i(t) − ℓ_i(t−1)``:

* the ``top`` examples with the largest variance of ``Δ_i`` over time are the candidates (the
  outliers whose loss swings most);
* they are split in two by the sign of the leading eigenvector of the correlation matrix of their
  ``Δ``: examples whose losses rise together fall on one side;
* the **opposition score** of the two groups is ``−corr(mean_{i∈A} Δ_i, mean_{i∈B} Δ_i)`` (Pearson over
  time): 1 when one group's loss falls exactly when the other's rises, 0 when unrelated, −1 when
  they move together.

:func:`separating_feature` ranks input (or activation) features by the standardised difference of
the two groups' means, ``(mean_A − mean_B) / pooled sd`` (±inf for a feature constant within
each group but different between them: it separates them perfectly).

:func:`spike_coincidence` asks whether the groups' swings come with spikes of the overall loss: a
**spike** is a step whose mean loss over all tracked examples exceeds ``factor`` × its median over
the ``window`` steps before; the **lift** is the mean gap ``|mean_A ℓ − mean_B ℓ|`` at spike steps
over the mean gap at the other steps (1 when unrelated); the **share** is the part of the spikes'
one-step rise ``Σ_i (ℓ_i(t) − ℓ_i(t−1))`` that the two groups' examples carry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import InputError
from ..results import TableResult


@dataclass(frozen=True, eq=False)
class OpposingSignals(TableResult):
    """The two opposing groups of one set of loss trajectories."""

    table_name: ClassVar[str] = "opposing_signals"

    group_a: np.ndarray  # example indices
    group_b: np.ndarray
    score: float  # −corr(mean Δ of A, mean Δ of B)
    swing: np.ndarray  # [n] variance of each example's loss change over time

    def to_table(self) -> dict[str, np.ndarray]:
        n = len(self.swing)
        group = np.full(n, "", dtype=object)
        group[self.group_a] = "A"
        group[self.group_b] = "B"
        return {"example": np.arange(n, dtype=np.int64), "swing": self.swing, "group": group}


def opposition_score(delta_a: Any, delta_b: Any) -> float:
    """``−corr(a, b)`` (Pearson) of two loss-change series of equal length; NaN if either is constant."""
    a, b = np.asarray(delta_a, dtype=np.float64), np.asarray(delta_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise InputError(f"two loss-change series of the same length (≥ 2) are needed, got shapes {a.shape} and {b.shape}")
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    return float(-(a * b).sum() / norm) if norm > 0 else float("nan")


def opposing_groups(losses: Any, *, top: int = 20) -> OpposingSignals:
    """Split the ``top`` most-swinging examples of ``losses`` ``[T, n]`` into two opposing groups
    (see the module docstring)."""
    values = np.asarray(losses, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 3 or values.shape[1] < 2:
        raise InputError(f"losses must be [steps ≥ 3, examples ≥ 2], got shape {values.shape}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 2:
        raise InputError(f"top must be a whole number ≥ 2 (the examples split into two groups), got {top!r}")
    delta = np.diff(values, axis=0)
    swing = delta.var(axis=0)
    chosen = np.argsort(-swing, kind="stable")[: min(top, values.shape[1])]
    d = delta[:, chosen]
    d = d - d.mean(axis=0)
    scale = np.sqrt((d * d).sum(axis=0))
    live = scale > 0
    if live.sum() < 2:
        raise InputError("fewer than two examples' losses change over time: nothing to split")
    chosen, d, scale = chosen[live], d[:, live], scale[live]
    corr = (d.T @ d) / np.outer(scale, scale)
    _, vectors = np.linalg.eigh(corr)
    lead = vectors[:, -1]
    lead = lead if lead[0] >= 0 else -lead  # deterministic sign: the most-swinging example is in A
    a, b = chosen[lead >= 0], chosen[lead < 0]
    score = opposition_score(delta[:, a].mean(axis=1), delta[:, b].mean(axis=1)) if len(b) else float("nan")
    return OpposingSignals(group_a=np.sort(a), group_b=np.sort(b), score=score, swing=swing)


def separating_feature(features: Any, group_a: Any, group_b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[n, f]`` ranked by |standardised mean difference| between the two groups:
    (feature indices, most separating first; their differences ``(mean_A − mean_B) / pooled sd``)."""
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    a, b = x[np.asarray(group_a)], x[np.asarray(group_b)]
    if len(a) < 2 or len(b) < 2:
        raise InputError(f"each group needs at least two examples, got {len(a)} and {len(b)}")
    pooled = np.sqrt((a.var(axis=0, ddof=1) * (len(a) - 1) + b.var(axis=0, ddof=1) * (len(b) - 1)) / (len(a) + len(b) - 2))
    gap = a.mean(axis=0) - b.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # a feature constant within each group: infinitely separating if the constants differ, else 0
        diff = np.where(pooled > 0, gap / pooled, np.where(gap != 0, np.sign(gap) * np.inf, 0.0))
    order = np.argsort(-np.abs(diff), kind="stable")
    return order, diff[order]


@dataclass(frozen=True)
class SpikeCoincidence:
    """Spikes of the overall loss and the two groups' gap at them (see the module docstring)."""

    spikes: np.ndarray  # [k] step indices (rows of ``losses``) where the mean loss spikes
    gap: np.ndarray  # [T] |mean_A ℓ − mean_B ℓ| per step
    lift: float  # mean gap at spikes / mean gap at the other steps ≥ window; NaN without spikes
    share: float  # the groups' part of the spikes' one-step rise of the summed loss; NaN without spikes


def spike_coincidence(losses: Any, group_a: Any, group_b: Any, *, factor: float = 2.0, window: int = 20) -> SpikeCoincidence:
    """Spikes of the mean of ``losses`` ``[T, n]`` (a step above ``factor`` × the median of the
    ``window`` steps before it) and how the gap between groups A and B behaves at them."""
    values = np.asarray(losses, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] < 2:
        raise InputError(f"losses must be [steps, examples ≥ 2], got shape {values.shape}")
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window < values.shape[0]:
        raise InputError(f"window must be a whole number from 1 to steps − 1 ({values.shape[0] - 1}), got {window!r}")
    if not factor > 1:
        raise InputError(f"factor must be > 1 (a spike is a rise above the recent median), got {factor!r}")
    a, b = np.asarray(group_a, dtype=np.int64), np.asarray(group_b, dtype=np.int64)
    if len(a) == 0 or len(b) == 0:
        raise InputError(f"both groups need at least one example, got {len(a)} and {len(b)}")
    total = values.mean(axis=1)
    baseline = np.array([np.median(total[t - window:t]) for t in range(window, len(total))])
    spikes = window + np.flatnonzero(total[window:] > factor * baseline)
    gap = np.abs(values[:, a].mean(axis=1) - values[:, b].mean(axis=1))
    if not len(spikes):
        return SpikeCoincidence(spikes=spikes, gap=gap, lift=float("nan"), share=float("nan"))
    calm = np.setdiff1d(np.arange(window, len(total)), spikes)
    lift = float(gap[spikes].mean() / gap[calm].mean()) if len(calm) and gap[calm].mean() > 0 else float("nan")
    rise = values[spikes] - values[spikes - 1]  # [k, n]
    groups = np.union1d(a, b)
    whole = rise.sum()
    share = float(rise[:, groups].sum() / whole) if whole > 0 else float("nan")
    return SpikeCoincidence(spikes=spikes, gap=gap, lift=lift, share=share)


__all__ = ["OpposingSignals", "SpikeCoincidence", "opposing_groups", "opposition_score", "separating_feature", "spike_coincidence"]
