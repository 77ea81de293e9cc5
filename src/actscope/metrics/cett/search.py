"""The outer search of CETT-PPL-p%: counted evaluation passes and bisection over settings.

Every method (CETT, Top-k, FAT-ε) is a finite list of settings ordered from the least to the
most aggressive (index 0 ≈ dense). :func:`bisect_settings` finds the largest index whose
degradation is ≤ p, assuming degradation grows with the index; each setting it has to measure
costs one evaluation pass, counted by :class:`Evaluator`, and measured settings are remembered,
so a later bisection (another p) starts from the bracket they give and never measures a
setting twice.

For CETT the settings are the c values in [0, 1] at which some layer's ε changes
(:meth:`CettCurves.breakpoints`): bisecting c on [0, 1] at any other point would evaluate a model
identical to one at a breakpoint, so this is bisection of c over [0, 1] with no wasted pass.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ...errors import InputError
from ...sites import Plan, Site
from ...trace import Tracer, flatten
from ...models import Model


@dataclass(frozen=True)
class Evaluation:
    """One evaluation pass: the degradation and, per layer, non-zero and total activations."""

    degradation: float
    nonzero: np.ndarray  # [layers] int64
    entries: np.ndarray  # [layers] int64

    @property
    def activation_ratio(self) -> np.ndarray:
        return self.nonzero / np.maximum(self.entries, 1)

    @property
    def sparsity(self) -> float:
        """Share of (real token, unit) activations that are zero, over all layers."""
        return 1.0 - float(self.nonzero.sum()) / max(int(self.entries.sum()), 1)


class _NonzeroCounter(Tracer):
    """Counts non-zero activations of the sites over real tokens. Attached after the edit's
    hooks, it sees the edited tensors (PyTorch runs pre-hooks in registration order)."""

    def __init__(self, model: Model, plan: Plan) -> None:
        super().__init__(model, plan)
        self.position = {site.label: n for n, site in enumerate(plan.sites)}
        self.nonzero = np.zeros(len(plan.sites), dtype=np.int64)
        self.entries = np.zeros(len(plan.sites), dtype=np.int64)

    def on_site(self, site: Site, value: Any, module: torch.nn.Module) -> None:
        values = flatten(site, value, self._batch_info(), module).values  # [n, d_ff]
        self.nonzero[self.position[site.label]] += int((values != 0).sum())
        self.entries[self.position[site.label]] += values.numel()


class Evaluator:
    """Runs the objective; ``passes`` counts every pass over the evaluation data, the dense
    reference included."""

    def __init__(self, model: Model, plan: Plan, objective: Any) -> None:
        from ...interventions import edit

        self.model, self.plan, self.objective, self._edit = model, plan, objective, edit
        self.passes = 0
        self.reference: Any = None
        self.dense = self._counted(lambda: 0.0, {}, reference=True)

    def evaluate(self, edits: Mapping[str, Any]) -> Evaluation:
        """One pass with ``edits`` (``{site: intervention}``) applied."""
        return self._counted(lambda: float(self.objective.degradation(self.model, self.reference)), edits)

    def _counted(self, run: Callable[[], float], edits: Mapping[str, Any], reference: bool = False) -> Evaluation:
        counter = _NonzeroCounter(self.model, self.plan)
        with torch.no_grad(), self._edit(self.model, edits), counter.attached():
            if reference:
                self.reference = self.objective.reference(self.model)
            value = run()
        self.passes += 1
        return Evaluation(value, counter.nonzero.copy(), counter.entries.copy())


@dataclass(frozen=True)
class Bisection:
    """Where one bisection ended: the chosen index and its evaluation, new passes spent,
    whether it converged (adjacent bracket, or within tolerance below p)."""

    index: int
    evaluation: Evaluation
    passes: int
    converged: bool
    bracket: tuple[int, int]  # (largest index known ≤ p, smallest index known > p; n = none)


def bisect_settings(
    n: int,
    evaluate: Callable[[int], Evaluation],
    p: float,
    *,
    budget: int,
    known: dict[int, Evaluation],
    rtol: float = 0.05,
) -> Bisection:
    """Largest index in ``[0, n)`` with degradation ≤ ``p`` (index 0 is taken to satisfy it).

    Stops early when a measured degradation lies in ``[p (1 − rtol), p]``. ``known`` (index →
    evaluation) is read for the starting bracket and updated; at most ``budget`` new passes,
    one of them kept for measuring the result when no measured index satisfies p.
    """
    lo = max([0] + [j for j, e in known.items() if e.degradation <= p])
    hi = min([n] + [j for j, e in known.items() if e.degradation > p and j > lo])
    passes, close = 0, lo in known and known[lo].degradation >= p * (1 - rtol)

    def measure(j: int) -> Evaluation:
        nonlocal passes
        if j not in known:
            known[j] = evaluate(j)
            passes += 1
        return known[j]

    while hi - lo > 1 and not close and passes < budget - (lo not in known):
        mid = (lo + hi) // 2
        if measure(mid).degradation <= p:
            lo, close = mid, known[mid].degradation >= p * (1 - rtol)
        else:
            hi = mid
    result = measure(lo) if lo in known or passes < budget else None
    if result is None:
        raise InputError(f"the pass budget ({budget}) was spent before the dense setting was measured; raise max_passes")
    return Bisection(lo, result, passes, close or hi - lo <= 1, (lo, hi))


def check_p(p: Any, name: str = "p") -> float:
    """A finite p > 0 (a fraction: 0.01 is 1 %)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or p <= 0:
        raise InputError(f"{name} must be a positive fraction (0.01 for 1 %), got {p!r}")
    return float(p)


# -- the three families of settings -----------------------------------------------------------
def topk_abs(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Keep the ``k`` entries of largest ``|a|`` per token, zero the rest *(our choice: by
    magnitude, so gated and SiLU MLPs, whose activations are signed, keep their strongest
    units; for ReLU outputs it is Top-k by value)*."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        if k >= x.shape[-1]:
            return x.clone()
        kept = x.abs().topk(k, dim=-1).indices
        return torch.zeros_like(x).scatter(-1, kept, x.gather(-1, kept))

    return apply


def fat_grid(max_abs: float, points: int, decades: float = 5.0) -> np.ndarray:
    """FAT-ε candidates *(our choice)*: ``points`` thresholds log-spaced over ``decades``
    decades up to the largest calibration |a| of any layer."""
    top = max(float(max_abs), np.finfo(np.float64).tiny)
    return np.logspace(np.log10(top) - decades, np.log10(top), points)
