"""How much of a representation each feature takes up, and how well each can be read out:
:func:`feature_variance` ("Learned feature representations are biased by complexity, learning
order, position, and more": simpler features take a larger share of the variance even when every
feature is computed equally well).

For a representation ``R`` ``[n, d]`` (one row per example) and a feature ``f`` ``[n]``:

* **variance explained** ``VE(f) = Σ_j ‖R̂_j‖² / Σ_j ‖R_j − mean(R_j)‖²``: ``R̂_j`` is the
  least-squares fit of the centred column ``j`` on the centred design of ``f`` (its one-hot
  encoding for a categorical feature, which makes ``R̂`` the mean of ``R`` within each value of
  ``f``; the value itself for a continuous one). This is the R² of the regression pooled over
  units, each unit weighted by its variance: 0 when ``R`` ignores ``f``, 1 when ``R`` is a function
  of ``f`` alone. Correlated features share variance, so the shares of several features can add
  up to more than 1; independent ones add up to at most 1. NaN for a constant representation.
* **decodability**: the held-out score of a probe that reads ``f`` from ``R`` (units standardised
  on the training part; a random split, stratified for categorical features, ``test_share`` held
  out): a **linear probe** (logistic regression → accuracy; ridge, α = 1 → R²) and a **nonlinear
  probe**, an MLP with one hidden layer of ``hidden`` ReLU units (scikit-learn's
  ``MLPClassifier`` / ``MLPRegressor``, Adam, at most 500 epochs). The nonlinear probe says
  whether ``f`` is in ``R`` at all; the linear one whether it is there along a direction.

Categorical features are integer, boolean or string values; floating values are continuous.
``R`` is a tensor or array, or the sites of any model fed ``data`` (a tensor ``[n, ...]`` in
batches, or a list of dicts of keyword inputs); a site must give one row per example.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..models import Model, as_model
from ..results import TableResult
from ..trace import Tracer, flatten

HIDDEN = 64
TEST_SHARE = 0.25
MLP_EPOCHS = 500
REPRESENTATION = "representation"  # the site label of a representation given as a tensor


@dataclass(frozen=True, eq=False)
class FeatureVariance(TableResult):
    """One row per (site, feature): ``variance_explained``, the probes' held-out scores
    (``score`` says which: ``accuracy`` or ``r2``; NaN when probes were not asked for) and the
    site's ``total_variance`` (the sum over units of each unit's variance over the rows)."""

    table_name: ClassVar[str] = "feature_variance"

    site: np.ndarray  # [rows] object
    feature: np.ndarray  # [rows] object
    kind: np.ndarray  # [rows] object: "categorical" or "continuous"
    variance_explained: np.ndarray  # [rows] float64
    linear_probe: np.ndarray  # [rows] float64
    nonlinear_probe: np.ndarray  # [rows] float64
    score: np.ndarray  # [rows] object: "accuracy" or "r2"
    total_variance: np.ndarray  # [rows] float64

    def to_table(self) -> dict[str, np.ndarray]:
        return {"site": self.site, "feature": self.feature, "kind": self.kind, "variance_explained": self.variance_explained,
                "linear_probe": self.linear_probe, "nonlinear_probe": self.nonlinear_probe, "score": self.score,
                "total_variance": self.total_variance}

    def of(self, feature: str, site: str | None = None, column: str = "variance_explained") -> float:
        """One value of one feature (at the only site when ``site`` is None)."""
        if column not in ("variance_explained", "linear_probe", "nonlinear_probe", "total_variance"):
            raise InputError(f"column must be variance_explained, linear_probe, nonlinear_probe or total_variance, got {column!r}")
        sites = list(dict.fromkeys(self.site.tolist()))
        if site is None and len(sites) != 1:
            raise InputError(f"this result holds {len(sites)} sites ({', '.join(sites)}); name one")
        site = sites[0] if site is None else site
        rows = np.nonzero((self.site == site) & (self.feature == feature))[0]
        if not len(rows):
            raise InputError(f"no feature {feature!r} at site {site!r}; this result holds features "
                             f"{', '.join(dict.fromkeys(self.feature.tolist()))} at {', '.join(sites)}")
        return float(getattr(self, column)[rows[0]])


# -- the measure on one matrix ------------------------------------------------------------
def _kind(values: np.ndarray) -> str:
    return "continuous" if values.dtype.kind == "f" else "categorical"


def checked_features(features: Any, n: int | None = None) -> dict[str, np.ndarray]:
    """``{name: values [n]}`` checked: 1-D, one value per row, finite, not constant."""
    if not isinstance(features, Mapping) or not features:
        raise InputError("features must be a non-empty dict {name: values [n]}, e.g. {'easy': y_easy, 'hard': y_hard}")
    found = {}
    for name, values in features.items():
        v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        if v.ndim != 1 or (n is not None and len(v) != n):
            raise InputError(f"feature {name!r} has shape {v.shape}; give one value per row of the representation "
                             f"({n} rows: one per example, or per real token of a sequence site)")
        if _kind(v) == "continuous" and not np.isfinite(v).all():
            raise InputError(f"feature {name!r} holds NaN or infinite values; drop those rows or fill them")
        if len(np.unique(v)) < 2:
            raise InputError(f"feature {name!r} takes a single value over the {len(v)} rows, so it explains nothing; "
                             "use data on which it varies")
        found[str(name)] = v
    return found


def variance_explained(representation: Any, values: Any) -> float:
    """``VE(f)`` of one feature ``values`` ``[n]`` in ``representation`` ``[n, d]`` (see the module docstring)."""
    from .similarity import as_matrix

    r = as_matrix(representation, "representation")
    v = checked_features({"feature": values}, r.shape[0])["feature"]
    return _explained(r - r.mean(dim=0), v)


def _explained(centred: torch.Tensor, values: np.ndarray) -> float:
    total = float(centred.square().sum())
    if total <= 0:
        return float("nan")
    if _kind(values) == "categorical":
        _, groups = np.unique(values, return_inverse=True)
        onehot = torch.nn.functional.one_hot(torch.as_tensor(groups.ravel()), int(groups.max()) + 1).to(torch.float64)  # [n, k]
        means = (onehot.t() @ centred) / onehot.sum(dim=0)[:, None]  # [k, d]: the least-squares fit within each value
        fitted = onehot @ means
    else:
        f = torch.as_tensor(values, dtype=torch.float64)
        f = f - f.mean()
        fitted = f[:, None] * (f @ centred)[None] / (f @ f)
    return float(fitted.square().sum()) / total


def _split(values: np.ndarray, test_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified by the feature's values where every value can be on both sides, random otherwise."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(values))
    try:
        train, test = train_test_split(rows, test_size=test_share, stratify=values if _kind(values) == "categorical" else None,
                                       random_state=seed)
    except ValueError:  # too few rows of some value to put it on both sides
        train, test = train_test_split(rows, test_size=test_share, random_state=seed)
    if _kind(values) == "categorical" and len(np.unique(values[train])) < 2:
        raise InputError(f"the probes' training part ({len(train)} of {len(values)} rows) holds a single value of the feature; "
                         "use more examples or probes=False")
    return train, test


def _probe(kind: str, nonlinear: bool, hidden: int, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if nonlinear:
        mlp = MLPClassifier if kind == "categorical" else MLPRegressor
        model = mlp(hidden_layer_sizes=(hidden,), max_iter=MLP_EPOCHS, random_state=seed)
    else:
        model = LogisticRegression(max_iter=2000, random_state=seed) if kind == "categorical" else Ridge(alpha=1.0)
    return make_pipeline(StandardScaler(), model)


def probe_scores(representation: np.ndarray, values: np.ndarray, *, test_share: float = TEST_SHARE, seed: int = 0,
                 hidden: int = HIDDEN) -> tuple[float, float]:
    """Held-out (linear, nonlinear) probe scores of ``values`` from ``representation`` ``[n, d]``:
    accuracy for a categorical feature, R² for a continuous one."""
    try:
        from sklearn.exceptions import ConvergenceWarning
    except ImportError:
        raise InputError("the probes need scikit-learn: pip install 'actscope[metrics]', or pass probes=False "
                         "for the variance shares alone") from None

    train, test = _split(values, test_share, seed)
    kind = _kind(values)
    scores = []
    for nonlinear in (False, True):
        probe = _probe(kind, nonlinear, hidden, seed)
        with warnings.catch_warnings():
            # a probe that has not converged in its budget still gives an honest held-out score
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(representation[train], values[train])
        scores.append(float(probe.score(representation[test], values[test])))
    return scores[0], scores[1]


# -- reading sites ------------------------------------------------------------------------
class _Rows(Tracer):
    """Every site's rows of every forward call, in order."""

    def __init__(self, model: Model, sites: Any) -> None:
        super().__init__(model, sites, announce=False)
        self.rows: dict[str, list[torch.Tensor]] = {}

    def on_site(self, site: Any, value: Any, module: torch.nn.Module) -> None:
        reading = flatten(site, value, self._batch_info(), module).values
        self.rows.setdefault(site.label, []).append(reading.to("cpu", torch.float64))


def site_matrices(model: Any, data: Any, sites: str | Sequence[str], batch_size: int = 256) -> dict[str, torch.Tensor]:
    """``{site label: [rows, units]}`` (float64, CPU) of ``model``'s ``sites`` over ``data``, in eval mode, no grad."""
    from .codes import _forward_calls, _to_device
    from .representations import evaluating

    wrapped = as_model(model)
    tracer = _Rows(wrapped, sites)
    calls = _forward_calls(data, batch_size)
    with tracer.attached(), torch.no_grad(), evaluating(wrapped.module):
        for args, kwargs in calls:
            wrapped(*_to_device(args, wrapped.device), **_to_device(kwargs, wrapped.device))
    missing = [site.label for site in tracer.plan.sites if site.label not in tracer.rows]
    if missing:
        raise InputError(f"site {missing[0]} produced no activation during the forward passes; pick sites the model runs (`actscope sites` lists them)")
    return {label: torch.cat(parts) for label, parts in tracer.rows.items()}


# -- the entry point ----------------------------------------------------------------------
def feature_variance(source: Any, features: Mapping[str, Any], data: Any = None, sites: str | Sequence[str] | None = None, *,
                     probes: bool = True, test_share: float = TEST_SHARE, seed: int = 0, hidden: int = HIDDEN,
                     batch_size: int = 256) -> FeatureVariance:
    """Variance explained by, and probe decodability of, each of ``features`` (``{name: values [n]}``)
    in a representation: ``source`` itself (a tensor or array ``[n, d]``), or each of ``sites`` of
    the model ``source`` fed ``data`` (see the module docstring). ``probes=False`` skips the probes
    (their columns are NaN); ``seed`` fixes the probes' split and initialisation."""
    if isinstance(test_share, bool) or not isinstance(test_share, (int, float)) or not 0 < test_share < 1:
        raise InputError(f"test_share must be a fraction between 0 and 1 (the probes' held-out share), got {test_share!r}")
    if data is None:
        if sites is not None:
            raise InputError("sites= needs data= (the inputs to feed the model); to measure a tensor, pass it alone as the representation")
        from .similarity import as_matrix

        matrices = {REPRESENTATION: as_matrix(source, "representation")}
    else:
        if sites is None:
            raise InputError("feature_variance over a model needs sites=, e.g. 'module:3@output' (the penultimate layer)")
        matrices = site_matrices(source, data, sites, batch_size)
    rows = [_row(label, r, name, v, probes, test_share, seed, hidden) for label, r in matrices.items()
            for name, v in checked_features(features, _row_count(label, r)).items()]
    text, numbers = ("site", "feature", "kind", "score"), ("variance_explained", "linear_probe", "nonlinear_probe", "total_variance")
    return FeatureVariance(**{key: np.array([row[key] for row in rows], dtype=object) for key in text},
                           **{key: np.array([row[key] for row in rows], dtype=np.float64) for key in numbers})


def _row_count(label: str, r: torch.Tensor) -> int:
    if r.shape[0] < 4:
        raise InputError(f"{label} has {r.shape[0]} rows; variance and probes need at least 4 examples")
    return r.shape[0]


def _row(label: str, r: torch.Tensor, name: str, values: np.ndarray, probes: bool, test_share: float, seed: int,
         hidden: int) -> dict[str, Any]:
    centred = r - r.mean(dim=0)
    kind = _kind(values)
    linear, nonlinear = probe_scores(r.numpy(), values, test_share=test_share, seed=seed, hidden=hidden) if probes else (np.nan, np.nan)
    return {"site": label, "feature": name, "kind": kind, "score": "accuracy" if kind == "categorical" else "r2",
            "variance_explained": _explained(centred, values), "linear_probe": linear, "nonlinear_probe": nonlinear,
            "total_variance": float(centred.square().sum()) / len(centred)}


__all__ = ["FeatureVariance", "checked_features", "feature_variance", "probe_scores", "site_matrices", "variance_explained"]
