"""Activation sparsity and dead units (METHODS.md, "Activation ratio" and "Dead neurons").

A thin reading of what a profiling run already records: nothing is recomputed from
activations. Per layer the ratio and the dead-unit count come from the run's ``layers`` table,
per unit the firing frequency from its ``neurons`` table, and per token the distribution of the
number of units firing from its ``firing.SITE`` arrays (see docs/run-directory.md).

A unit *fires* on a token under a criterion:

* ``"pos"`` — ``a > 0`` (the ReLU-family definition of Lazy Neuron);
* a float ``ε ≥ 0`` — ``|a| > ε`` (for activations without exact zeros; ``0.0`` means
  "non-zero", the right criterion for gated MLPs whose neuron is ``relu(gate) * up``).

The **activation ratio** of a site is the fraction of its units that fire on a token, averaged
over real tokens (padding never counts); **sparsity** = 1 − ratio. A unit is **dead** when it
fires on no real token of the data set (a unit that never had a finite value is dead too).
"""
from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from ..errors import InputError
from ..results import TableResult

POS = "pos"
DEFAULT_SITES = "blocks.*.mlp.post"


# -- results ----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class UnitFiring(TableResult):
    """One row per (site, unit): how often the unit fires, and whether it is dead."""

    table_name: ClassVar[str] = "unit_firing"

    site: np.ndarray  # [rows] object
    layer: np.ndarray  # [rows] int64
    unit: np.ndarray  # [rows] int64, index in the site's unit axis
    tokens: np.ndarray  # [rows] int64, finite values seen
    firing_frequency: np.ndarray  # [rows] float64, fraction of those tokens it fired on
    dead: np.ndarray  # [rows] bool

    def to_table(self) -> dict[str, np.ndarray]:
        return {
            "site": self.site, "layer": self.layer, "unit": self.unit, "tokens": self.tokens,
            "firing_frequency": self.firing_frequency, "dead": self.dead,
        }


@dataclass(frozen=True, eq=False)
class TokenFiring(TableResult):
    """One row per (site, m) for m = 0 … units: how many tokens had exactly m units firing."""

    table_name: ClassVar[str] = "token_firing"

    site: np.ndarray  # [rows] object
    layer: np.ndarray  # [rows] int64
    units_firing: np.ndarray  # [rows] int64, m
    tokens: np.ndarray  # [rows] int64, tokens with exactly m units firing
    share: np.ndarray  # [rows] float64, tokens / all tokens of the site

    def to_table(self) -> dict[str, np.ndarray]:
        return {
            "site": self.site, "layer": self.layer, "units_firing": self.units_firing,
            "tokens": self.tokens, "share": self.share,
        }

    def counts(self, site: str) -> np.ndarray:
        """``[units + 1]`` int64: entry m is the number of tokens with m units firing."""
        return self.tokens[self.site == site]


@dataclass(frozen=True, eq=False)
class ActivationSparsity(TableResult):
    """Activation ratio, sparsity and dead units per site (``to_table``: one row per site),
    with the per-unit (``per_unit``) and per-token (``per_token``) views beside it."""

    table_name: ClassVar[str] = "activation_sparsity"

    criterion: str  # "a > 0" or "|a| > ε"
    site: np.ndarray  # [sites] object
    layer: np.ndarray  # [sites] int64 (−1 outside blocks)
    units: np.ndarray  # [sites] int64
    tokens: np.ndarray  # [sites] int64, real tokens seen
    activation_ratio: np.ndarray  # [sites] float64
    dead_units: np.ndarray  # [sites] int64
    per_unit: UnitFiring
    per_token: TokenFiring

    @property
    def sparsity(self) -> np.ndarray:
        """``[sites]`` float64: 1 − activation ratio."""
        return 1.0 - self.activation_ratio

    @property
    def overall_activation_ratio(self) -> float:
        """Fired (unit, token) pairs over all pairs, pooled over every site (our choice for a
        single figure: sites weigh by units × tokens, so it is the layer mean when all sites
        have the same width and see the same tokens)."""
        pairs = self.units.astype(np.float64) * self.tokens
        return float((self.activation_ratio * pairs).sum() / pairs.sum()) if pairs.sum() else math.nan

    def dead(self, site: str | None = None) -> dict[str, np.ndarray] | np.ndarray:
        """Indices of the dead units: of one ``site``, or ``{site: indices}`` for every site."""
        table = self.per_unit
        if site is not None:
            _check_site(site, list(self.site))
            return table.unit[(table.site == site) & table.dead]
        return {name: table.unit[(table.site == name) & table.dead] for name in self.site}

    def to_table(self) -> dict[str, np.ndarray]:
        return {
            "site": self.site, "layer": self.layer, "units": self.units, "tokens": self.tokens,
            "activation_ratio": self.activation_ratio, "sparsity": self.sparsity, "dead_units": self.dead_units,
        }


# -- the measurement ----------------------------------------------------------------------
def activation_sparsity(
    model_or_run: Any,
    data: Any = None,
    sites: str | Sequence[str] | None = None,
    *,
    criterion: str | float = POS,
    **profile_options: Any,
) -> ActivationSparsity:
    """Activation ratio, sparsity and dead units of ``sites``.

    ``model_or_run``: a :class:`actscope.Run` (from ``profile`` or ``open_run``), the path of a
    run directory, or anything ``actscope.profile`` takes as a model (it is then profiled on
    ``data`` with ``profile_options``, e.g. ``batch_size``, ``max_tokens``). ``sites``: for a
    model, a site selection (default ``blocks.*.mlp.post``); for a run, site labels or
    shell-style globs over them (default: every unit site of the run). ``criterion``:
    ``"pos"`` (``a > 0``) or a float ε (``|a| > ε``; a run must have ε in its
    ``config.eps`` ladder, and profiling adds it to the ladder when it is not there).
    """
    threshold = _check_criterion(criterion)
    run = _as_run(model_or_run, data, sites, threshold, profile_options)
    labels = _select_sites(run, sites if _is_run_source(model_or_run) else None)
    return _read(run, labels, threshold)


def _check_criterion(criterion: Any) -> float | None:
    """None for ``a > 0``, else the ε of ``|a| > ε``."""
    if isinstance(criterion, str) and criterion == POS:
        return None
    if isinstance(criterion, (int, float)) and not isinstance(criterion, bool) and math.isfinite(criterion) and criterion >= 0:
        return float(criterion)
    raise InputError(
        f"criterion must be 'pos' (a > 0) or a finite float eps >= 0 (|a| > eps), got {criterion!r}; "
        "pass e.g. criterion='pos' for ReLU models or criterion=0.0 for gated MLPs"
    )


def _is_run_source(model_or_run: Any) -> bool:
    from ..run import Run

    if isinstance(model_or_run, Run):
        return True
    return isinstance(model_or_run, (str, os.PathLike)) and (Path(model_or_run) / "manifest.json").is_file()


def _as_run(model_or_run: Any, data: Any, sites: Any, threshold: float | None, options: dict[str, Any]) -> Any:
    from ..run import Run, open_run

    if _is_run_source(model_or_run):
        if data is not None or options:
            given = ["data"] * (data is not None) + sorted(options)
            raise InputError(
                f"{', '.join(given)} only apply when profiling a model, but a finished run was given; "
                "drop them, or pass the model instead of the run"
            )
        return model_or_run if isinstance(model_or_run, Run) else open_run(model_or_run)
    from ..feeding import source_for
    from ..models import as_model
    from ..sites import plan_sites
    from ..stats import DEFAULT_EPS
    from .observed import ProfileConfig, observe_run

    if threshold is not None and "eps" not in options and threshold not in DEFAULT_EPS:
        options = {**options, "eps": tuple(sorted({*DEFAULT_EPS, threshold}))}
    config = ProfileConfig(**options).checked()
    model = as_model(model_or_run)
    plan = plan_sites(model, sites if sites is not None else DEFAULT_SITES)
    return observe_run(model, plan, source_for(model, data, **vars(config.limits)), config)[0]


def _select_sites(run: Any, sites: str | Sequence[str] | None) -> list[str]:
    """The run's unit-site labels in run order, filtered by labels or globs."""
    labels = [str(name) for name in run.table("layers").column("site").to_pylist()]
    if sites is None:
        return labels
    patterns = [sites] if isinstance(sites, str) else list(sites)
    chosen = [label for label in labels if any(fnmatch.fnmatchcase(label, p) for p in patterns)]
    if not chosen:
        raise InputError(
            f"no site of this run matches {patterns}; the run has: {', '.join(labels) or 'none'}. "
            "Pass those labels (or globs such as 'blocks.*.mlp.post'), or profile the model again with other sites"
        )
    return chosen


def _check_site(site: str, labels: list[str]) -> None:
    if site not in labels:
        raise InputError(f"no site '{site}' in this result; it has: {', '.join(labels)}")


# -- reading the run's tables -------------------------------------------------------------
@dataclass(frozen=True)
class _Columns:
    """Which run columns and which firing row hold one criterion."""

    name: str
    ratio: str
    dead: str
    frac: str
    firing_row: int


def _columns(run: Any, threshold: float | None) -> _Columns:
    from .tables import eps_column

    if threshold is None:
        return _Columns("a > 0", "activation_ratio", "dead_units", "frac_pos", 0)
    ladder = [float(e) for e in run.manifest.get("config", {}).get("eps", [])]
    matches = [j for j, e in enumerate(ladder) if math.isclose(e, threshold, rel_tol=1e-12, abs_tol=0.0)]
    if not matches:
        raise InputError(
            f"this run recorded |a| > eps only for eps in {ladder}, not {threshold:g}; pass one of those "
            f"as criterion, or profile again with eps=({', '.join(f'{e:g}' for e in ladder)}, {threshold:g})"
        )
    eps = ladder[matches[0]]
    return _Columns(
        f"|a| > {eps:g}",
        eps_column("activation_ratio_abs_gt", eps),
        eps_column("dead_units_abs_gt", eps),
        eps_column("frac_abs_gt", eps),
        matches[0] + 1,
    )


def _read(run: Any, labels: list[str], threshold: float | None) -> ActivationSparsity:
    cols = _columns(run, threshold)
    layers = run.to_pandas("layers").set_index("site").loc[labels]
    return ActivationSparsity(
        criterion=cols.name,
        site=np.array(labels, dtype=object),
        layer=layers["layer"].to_numpy(np.int64),
        units=layers["units"].to_numpy(np.int64),
        tokens=layers["tokens"].to_numpy(np.int64),
        activation_ratio=layers[cols.ratio].to_numpy(np.float64),
        dead_units=layers[cols.dead].to_numpy(np.int64),
        per_unit=_unit_firing(run, labels, cols),
        per_token=_token_firing(run, labels, layers["layer"].to_numpy(np.int64), cols),
    )


def _unit_firing(run: Any, labels: list[str], cols: _Columns) -> UnitFiring:
    neurons = run.to_pandas("neurons")
    order = {label: i for i, label in enumerate(labels)}
    rows = neurons[neurons["site"].isin(order)]
    rows = rows.assign(_order=rows["site"].map(order)).sort_values(["_order", "unit"], kind="stable")
    frequency = rows[cols.frac].to_numpy(np.float64)  # NaN where the unit saw no finite value
    return UnitFiring(
        site=rows["site"].to_numpy(object),
        layer=rows["layer"].to_numpy(np.int64),
        unit=rows["unit"].to_numpy(np.int64),
        tokens=rows["count"].to_numpy(np.int64),
        firing_frequency=frequency,
        dead=~(frequency > 0),  # never fired, or never had a finite value
    )


def _token_firing(run: Any, labels: list[str], layers: np.ndarray, cols: _Columns) -> TokenFiring:
    parts = []
    for label, layer in zip(labels, layers):
        counts = run.firing(label)[cols.firing_row].numpy().astype(np.int64)  # [units + 1]
        total = counts.sum()
        parts.append({
            "site": np.array([label] * len(counts), dtype=object),
            "layer": np.full(len(counts), layer, dtype=np.int64),
            "units_firing": np.arange(len(counts), dtype=np.int64),
            "tokens": counts,
            "share": counts / total if total else np.full(len(counts), np.nan),
        })
    joined = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return TokenFiring(**joined)
