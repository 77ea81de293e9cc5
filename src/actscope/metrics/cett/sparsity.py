"""CETT-PPL-p% sparsity (Sparsing Law; METHODS.md, "CETT").

One call, :func:`cett_sparsity`, does the whole method:

1. **One calibration pass** records, per MLP layer, the token-averaged CETT as a function of ε
   on a fine log grid (:func:`~actscope.metrics.cett.curves.record_cett_curves`; cost and grid
   in that module). From then on the per-layer ε for any target c — the largest grid ε whose
   CETT is ≤ c — is read off the curves, not searched by forward passes.
2. **A bisection over the shared target c** (:mod:`~actscope.metrics.cett.search`), each step
   one evaluation pass of the pluggable objective (:mod:`~actscope.metrics.cett.objectives`:
   causal-LM perplexity, masked-LM loss, embedding fidelity, classifier KL or accuracy) with
   the thresholds applied through the reversible :func:`actscope.edit`, until the degradation
   is ≤ p and as close to p as the settings allow. For the paper's objective that is
   ``exp(L_sparse − L_dense) ≤ 1 + p``. The search for ``p`` costs at most ``max_passes``
   (default 12) passes over the evaluation data, the dense reference included.
3. **The sweep**: the same for every p of ``sweep`` (default 0.5, 1, 2, 5 %), reusing the curves
   and every pass already made; and, beside CETT, Top-k (one k shared by layers, by |a|) and
   FAT-ε (one global |a| threshold) bisected to the same p. Every pass is counted and reported.

Sparsity is the share of (real token, unit) activations that are zero after the edit, over all
MLP layers of the evaluation data; the activation ratio of a layer is 1 − its sparsity.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Sequence

import numpy as np

from ...errors import InputError
from ...sites import Plan, plan_sites
from .curves import CettCurves, record_cett_curves
from .objectives import (
    Objective,
)
from ...models import Model, ModelLike, as_model
from .search import Bisection, Evaluation, Evaluator, bisect_settings, check_p
from .settings import CettSettings, FatSettings, TopkSettings
from .thresholds import CettThresholds, thresholds_for
from ...results import TableResult
from ...store.bound import Bound, WeightBound, refuse

DEFAULT_SWEEP = (0.005, 0.01, 0.02, 0.05)
METHODS = ("cett", "topk", "fat")


@dataclass(frozen=True)
class SweepRow:
    """One bisection: ``setting`` is c (cett), k (topk) or the |a| threshold t (fat);
    ``passes`` the evaluation passes it added; ``eps`` the per-layer ε (cett only)."""

    method: str
    p: float
    setting: float
    sparsity: float
    degradation: float
    passes: int
    converged: bool
    activation_ratio: tuple[float, ...]
    eps: tuple[float, ...] = ()


@dataclass(frozen=True, eq=False)
class SparsitySweep(TableResult):
    """Sparsity versus p for CETT, Top-k and FAT-ε (one row per method and p)."""

    table_name: ClassVar[str] = "cett_sparsity_sweep"
    rows: tuple[SweepRow, ...]

    def row(self, method: str, p: float) -> SweepRow:
        for row in self.rows:
            if row.method == method and np.isclose(row.p, p, rtol=0, atol=1e-12):
                return row
        raise InputError(f"no {method} row for p={p}; rows: {[(r.method, r.p) for r in self.rows]}")

    def side_by_side(self) -> dict[str, np.ndarray]:
        """One row per p: the sparsity and degradation of every method beside each other."""
        ps = sorted({r.p for r in self.rows})
        methods = [m for m in METHODS if any(r.method == m for r in self.rows)]
        columns: dict[str, np.ndarray] = {"p": np.array(ps)}
        for method in methods:
            columns[f"{method}_sparsity"] = np.array([self.row(method, p).sparsity for p in ps])
            columns[f"{method}_degradation"] = np.array([self.row(method, p).degradation for p in ps])
        return columns

    def to_table(self) -> dict[str, np.ndarray]:
        return {
            "method": np.array([r.method for r in self.rows], dtype=object),
            "p": np.array([r.p for r in self.rows]),
            "setting": np.array([r.setting for r in self.rows]),
            "sparsity": np.array([r.sparsity for r in self.rows]),
            "activation_ratio": np.array([1.0 - r.sparsity for r in self.rows]),
            "degradation": np.array([r.degradation for r in self.rows]),
            "passes": np.array([r.passes for r in self.rows], dtype=np.int64),
            "converged": np.array([r.converged for r in self.rows]),
        }


@dataclass(frozen=True, eq=False)
class CettSparsity(TableResult, WeightBound):
    """CETT-PPL-p% sparsity of one model: per-layer ε and per-unit thresholds (``thresholds``),
    activation ratios after thresholding, overall sparsity, the recorded curves and the sweep.

    ``passes``: evaluation passes of the search for ``p``, the dense reference included;
    ``total_passes``: all evaluation passes of the call (sweep and baselines too);
    ``seconds``: ``{"calibration": …, "search": …}`` wall time.
    """

    table_name: ClassVar[str] = "cett_sparsity"
    bound_kind: ClassVar[str] = "cett-sparsity"

    objective: str
    p: float
    thresholds: CettThresholds
    curves: CettCurves
    activation_ratio: np.ndarray  # [layers], evaluation data, after thresholding
    dense_activation_ratio: np.ndarray  # [layers], evaluation data, dense
    sparsity: float
    degradation: float
    passes: int
    total_passes: int
    converged: bool
    sweep: SparsitySweep
    seconds: dict

    @property
    def c(self) -> float:
        return self.thresholds.c

    @property
    def eps(self) -> np.ndarray:
        return self.thresholds.eps

    def to_table(self) -> dict[str, np.ndarray]:
        """One row per MLP layer: ε, the calibration CETT at ε, activation ratios."""
        index = self.curves.index_for(self.c)
        rows = np.arange(len(index))
        at_eps = np.where(index >= 0, self.curves.cett[rows, np.maximum(index, 0)], 0.0)
        return {
            "site": np.array(self.thresholds.sites, dtype=object),
            "layer": np.array(self.thresholds.layers, dtype=np.int64),
            "units": np.array(self.curves.units, dtype=np.int64),
            "eps": self.eps.copy(),
            "cett_at_eps": at_eps,
            "activation_ratio": self.activation_ratio.copy(),
            "dense_activation_ratio": self.dense_activation_ratio.copy(),
        }

    # -- files: obj.save(path) / CettSparsity.load(path, model) (actscope.store.bound) ----------
    def to_bound(self) -> Bound:
        """The thresholds' tensors and header, and the rest of the result under ``"result"``."""
        inner = self.thresholds.to_bound()
        return replace(inner, kind=self.bound_kind, header={**inner.header, "result": _summary(self)})

    @classmethod
    def from_bound(cls, bound: Bound, model: Model) -> "CettSparsity":
        thresholds = CettThresholds.from_bound(bound, model)
        if not isinstance(bound.header.get("result"), dict):
            refuse(bound.path, cls.bound_kind, "its header has no 'result' object")
        try:
            return _rebuilt(bound.header["result"], thresholds)
        except (KeyError, TypeError, ValueError) as error:
            refuse(bound.path, cls.bound_kind, f"its 'result' is damaged ({type(error).__name__}: {error})")


def cett_sparsity(
    model: ModelLike,
    calibration: Any,
    objective: Objective,
    *,
    p: float = 0.01,
    sweep: Sequence[float] = DEFAULT_SWEEP,
    baselines: bool = True,
    sites: str | Sequence[str] | Plan = "blocks.*.mlp.post",
    grid_points: int = 128,
    max_passes: int = 12,
    rtol: float = 0.05,
    batch_size: int = 16,
    max_length: int = 128,
    max_tokens: int | None = None,
) -> CettSparsity:
    """CETT-PPL-p% sparsity of ``model`` (module docstring).

    ``calibration``: data for the one recording pass (strings, a text source or model-input
    dicts). ``objective``: e.g. ``CausalLMLoss(held_out_texts)``. ``p``: the allowed
    degradation (0.01 = 1 %). ``sweep``: further p values (``()`` for none); ``baselines``:
    also bisect Top-k and FAT-ε at every p. ``rtol``: a bisection stops early once a setting's
    degradation is within ``[p (1 − rtol), p]``. ``max_passes``: evaluation passes allowed
    per bisection, the dense reference counted in the one for ``p``.
    """
    p, sweep = check_p(p), tuple(check_p(q, "every sweep value") for q in sweep)
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 2:
        raise InputError(
            f"max_passes must be a whole number of at least 2 (the dense reference and one step), got {max_passes!r}"
        )
    if not 0 <= rtol < 1:
        raise InputError(f"rtol must be in [0, 1), got {rtol!r}; e.g. 0.05")
    if not all(callable(getattr(objective, name, None)) for name in ("reference", "degradation")):
        raise InputError(
            f"objective must have reference(model) and degradation(model, reference) methods, got {type(objective).__name__}; "
            "use e.g. actscope.metrics.cett.CausalLMLoss(texts)"
        )
    model = as_model(model)
    clock = time.perf_counter()
    curves = record_cett_curves(model, calibration, sites, grid_points=grid_points, batch_size=batch_size,
                                max_length=max_length, max_tokens=max_tokens)
    calibrated = time.perf_counter()
    evaluator = Evaluator(model, plan_sites(model, list(curves.sites)), objective)
    search = _Search(evaluator, max_passes - 1, rtol)
    cett = CettSettings(curves, model)
    main = search.run(cett, p)
    passes = evaluator.passes
    rows = [_row(cett, p, main)]
    rows += [_row(cett, q, search.run(cett, q)) for q in sweep if q != p]
    if baselines:
        rows += _baselines(search, curves, (p, *[q for q in sweep if q != p]), grid_points)
    rows.sort(key=lambda r: (METHODS.index(r.method), r.p))
    return CettSparsity(
        objective=getattr(objective, "name", type(objective).__name__),
        p=p,
        thresholds=thresholds_for(curves, cett.value(main.index), model, index=cett.points[main.index][1]),
        curves=curves,
        activation_ratio=main.evaluation.activation_ratio,
        dense_activation_ratio=evaluator.dense.activation_ratio,
        sparsity=main.evaluation.sparsity,
        degradation=main.evaluation.degradation,
        passes=passes,
        total_passes=evaluator.passes,
        converged=main.converged,
        sweep=SparsitySweep(tuple(rows)),
        seconds={"calibration": calibrated - clock, "search": time.perf_counter() - calibrated},
    )


class _Search:
    """Bisections that share the evaluator and remember every measured setting per method."""

    def __init__(self, evaluator: Evaluator, budget: int, rtol: float) -> None:
        self.evaluator, self.budget, self.rtol = evaluator, budget, rtol
        self.known: dict[str, dict[int, Evaluation]] = {}

    def run(self, settings: Any, p: float) -> Bisection:
        known = self.known.setdefault(settings.method, {})
        if settings.method != "cett":
            known.setdefault(0, self.evaluator.dense)  # Top-k with k = d_ff and t = 0 are the dense model
        evaluate = lambda j: self.evaluator.evaluate(settings.edits(j))  # noqa: E731
        return bisect_settings(len(settings), evaluate, p, budget=self.budget, known=known, rtol=self.rtol)


def _baselines(search: _Search, curves: CettCurves, ps: Sequence[float], points: int) -> list[SweepRow]:
    topk = TopkSettings(curves.sites, int(min(curves.units)))
    fat = FatSettings(curves.sites, float(curves.max_abs.max()), points)
    return [_row(settings, q, search.run(settings, q)) for settings in (topk, fat) for q in ps]


def _row(settings: Any, p: float, outcome: Bisection) -> SweepRow:
    e = outcome.evaluation
    eps = tuple(float(x) for x in settings.eps(outcome.index)) if settings.method == "cett" else ()
    return SweepRow(settings.method, p, settings.value(outcome.index), e.sparsity, e.degradation, outcome.passes,
                    outcome.converged, tuple(float(x) for x in e.activation_ratio), eps)


# -- files --------------------------------------------------------------------------------------
def _summary(result: CettSparsity) -> dict[str, Any]:
    curves = result.curves
    return {
        "objective": result.objective,
        "p": result.p,
        "activation_ratio": result.activation_ratio.tolist(),
        "dense_activation_ratio": result.dense_activation_ratio.tolist(),
        "sparsity": result.sparsity,
        "degradation": result.degradation,
        "passes": result.passes,
        "total_passes": result.total_passes,
        "converged": result.converged,
        "seconds": dict(result.seconds),
        "sweep": [
            {**row.__dict__, "activation_ratio": list(row.activation_ratio), "eps": list(row.eps)}
            for row in result.sweep.rows
        ],
        "curves": {
            "sites": list(curves.sites), "layers": list(curves.layers), "units": list(curves.units),
            "grid": curves.grid.tolist(), "cett": curves.cett.tolist(),
            "dropped_fraction": curves.dropped_fraction.tolist(),
            "dense_activation_ratio": curves.dense_activation_ratio.tolist(),
            "max_abs": curves.max_abs.tolist(), "undefined_tokens": curves.undefined_tokens.tolist(),
            "tokens": curves.tokens,
        },
    }


def _rebuilt(extra: dict[str, Any], thresholds: CettThresholds) -> CettSparsity:
    """The result :func:`_summary` described, around ``thresholds``."""
    c = extra["curves"]
    curves = CettCurves(
        sites=tuple(c["sites"]), layers=tuple(c["layers"]), units=tuple(c["units"]),
        grid=np.asarray(c["grid"], dtype=np.float64), cett=np.asarray(c["cett"], dtype=np.float64),
        dropped_fraction=np.asarray(c["dropped_fraction"], dtype=np.float64),
        dense_activation_ratio=np.asarray(c["dense_activation_ratio"], dtype=np.float64),
        max_abs=np.asarray(c["max_abs"], dtype=np.float64),
        undefined_tokens=np.asarray(c["undefined_tokens"], dtype=np.int64), tokens=int(c["tokens"]),
    )
    rows = tuple(
        SweepRow(**{**r, "activation_ratio": tuple(r["activation_ratio"]), "eps": tuple(r["eps"])}) for r in extra["sweep"]
    )
    return CettSparsity(
        objective=extra["objective"], p=extra["p"], thresholds=thresholds, curves=curves,
        activation_ratio=np.asarray(extra["activation_ratio"], dtype=np.float64),
        dense_activation_ratio=np.asarray(extra["dense_activation_ratio"], dtype=np.float64),
        sparsity=extra["sparsity"], degradation=extra["degradation"], passes=extra["passes"],
        total_passes=extra["total_passes"], converged=extra["converged"], sweep=SparsitySweep(rows),
        seconds=extra["seconds"],
    )
