"""Encoding models: how well a site's activations predict recorded responses (neural data,
behaviour, any stimuli × channels array), layer by layer and model by model.

* :func:`ridge_cv` — ridge regression from features ``[stimuli, features]`` to responses
  ``[stimuli, channels]``, cross-validated: for each of ``folds`` folds (sklearn's
  ``KFold(folds, shuffle=True, random_state=seed)`` split, or your own list of
  ``(train, test)`` index arrays) the features are z-scored with the training fold's mean and
  standard deviation (``standardize``), the ridge penalty is chosen per channel from ``alphas``
  by exact leave-one-out error on the training fold (the efficient form of
  ``RidgeCV(alpha_per_target=True)``), the intercept is not penalised, and the held-out
  stimuli are predicted. **R² per channel** is ``1 − Σ(y − ŷ)² / Σ(y − ȳ)²`` over the pooled
  out-of-fold predictions (ȳ the mean over all stimuli), i.e. ``r2_score`` of
  ``cross_val_predict``.
* **Noise ceiling** when repeats are given (responses ``[repeats, stimuli, channels]``; the
  target is their mean): the share of the repeat-mean's variance across stimuli that is not
  trial noise, ``1 − σ²_noise / (r · Var_s(ȳ))`` with ``σ²_noise`` the mean over stimuli of
  the variance across the r repeats (unbiased, ddof 1) *(our choice: the explainable-variance
  ceiling)*. ``normalized_r2 = R² / ceiling`` for channels with a positive ceiling.
* :func:`encoding_scores` — every site of every model (or every precomputed feature set)
  against the same responses in one call: ``.best()`` says which model ("objective") and which
  layer predicts the recording best. Stimuli are fed through each model (one stimulus = one
  example, pooled over its tokens: ``pool="mean"`` or ``"last"``).
* :func:`load_responses` — responses from ``.npy`` / ``.npz`` (2-D, or 3-D with repeats
  first), ``.csv`` or ``.parquet`` (numeric columns are channels, one row per stimulus; a
  ``repeat`` column stacks repeats, a ``stimulus`` column orders the rows).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..errors import DataError, InputError
from ..results import TableResult

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 6, 9))
DEFAULT_FOLDS = 5


# -- responses ----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Responses:
    """Recorded responses: ``values`` ``[stimuli, channels]`` (the mean over repeats when
    there are repeats) and ``repeats`` ``[repeats, stimuli, channels]`` or None."""

    values: np.ndarray
    repeats: np.ndarray | None = None
    channels: tuple[str, ...] = ()

    @property
    def stimuli(self) -> int:
        return int(self.values.shape[0])

    def noise_ceiling(self) -> np.ndarray | None:
        """Per channel, the explainable share of the repeat-mean's variance (module docstring)."""
        return None if self.repeats is None else noise_ceiling(self.repeats)


def noise_ceiling(repeats: Any) -> np.ndarray:
    """``1 − σ²_noise / (r · Var_s(ȳ))`` per channel of ``repeats`` ``[r, stimuli, channels]``."""
    repeats = np.asarray(repeats, dtype=np.float64)
    if repeats.ndim != 3 or repeats.shape[0] < 2:
        raise InputError(f"a noise ceiling needs responses [repeats ≥ 2, stimuli, channels], got shape {repeats.shape}")
    count = repeats.shape[0]
    noise = repeats.var(axis=0, ddof=1).mean(axis=0)  # [channels]
    signal = repeats.mean(axis=0).var(axis=0, ddof=1)  # [channels]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(signal > 0, 1.0 - noise / (count * signal), np.nan)


def as_responses(source: Any) -> Responses:
    """Responses from a :class:`Responses`, an array ``[stimuli, channels]`` or
    ``[repeats, stimuli, channels]``, or a file (:func:`load_responses`)."""
    if isinstance(source, Responses):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_responses(source)
    array = _numeric(source, "responses")
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim == 3:
        return Responses(array.mean(axis=0), array, tuple(str(c) for c in range(array.shape[2])))
    if array.ndim != 2:
        raise InputError(f"responses must be [stimuli, channels] or [repeats, stimuli, channels], got shape {array.shape}")
    return Responses(array, None, tuple(str(c) for c in range(array.shape[1])))


def _numeric(source: Any, what: str) -> np.ndarray:
    try:
        array = np.asarray(source.detach().cpu() if hasattr(source, "detach") else source, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise InputError(f"{what} must be a numeric array, got {type(source).__name__} ({error})") from None
    if not np.isfinite(array).all():
        raise DataError(f"{what} hold {int((~np.isfinite(array)).sum())} NaN or infinite value(s); drop those stimuli or channels first")
    return array


def load_responses(path: str | os.PathLike, *, repeat_column: str = "repeat", stimulus_column: str = "stimulus") -> Responses:
    """Responses from a file: ``.npy`` (2-D, or 3-D with repeats first), ``.npz`` (its one
    array, or ``responses``), ``.csv`` / ``.parquet`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no responses file at {path}; pass a .npy, .npz, .csv or .parquet file")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return as_responses(_read_numpy(path))
    if suffix in (".csv", ".parquet"):
        return _from_table(_read_table(path, suffix), path, repeat_column, stimulus_column)
    raise DataError(f"cannot read responses from {path.name}: use .npy, .npz, .csv or .parquet")


def _read_numpy(path: Path) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise DataError(f"{path} is not a readable NumPy file without pickles ({error})") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        names = list(loaded.files)
        key = "responses" if "responses" in names else (names[0] if len(names) == 1 else None)
        if key is None:
            raise DataError(f"{path} holds arrays {names}; name the responses array 'responses' or keep one array")
        return loaded[key]


def _read_table(path: Path, suffix: str) -> Any:
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path) if suffix == ".parquet" else pa_csv.read_csv(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises many kinds for broken files
        raise DataError(f"cannot read {path} as {suffix[1:]} ({error}); check the file") from None


def _from_table(table: Any, path: Path, repeat_column: str, stimulus_column: str) -> Responses:
    import pyarrow.types as pt

    names = table.column_names
    if len(set(names)) != len(names):
        raise DataError(f"{path} has repeated column names; give every channel its own name")
    channels = [n for n in names if n not in (repeat_column, stimulus_column) and (
        pt.is_integer(table.schema.field(n).type) or pt.is_floating(table.schema.field(n).type))]
    if not channels:
        raise DataError(f"{path} has no numeric channel columns (found: {', '.join(names)})")
    values = np.column_stack([table.column(n).to_numpy(zero_copy_only=False).astype(np.float64) for n in channels])
    values = _numeric(values, f"the channels of {path.name}")
    stimulus = table.column(stimulus_column).to_pylist() if stimulus_column in names else list(range(table.num_rows))
    if repeat_column not in names:
        order = _order(stimulus, path)
        return Responses(values[order], None, tuple(channels))
    repeat = table.column(repeat_column).to_pylist()
    stacked = []
    for r in sorted(set(repeat)):
        rows = [i for i, v in enumerate(repeat) if v == r]
        if stimulus_column not in names:
            stacked.append(values[rows])
            continue
        keys = [stimulus[i] for i in rows]
        stacked.append(values[[rows[i] for i in _order(keys, path)]])
        if sorted(keys) != sorted({stimulus[i] for i in range(len(stimulus))}):
            raise DataError(f"repeat {r} of {path.name} does not cover every stimulus once; each repeat needs all stimuli")
    if len({s.shape[0] for s in stacked}) != 1:
        raise DataError(f"the repeats of {path.name} have different numbers of rows; each repeat needs all stimuli")
    repeats = np.stack(stacked)
    return Responses(repeats.mean(axis=0), repeats, tuple(channels))


def _order(keys: list, path: Path) -> list[int]:
    if len(set(keys)) != len(keys):
        raise DataError(f"{path.name} lists a stimulus twice without a repeat column; add a 'repeat' column")
    return sorted(range(len(keys)), key=lambda i: keys[i])


# -- cross-validated ridge ------------------------------------------------------------------------
def kfold(n: int, folds: int = DEFAULT_FOLDS, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """sklearn's ``KFold(folds, shuffle=True, random_state=seed).split`` of ``n`` samples."""
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= n:
        raise InputError(f"folds must be a whole number from 2 to the number of stimuli ({n}), got {folds!r}")
    indices = np.arange(n)
    np.random.RandomState(seed).shuffle(indices)
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    found, start = [], 0
    for size in sizes:
        test = indices[start:start + size]
        found.append((np.setdiff1d(np.arange(n), test), np.sort(test)))
        start += size
    return found


@dataclass(frozen=True, eq=False)
class RidgeFit(TableResult):
    """Cross-validated ridge: ``r2`` per channel, the penalty chosen per fold and channel,
    the out-of-fold ``predictions``, and the ``noise_ceiling`` (None without repeats)."""

    table_name: ClassVar[str] = "encoding_channels"

    r2: np.ndarray  # [channels]
    alphas: np.ndarray  # [folds, channels]
    predictions: np.ndarray  # [stimuli, channels]
    noise_ceiling: np.ndarray | None
    channels: tuple[str, ...]

    @property
    def normalized_r2(self) -> np.ndarray | None:
        if self.noise_ceiling is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.noise_ceiling > 0, self.r2 / self.noise_ceiling, np.nan)

    def to_table(self) -> dict[str, np.ndarray]:
        table = {"channel": np.array(self.channels, dtype=object), "r2": self.r2,
                 "alpha_median": np.median(self.alphas, axis=0)}
        if self.noise_ceiling is not None:
            table.update(noise_ceiling=self.noise_ceiling, normalized_r2=self.normalized_r2)
        return table


def ridge_cv(features: Any, responses: Any, *, alphas: Sequence[float] = DEFAULT_ALPHAS,
             folds: int | Sequence[tuple[Any, Any]] = DEFAULT_FOLDS, seed: int = 0, standardize: bool = True) -> RidgeFit:
    """Cross-validated ridge from ``features`` ``[stimuli, features]`` to ``responses`` (an
    array ``[stimuli, channels]`` or ``[repeats, stimuli, channels]``, a file, or
    :class:`Responses`); see the module docstring."""
    target = as_responses(responses)
    x = _numeric(features, "features")
    x = x[:, None] if x.ndim == 1 else x.reshape(x.shape[0], -1)
    y = target.values
    if x.shape[0] != y.shape[0]:
        raise InputError(f"features have {x.shape[0]} stimuli and responses {y.shape[0]}; both need one row per stimulus, in the same order")
    grid = _alphas(alphas)
    splits = kfold(len(y), folds, seed) if isinstance(folds, int) and not isinstance(folds, bool) else _checked_folds(folds, len(y))
    predictions = np.zeros_like(y)
    chosen = np.zeros((len(splits), y.shape[1]))
    for k, (train, test) in enumerate(splits):
        predictions[test], chosen[k] = _fit_predict(x[train], y[train], x[test], grid, standardize)
    residual = ((y - predictions) ** 2).sum(axis=0)
    total = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(total > 0, 1.0 - residual / total, np.nan)
    return RidgeFit(r2, chosen, predictions, target.noise_ceiling(), target.channels or tuple(map(str, range(y.shape[1]))))


def _alphas(alphas: Sequence[float]) -> np.ndarray:
    grid = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if grid.size == 0 or not np.all(np.isfinite(grid)) or not np.all(grid > 0):
        raise InputError(f"alphas must be positive numbers (ridge penalties), got {list(np.atleast_1d(alphas))!r}")
    return grid


def _checked_folds(folds: Sequence[tuple[Any, Any]], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    found = []
    covered = np.zeros(n, dtype=int)
    for train, test in folds:
        train, test = np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)
        if len(train) < 2 or len(test) < 1 or train.min() < 0 or test.min() < 0 or max(train.max(), test.max()) >= n:
            raise InputError(f"each fold must be (train indices, test indices) within 0..{n - 1}, at least 2 training stimuli")
        covered[test] += 1
        found.append((train, test))
    if not np.all(covered == 1):
        raise InputError("the folds' test sets must cover every stimulus exactly once (R² is computed on the pooled held-out predictions)")
    return found


def _fit_predict(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, alphas: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ridge on one training fold (intercept unpenalised), penalty per channel by exact
    leave-one-out error; returns (predictions for ``x_test``, chosen penalties)."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0) if standardize else np.ones(x.shape[1])
    scale = np.where(scale > 0, scale, 1.0)  # a constant feature stays as it is (StandardScaler's rule)
    xc, xt = (x - mean) / scale, (x_test - mean) / scale
    y_mean = y.mean(axis=0)
    yc = y - y_mean
    u, s, vt = np.linalg.svd(xc, full_matrices=False)  # xc = U S Vᵀ
    uty = u.T @ yc  # [k, channels]
    n = x.shape[0]
    best, best_error = np.zeros(y.shape[1]), np.full(y.shape[1], np.inf)
    for alpha in alphas if len(alphas) > 1 else ():
        shrink = s**2 / (s**2 + alpha)  # [k]
        fitted = u @ (shrink[:, None] * uty)  # centered fitted values
        hat = 1.0 / n + (u**2) @ shrink  # [n] leverages, the intercept's 1/n included
        loo = (yc - fitted) / (1.0 - hat)[:, None]
        error = (loo**2).mean(axis=0)
        better = error < best_error
        best[better], best_error[better] = alpha, error[better]
    if len(alphas) == 1:
        best[:] = alphas[0]
    predictions = np.empty((x_test.shape[0], y.shape[1]))
    for alpha in np.unique(best):
        columns = best == alpha
        coef = vt.T @ ((s / (s**2 + alpha))[:, None] * uty[:, columns])  # [features, channels]
        predictions[:, columns] = xt @ coef + y_mean[columns]
    return predictions, best


# -- layer-wise, model-wise -------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class EncodingScores(TableResult):
    """Cross-validated R² of every (model, site) against the same responses.

    ``fits[(model, site)]`` is each :class:`RidgeFit`; the table has one row per (model, site)
    with the mean and median R² over channels (and the mean normalized R² with repeats)."""

    table_name: ClassVar[str] = "encoding"

    fits: Mapping[tuple[str, str], RidgeFit] = field(repr=False)
    stimuli: int
    channels: tuple[str, ...]

    def score(self, key: tuple[str, str]) -> float:
        return float(np.nanmean(self.fits[key].r2))

    def best(self) -> dict[str, Any]:
        """The (model, site) with the highest mean R² over channels: ``{"model", "site", "r2"}``."""
        key = max(self.fits, key=lambda k: np.nan_to_num(self.score(k), nan=-np.inf))
        return {"model": key[0], "site": key[1], "r2": self.score(key)}

    def ranking(self) -> list[tuple[str, str]]:
        """(model, site) pairs from best to worst mean R²; ties keep the order given."""
        keys = list(self.fits)
        scores = np.array([np.nan_to_num(self.score(k), nan=-np.inf) for k in keys])
        return [keys[i] for i in np.argsort(-scores, kind="stable")]

    def to_table(self) -> dict[str, np.ndarray]:
        keys = list(self.fits)
        fits = [self.fits[k] for k in keys]
        table = {
            "model": np.array([k[0] for k in keys], dtype=object),
            "site": np.array([k[1] for k in keys], dtype=object),
            "layer": np.array([_layer(k[1]) for k in keys], dtype=np.int64),
            "mean_r2": np.array([np.nanmean(f.r2) for f in fits]),
            "median_r2": np.array([np.nanmedian(f.r2) for f in fits]),
        }
        if fits and fits[0].noise_ceiling is not None:
            table["mean_normalized_r2"] = np.array([np.nanmean(f.normalized_r2) if np.isfinite(f.normalized_r2).any() else np.nan
                                                    for f in fits])
        return table

    def channels_table(self) -> dict[str, np.ndarray]:
        """One row per (model, site, channel)."""
        parts = [(k, f.to_table()) for k, f in self.fits.items()]
        columns: dict[str, list] = {"model": [], "site": []}
        for (model, site), table in parts:
            count = len(table["channel"])
            columns["model"] += [model] * count
            columns["site"] += [site] * count
            for name, values in table.items():
                columns.setdefault(name, []).extend(list(values))
        return {name: np.array(values, dtype=object if name in ("model", "site", "channel") else np.float64)
                for name, values in columns.items()}


def _layer(site: str) -> int:
    parts = site.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else -1


def encoding_scores(models: Any, stimuli: Any, responses: Any, sites: Any = "blocks.*.resid.post", *, pool: str = "mean",
                    alphas: Sequence[float] = DEFAULT_ALPHAS, folds: int | Sequence = DEFAULT_FOLDS, seed: int = 0,
                    standardize: bool = True, batch_size: int = 8, max_length: int = 128, column: str | None = None) -> EncodingScores:
    """Cross-validated ridge R² of every site of every model against ``responses``.

    ``models``: one model, a dict ``{name: model}`` (e.g. one per training objective), or a
    dict ``{name: {site: features [stimuli, features]}}`` of features computed elsewhere.
    ``stimuli``: what the models are fed, one example per stimulus in the order of the
    responses' rows (texts, or model-input dicts); ignored for precomputed features.
    ``sites``: the selection for every model. The folds are the same for every (model, site).
    """
    target = as_responses(responses)
    named = models if isinstance(models, Mapping) else {_name(models): models}
    if not named:
        raise InputError("models is empty; pass a model, {name: model}, or {name: {site: features}}")
    features = {}
    for name, model in named.items():
        per_site = model if isinstance(model, Mapping) else stimulus_features(model, stimuli, sites, pool=pool, batch_size=batch_size,
                                                                              max_length=max_length, column=column)
        for site, x in per_site.items():
            features[(str(name), str(site))] = x
    splits = kfold(target.stimuli, folds, seed) if isinstance(folds, int) and not isinstance(folds, bool) else folds
    fits = {key: ridge_cv(x, target, alphas=alphas, folds=splits, standardize=standardize) for key, x in features.items()}
    return EncodingScores(fits, target.stimuli, target.channels)


def _name(model: Any) -> str:
    return getattr(model, "name", None) or type(getattr(model, "module", model)).__name__


def stimulus_features(model: Any, stimuli: Any, sites: Any, *, pool: str = "mean", batch_size: int = 8, max_length: int = 128,
                      column: str | None = None) -> dict[str, np.ndarray]:
    """``{site: [stimuli, units]}``: each stimulus's activations pooled over its tokens."""
    from ..models import as_model
    from ..sites import plan_sites
    from .representations import reusable, site_rows

    if pool not in ("mean", "last"):
        raise InputError(f"pool must be 'mean' or 'last' (one row per stimulus), got {pool!r}")
    model = as_model(model)
    plan = plan_sites(model, sites)
    rows: dict[str, list] = {label: [] for label in plan.names}
    ids: list = []
    for batch in site_rows(model, plan, reusable(stimuli, column), pool=pool, batch_size=batch_size, max_length=max_length):
        ids.append(batch.ids[plan.names[0]])
        for label in plan.names:
            rows[label].append(batch.values[label].double().cpu().numpy())
    order = np.concatenate([i.numpy() for i in ids]) if ids else np.zeros(0, dtype=np.int64)
    if not np.array_equal(order, np.arange(len(order))):
        raise DataError(f"{model.name} did not see the stimuli one example each, in order (examples {order[:6].tolist()}…); "
                        "pass one text or one input per stimulus")
    return {label: np.concatenate(parts) for label, parts in rows.items()}


__all__ = ["Responses", "RidgeFit", "EncodingScores", "ridge_cv", "encoding_scores", "noise_ceiling", "load_responses",
           "as_responses", "stimulus_features", "kfold"]
