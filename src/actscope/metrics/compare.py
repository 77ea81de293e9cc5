"""Compare the representations of two models (or two site sets of one) on the same inputs: a
site × site similarity matrix in one call, :func:`compare_representations`.

**What streams.** Linear CKA (both estimators) streams: the data passes through the models in
mini-batches and only feature-space sums are kept, in float64 — per site ``n``, ``Σx``,
``ΣxxᵀF`` (``Xᵀ X``), and per pair of sites ``Xᵀ Y`` plus the few row-norm sums the unbiased
estimator needs (``Σ r s``, ``Σ s x``, ``Σ r y`` with ``r = ‖x‖²``, ``s = ‖y‖²``). Rows are
shifted by the first batch's mean before they are summed, so the centering at the end subtracts
small numbers, not large ones. Memory does not grow with the number of tokens: it is
``8 · d_a · d_b`` bytes per pair of sites plus ``8 · d²`` per site, whatever the sample count
(100k tokens × 4k units cost the same as 1k tokens). When all pairs do not fit in
``max_bytes``, the pairs are split into groups and the data is fed once per group (``passes``
in the result). ``precision="float32"`` multiplies each batch in float32 (twice as fast on a
CPU) and adds the products into the float64 sums; relative error about 1e-6.

**What does not stream.** RBF CKA and RSA need every pair of samples (an ``n × n`` Gram or
dissimilarity matrix per site), so they keep a uniform random sample of at most
``max_samples`` rows (reservoir sampling, the same rows for every site, ``seed``) and compute on
those: ``max_samples × Σ units`` values (float32) during the pass, then ``max_samples²`` float64
values per site of model B plus one of model A at a time. Default 2048 samples.

Effective rank and participation ratio of every site come with linear CKA for free (from the
covariance the sums hold) and from the kept samples otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..models import Model, ModelLike, as_model
from ..results import TableResult
from ..sites import Plan, plan_sites
from . import similarity as sim
from .representations import Rows, check_pool, paired_rows, reusable, same_rows

MEASURES = ("cka", "rsa")
PRECISIONS = ("float64", "float32")
DEFAULT_SITES = "blocks.*.resid.post"
DEFAULT_SAMPLES = 2048
DEFAULT_BYTES = 2 << 30
CHUNK_BYTES = 64 << 20  # the float32 path's temporary per product chunk
Progress = Callable[[int, int], None]  # (pass number from 0, rows so far in this pass)


@dataclass(frozen=True)
class Measure:
    """What one comparison computes (checked once, at the edge)."""

    measure: str = "cka"
    kernel: str = "linear"
    unbiased: bool = False
    sigma: float = 1.0
    metric: str = "correlation"
    compare: str = "spearman"

    def checked(self) -> "Measure":
        sim._choice(self.measure, MEASURES, "measure")
        sim._choice(self.kernel, sim.KERNELS, "kernel")
        sim._choice(self.metric, sim.METRICS, "metric")
        sim._choice(self.compare, sim.RANKINGS, "compare")
        sim._check_sigma(self.sigma)
        if self.measure == "rsa" and self.unbiased:
            raise InputError("unbiased=True is an estimator of CKA's HSIC; RSA has none (drop unbiased, or use measure='cka')")
        return self

    @property
    def streams(self) -> bool:
        return self.measure == "cka" and self.kernel == "linear"

    @property
    def label(self) -> str:
        if self.measure == "rsa":
            return f"RSA ({self.metric} distance, {self.compare})"
        return f"{self.kernel} CKA" + (" (unbiased HSIC)" if self.unbiased else "") + (
            f" (σ = {self.sigma:g} × median distance)" if self.kernel == "rbf" else "")


@dataclass(frozen=True, eq=False)
class RepresentationSimilarity(TableResult):
    """A site × site similarity matrix between model A's sites (rows) and model B's (columns).

    ``values`` ``[len(sites_a), len(sites_b)]`` (NaN for pairs not compared); ``samples``: the
    rows compared (tokens, or examples when pooled); ``units``, ``effective_rank`` and
    ``participation_ratio`` per site of each side.
    """

    table_name: ClassVar[str] = "similarity"

    model_a: str
    model_b: str
    sites_a: tuple[str, ...]
    sites_b: tuple[str, ...]
    measure: str
    values: np.ndarray
    samples: int
    pool: str
    streamed: bool
    passes: int
    site_stats: dict = field(repr=False)  # (side, site) → {"units", "effective_rank", "participation_ratio"}

    def matrix(self) -> Any:
        """The matrix as a pandas DataFrame (rows: model A's sites, columns: model B's)."""
        import pandas as pd

        return pd.DataFrame(self.values, index=list(self.sites_a), columns=list(self.sites_b))

    def best_match(self) -> dict[str, str]:
        """For each site of model A, the site of model B most similar to it."""
        found = {}
        for i, site in enumerate(self.sites_a):
            row = self.values[i]
            if np.isfinite(row).any():
                found[site] = self.sites_b[int(np.nanargmax(row))]
        return found

    def to_table(self) -> dict[str, np.ndarray]:
        rows = [(i, j) for i in range(len(self.sites_a)) for j in range(len(self.sites_b)) if np.isfinite(self.values[i, j])]
        return {
            "site_a": np.array([self.sites_a[i] for i, _ in rows], dtype=object),
            "site_b": np.array([self.sites_b[j] for _, j in rows], dtype=object),
            "layer_a": np.array([_layer(self.sites_a[i]) for i, _ in rows], dtype=np.int64),
            "layer_b": np.array([_layer(self.sites_b[j]) for _, j in rows], dtype=np.int64),
            "similarity": np.array([self.values[i, j] for i, j in rows], dtype=np.float64),
            "measure": np.array([self.measure] * len(rows), dtype=object),
        }

    def sites_table(self) -> dict[str, np.ndarray]:
        """One row per site of each side: units, effective rank, participation ratio."""
        keys = [("a", s) for s in self.sites_a] + [("b", s) for s in self.sites_b]
        stats = [self.site_stats.get(key, {}) for key in keys]
        return {
            "model": np.array([self.model_a if side == "a" else self.model_b for side, _ in keys], dtype=object),
            "side": np.array([side for side, _ in keys], dtype=object),
            "site": np.array([site for _, site in keys], dtype=object),
            "units": np.array([s.get("units", -1) for s in stats], dtype=np.int64),
            "effective_rank": np.array([s.get("effective_rank", np.nan) for s in stats], dtype=np.float64),
            "participation_ratio": np.array([s.get("participation_ratio", np.nan) for s in stats], dtype=np.float64),
        }

    def _repr_html_(self) -> str:
        return f"<b>{type(self).__name__}</b> ({self.measure}, {self.samples} samples)" + self.matrix().to_html(float_format="%.3f")


def _layer(site: str) -> int:
    parts = site.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else -1


def compare_representations(
    model_a: ModelLike,
    model_b: ModelLike = None,
    data: Any = None,
    sites: str | Sequence[str] | Plan = DEFAULT_SITES,
    sites_b: str | Sequence[str] | Plan | None = None,
    *,
    pairs: str | Sequence[tuple[str, str]] = "all",
    measure: str = "cka",
    kernel: str = "linear",
    unbiased: bool = False,
    sigma: float = 1.0,
    metric: str = "correlation",
    compare: str = "spearman",
    pool: str = "tokens",
    max_samples: int = DEFAULT_SAMPLES,
    max_bytes: int = DEFAULT_BYTES,
    precision: str = "float64",
    seed: int = 0,
    batch_size: int = 8,
    max_length: int = 128,
    max_tokens: int | None = None,
    column: str | None = None,
    progress: Progress | None = None,
) -> RepresentationSimilarity:
    """Similarity of every site of ``model_a`` (``sites``) with every site of ``model_b``
    (``sites_b``, default the same selection) on the same ``data`` (see the module docstring
    for what streams).

    ``model_b=None`` compares sites of one model with each other. ``pairs``: ``"all"`` (the
    full matrix), ``"matching"`` (site i of A with site i of B only) or a list of
    ``(site_a, site_b)`` labels. ``measure``: ``"cka"`` (``kernel`` linear or rbf, ``unbiased``
    HSIC, ``sigma`` the RBF bandwidth as a multiple of the median distance) or ``"rsa"``
    (``metric`` correlation, euclidean or cosine; ``compare`` spearman, pearson or kendall).
    ``pool``: rows are tokens (the models must tokenize alike) or examples (``"mean"``,
    ``"last"``: models with different tokenizers can be compared this way).
    """
    config = Measure(measure, kernel, bool(unbiased), sigma, metric, compare).checked()
    check_pool(pool)
    _check_positive(max_samples, "max_samples")
    _check_positive(max_bytes, "max_bytes")
    sim._choice(precision, PRECISIONS, "precision")
    a = as_model(model_a)
    b = a if model_b is None else as_model(model_b)
    plan_a = plan_sites(a, sites)
    plan_b = plan_sites(b, sites if sites_b is None else sites_b)
    index_pairs = pair_indices(plan_a.names, plan_b.names, pairs)
    engine = Engine(a, plan_a, b, plan_b, reusable(data, column), pool, dict(batch_size=batch_size, max_length=max_length, max_tokens=max_tokens))
    found = engine.run(index_pairs, config, max_samples=max_samples, max_bytes=max_bytes, precision=precision, seed=seed, progress=progress)
    values = np.full((len(plan_a.names), len(plan_b.names)), np.nan)
    for (i, j), value in found.values.items():
        values[i, j] = value
    return RepresentationSimilarity(
        model_a=a.name, model_b=b.name if model_b is not None else a.name, sites_a=tuple(plan_a.names), sites_b=tuple(plan_b.names),
        measure=config.label, values=values, samples=found.samples, pool=pool, streamed=config.streams, passes=found.passes,
        site_stats=found.site_stats,
    )


def _check_positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive whole number, got {value!r}")


def pair_indices(names_a: list[str], names_b: list[str], pairs: Any) -> list[tuple[int, int]]:
    """``"all"``, ``"matching"`` or explicit ``(site_a, site_b)`` labels → index pairs."""
    if pairs == "all":
        return [(i, j) for i in range(len(names_a)) for j in range(len(names_b))]
    if pairs == "matching":
        if len(names_a) != len(names_b):
            raise InputError(f"pairs='matching' pairs site i of A with site i of B, but A has {len(names_a)} sites and B "
                             f"{len(names_b)}; select as many sites on both sides, or use pairs='all'")
        return [(i, i) for i in range(len(names_a))]
    if isinstance(pairs, str):
        raise InputError(f"pairs must be 'all', 'matching' or a list of (site_a, site_b); got {pairs!r}")
    found = []
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in names_a or pair[1] not in names_b:
            raise InputError(f"pair {pair!r} does not name a selected site of A ({', '.join(names_a[:4])}…) and one of B "
                             f"({', '.join(names_b[:4])}…)")
        found.append((names_a.index(pair[0]), names_b.index(pair[1])))
    return found


# -- the engine -------------------------------------------------------------------------------
@dataclass
class Found:
    values: dict[tuple[int, int], float]
    samples: int
    passes: int
    site_stats: dict


class Engine:
    """Feeds the data through both models and turns the rows into similarities."""

    def __init__(self, a: Model, plan_a: Plan, b: Model, plan_b: Plan, data: Any, pool: str, limits: dict) -> None:
        self.a, self.plan_a, self.b, self.plan_b = a, plan_a, b, plan_b
        self.data, self.pool, self.limits = data, pool, limits
        self.flat_is_nan = False  # a site that does not vary: an error (compare) or NaN (drift)

    def rows(self) -> Any:
        return paired_rows(self.a, self.plan_a, self.b, self.plan_b, self.data, pool=self.pool, **self.limits)

    def run(self, pairs: list[tuple[int, int]], config: Measure, *, max_samples: int, max_bytes: int, precision: str,
            seed: int, progress: Progress | None) -> Found:
        if not pairs:
            raise InputError("no pair of sites to compare")
        if config.streams:
            return self._streamed(pairs, config, max_bytes, precision, progress)
        return self._sampled(pairs, config, max_samples, seed, progress)

    # linear CKA: feature-space sums, as many passes as the memory budget needs
    def _streamed(self, pairs, config: Measure, max_bytes: int, precision: str, progress) -> Found:
        values: dict[tuple[int, int], float] = {}
        selves: dict[tuple[str, int], tuple[float, float]] = {}  # (side, index) → (biased, unbiased) self-HSIC·scale
        stats: dict = {}
        todo, passes, samples = list(pairs), 0, 0
        dims: dict[tuple[str, int], int] | None = None
        while todo:
            group = todo if dims is None else _next_group(todo, dims, selves, max_bytes)
            sums = StreamSums(group, precision, need_self=lambda key: key not in selves)
            for rows_a, rows_b in self.rows():
                if dims is None:
                    dims = _dims(rows_a, rows_b, self.plan_a, self.plan_b)
                    group = _next_group(todo, dims, selves, max_bytes)
                    sums = StreamSums(group, precision, need_self=lambda key: key not in selves)
                sums.update(rows_a, rows_b, self.plan_a.names, self.plan_b.names)
                if progress is not None:
                    progress(passes, sums.n)
            if dims is None or sums.n == 0:
                raise InputError("the data produced no rows to compare (is it empty, or all padding?)")
            passes += 1
            samples = sums.n
            if config.unbiased and samples < 4:
                raise InputError(f"the unbiased HSIC estimator needs at least 4 rows, the data gave {samples}; pass more data")
            for key, (self_values, site_stats) in sums.selves().items():
                selves[key] = self_values
                stats[(key[0], (self.plan_a if key[0] == "a" else self.plan_b).names[key[1]])] = site_stats
            for pair, (biased, unbiased) in sums.crosses().items():
                xy = unbiased if config.unbiased else biased
                xx, yy = selves[("a", pair[0])][int(config.unbiased)], selves[("b", pair[1])][int(config.unbiased)]
                if self.flat_is_nan and not (xx > 0 and yy > 0):
                    values[pair] = float("nan")
                    continue
                values[pair] = _cka_ratio(xy, xx, yy, self.plan_a.names[pair[0]], self.plan_b.names[pair[1]])
            done = set(group)
            todo = [p for p in todo if p not in done]
        return Found(values, samples, passes, stats)

    # RBF CKA and RSA: a reservoir sample of rows, then n × n matrices
    def _sampled(self, pairs, config: Measure, max_samples: int, seed: int, progress) -> Found:
        keep_a = sorted({i for i, _ in pairs})
        keep_b = sorted({j for _, j in pairs})
        reservoir = Reservoir(max_samples, seed)
        for rows_a, rows_b in self.rows():
            names = [("a", i, self.plan_a.names[i], rows_a) for i in keep_a] + [("b", j, self.plan_b.names[j], rows_b) for j in keep_b]
            for _, _, name, rows in names[1:]:
                same_rows(names[0][3].ids[names[0][2]], rows.ids[name], names[0][2], name)
            reservoir.add({(side, k): rows.values[name] for side, k, name, rows in names})
            if progress is not None:
                progress(0, reservoir.seen)
        kept = reservoir.kept()
        if not kept or reservoir.size < (4 if config.unbiased else 3):
            raise InputError(f"the data produced {reservoir.size} row(s) to compare; RBF CKA and RSA need at least 4")
        stats = {(side, (self.plan_a if side == "a" else self.plan_b).names[k]): _sample_stats(x) for (side, k), x in kept.items()}
        prepared_b = {j: _prepared(kept[("b", j)], config) for j in keep_b}
        values = {}
        for i in keep_a:
            prepared = _prepared(kept[("a", i)], config)
            for a_index, j in pairs:
                if a_index == i:
                    values[(i, j)] = _sampled_value(prepared, prepared_b[j], config)
        return Found(values, reservoir.size, 1, stats)


def _cka_ratio(xy: float, xx: float, yy: float, site_a: str, site_b: str) -> float:
    if not xx > 0 or not yy > 0:
        flat = site_a if not xx > 0 else site_b
        raise InputError(f"{flat} does not vary across the compared rows, so its CKA is undefined; leave it out of the selection")
    return float(xy / np.sqrt(xx * yy))


def _dims(rows_a: Rows, rows_b: Rows, plan_a: Plan, plan_b: Plan) -> dict[tuple[str, int], int]:
    dims = {("a", i): int(rows_a.values[name].shape[-1]) for i, name in enumerate(plan_a.names)}
    dims.update({("b", j): int(rows_b.values[name].shape[-1]) for j, name in enumerate(plan_b.names)})
    return dims


def _next_group(todo: list[tuple[int, int]], dims: dict, selves: dict, max_bytes: int) -> list[tuple[int, int]]:
    """The next pairs whose sums fit ``max_bytes`` together (self sums of sites not done yet
    included): whole rows of the matrix while they fit (one block, four products per batch),
    else pairs in order; the first pair is taken alone if nothing else fits, or refused."""
    rows, cols = sorted({i for i, _ in todo}), sorted({j for _, j in todo})
    if len(todo) > 1 and set(todo) == {(i, j) for i in rows for j in cols}:
        chosen, used, counted = [], 0, set()
        for i in rows:
            new = [key for key in [("a", i), *[("b", j) for j in cols]] if key not in selves and key not in counted]
            extra = 8 * dims[("a", i)] * sum(dims[("b", j)] for j in cols) + sum(8 * dims[key] ** 2 for key in new)
            if used + extra > max_bytes:
                break
            chosen.append(i)
            used += extra
            counted |= set(new)
        if chosen:
            return [(i, j) for i in chosen for j in cols]
    group, used, counted = [], 0, set()
    for pair in todo:
        extra = 8 * dims[("a", pair[0])] * dims[("b", pair[1])]
        for key in (("a", pair[0]), ("b", pair[1])):
            if key not in selves and key not in counted:
                extra += 8 * dims[key] ** 2
        if group and used + extra > max_bytes:
            continue
        if not group and extra > max_bytes:
            raise InputError(
                f"comparing sites with {dims[('a', pair[0])]} and {dims[('b', pair[1])]} units keeps {extra / 2**20:.0f} MiB of float64 sums, "
                f"more than max_bytes ({max_bytes / 2**20:.0f} MiB); raise max_bytes (--max-memory), or select fewer units (e.g. [0:1024])"
            )
        group.append(pair)
        used += extra
        counted |= {("a", pair[0]), ("b", pair[1])}
    return group


class StreamSums:
    """The float64 sums of one pass (see the module docstring). Rows are shifted by each
    site's first-batch mean; ``precision="float32"`` multiplies each batch in float32.

    When the pass's pairs are every row site with every column site (a block of the matrix),
    the sites of each side are concatenated and each batch costs four matrix products in all,
    ``[Xᵀ Y, Rᵀ S, Xᵀ S, Yᵀ R]`` (R, S the rows' squared norms per site), instead of four per
    pair; each pair's sums are views of the block's."""

    def __init__(self, pairs: list[tuple[int, int]], precision: str, need_self: Callable[[tuple[str, int]], bool]) -> None:
        self.pairs = pairs
        self.rows, self.cols = sorted({i for i, _ in pairs}), sorted({j for _, j in pairs})
        self.block = len(pairs) > 1 and set(pairs) == {(i, j) for i in self.rows for j in self.cols}
        self.keys = [("a", i) for i in self.rows] + [("b", j) for j in self.cols]
        self.self_keys = [key for key in self.keys if need_self(key)]
        self.product = torch.float32 if precision == "float32" else torch.float64
        self.n = 0
        self.shift: dict = {}
        self.site: dict = {}  # key → {"sum": Σx', "r": Σr, and self sums}
        self.cross: dict = {}  # pair → {"xty", "rs", "sx", "ry"}; block mode: the block's under "block"

    def update(self, rows_a: Rows, rows_b: Rows, names_a: list[str], names_b: list[str]) -> None:
        shifted, norms = {}, {}
        for side, k in self.keys:
            x = (rows_a if side == "a" else rows_b).values[(names_a if side == "a" else names_b)[k]]
            x = x.to(torch.float64)
            if (side, k) not in self.shift:
                self.shift[(side, k)] = x.mean(dim=0)
            x = x - self.shift[(side, k)]
            shifted[(side, k)], norms[(side, k)] = x, x.square().sum(dim=1)  # [n, d], [n]
            self._site(side, k, x, norms[(side, k)])
        pairs = [(self.rows[0], j) for j in self.cols] + [(i, self.cols[0]) for i in self.rows] if self.block else self.pairs
        for i, j in pairs:  # in a block every row site and every column site must cover the same rows
            same_rows(rows_a.ids[names_a[i]], rows_b.ids[names_b[j]], names_a[i], names_b[j])
        if self.block:
            self._block(shifted, norms)
        else:
            for pair in self.pairs:
                x, y = shifted[("a", pair[0])], shifted[("b", pair[1])]
                self._pair(pair, x, y, norms[("a", pair[0])], norms[("b", pair[1])])
        self.n += int(next(iter(shifted.values())).shape[0])

    def _accumulate(self, target: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        """``target += left @ right`` without a product-sized temporary: in place (float64), or
        in column chunks of at most :data:`CHUNK_BYTES` (float32 products added in float64)."""
        if self.product == torch.float64:
            target.addmm_(left, right)
            return
        left, right = left.to(self.product), right.to(self.product)
        width = max(1, CHUNK_BYTES // (12 * max(left.shape[0], 1)))
        for start in range(0, right.shape[1], width):
            target[:, start:start + width] += (left @ right[:, start:start + width]).to(torch.float64)

    def _site(self, side: str, k: int, x: torch.Tensor, r: torch.Tensor) -> None:
        sums = self.site.get((side, k))
        if sums is None:
            sums = self.site[(side, k)] = {"sum": torch.zeros(x.shape[1], dtype=torch.float64, device=x.device),
                                            "r": torch.zeros((), dtype=torch.float64, device=x.device)}
            if (side, k) in self.self_keys:
                sums.update(xtx=torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device),
                            rr=torch.zeros((), dtype=torch.float64, device=x.device),
                            rx=torch.zeros(x.shape[1], dtype=torch.float64, device=x.device))
        sums["sum"] += x.sum(dim=0)
        sums["r"] += r.sum()
        if "xtx" in sums:
            self._accumulate(sums["xtx"], x.T, x)
            sums["rr"] += r @ r
            sums["rx"] += r @ x

    def _block(self, shifted: dict, norms: dict) -> None:
        x = torch.cat([shifted[("a", i)] for i in self.rows], dim=1)  # [n, Σ d_a]
        y = torch.cat([shifted[("b", j)] for j in self.cols], dim=1)  # [n, Σ d_b]
        r = torch.stack([norms[("a", i)] for i in self.rows], dim=1)  # [n, rows]
        s = torch.stack([norms[("b", j)] for j in self.cols], dim=1)  # [n, columns]
        sums = self.cross.get("block")
        if sums is None:
            sums = self.cross["block"] = {"xty": torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, device=x.device),
                                          "rs": torch.zeros(r.shape[1], s.shape[1], dtype=torch.float64, device=x.device),
                                          "sx": torch.zeros(x.shape[1], s.shape[1], dtype=torch.float64, device=x.device),
                                          "ry": torch.zeros(y.shape[1], r.shape[1], dtype=torch.float64, device=x.device)}
            starts_a = np.cumsum([0] + [shifted[("a", i)].shape[1] for i in self.rows])
            starts_b = np.cumsum([0] + [shifted[("b", j)].shape[1] for j in self.cols])
            self.offsets = ({i: (int(starts_a[k]), int(starts_a[k + 1])) for k, i in enumerate(self.rows)},
                            {j: (int(starts_b[k]), int(starts_b[k + 1])) for k, j in enumerate(self.cols)})
        self._accumulate(sums["xty"], x.T, y)
        sums["rs"] += r.T @ s
        sums["sx"] += x.T @ s
        sums["ry"] += y.T @ r

    def _pair_sums(self, pair: tuple[int, int]) -> dict:
        if not self.block:
            return self.cross.pop(pair)
        block, (rows, cols) = self.cross["block"], self.offsets
        (a0, a1), (b0, b1) = rows[pair[0]], cols[pair[1]]
        i, j = self.rows.index(pair[0]), self.cols.index(pair[1])
        return {"xty": block["xty"][a0:a1, b0:b1], "rs": block["rs"][i, j], "sx": block["sx"][a0:a1, j], "ry": block["ry"][b0:b1, i]}

    def _pair(self, pair: tuple[int, int], x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> None:
        sums = self.cross.get(pair)
        if sums is None:
            sums = self.cross[pair] = {"xty": torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, device=x.device),
                                       "rs": torch.zeros((), dtype=torch.float64, device=x.device),
                                       "sx": torch.zeros(x.shape[1], dtype=torch.float64, device=x.device),
                                       "ry": torch.zeros(y.shape[1], dtype=torch.float64, device=x.device)}
        self._accumulate(sums["xty"], x.T, y)
        sums["rs"] += r @ s
        sums["sx"] += s @ x
        sums["ry"] += r @ y

    def selves(self) -> dict:
        """``{key: ((biased, unbiased) self-HSIC, site statistics)}`` for the sites whose self
        sums this pass kept (their big matrices are released)."""
        found = {}
        for key in self.self_keys:
            sums = self.site[key]
            total, r = sums["sum"], sums["r"]
            xtx = sums.pop("xtx")
            rx = sums.pop("rx")  # Σ r x', both "Σ s x" and "Σ r y" of a site with itself
            plain = _hsic_sums(xtx, total, total, r, r, sums.pop("rr"), rx, rx, self.n)
            covariance = xtx.addr_(total, total, alpha=-1.0 / self.n) / max(self.n - 1, 1)  # in place: centered
            spectrum = sim.covariance_spectrum(covariance)
            stats = {"units": int(total.shape[0]), "effective_rank": sim.effective_rank_of(spectrum),
                     "participation_ratio": sim.participation_ratio_of(spectrum)}
            found[key] = ((float((covariance * (self.n - 1)).square().sum()), plain), stats)
            del xtx, covariance
        return found

    def crosses(self) -> dict:
        """``{pair: (biased, unbiased) HSIC}`` on the same scale as :meth:`selves`."""
        found = {}
        for pair in self.pairs:
            sums = self._pair_sums(pair)
            a, b = self.site[("a", pair[0])], self.site[("b", pair[1])]
            xty = sums["xty"]
            unbiased = _hsic_sums(xty, a["sum"], b["sum"], a["r"], b["r"], sums["rs"], sums["sx"], sums["ry"], self.n)
            biased = float(xty.addr_(a["sum"], b["sum"], alpha=-1.0 / self.n).square().sum())  # ‖centered XᵀY‖²_F, in place
            found[pair] = (biased, unbiased)
        self.cross.clear()
        return found


def _hsic_sums(xty: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, r_total: torch.Tensor, s_total: torch.Tensor,
               rs: torch.Tensor, s_x: torch.Tensor, r_y: torch.Tensor, n: int) -> float:
    """Song et al.'s unbiased HSIC · n(n − 3) from shifted sums (it does not depend on the
    shift): with K = X Xᵀ, L = Y Yᵀ and zero diagonals K̃, L̃,
    ``tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1``, where
    ``tr(K̃L̃) = ‖XᵀY‖² − Σ r s``, ``1ᵀK̃1 = ‖Σx‖² − Σ r`` and
    ``1ᵀK̃L̃1 = (Σx)ᵀ XᵀY (Σy) − (Σx)·(Σ s x) − (Σy)·(Σ r y) + Σ r s``."""
    if n < 4:
        return float("nan")
    trace = float(xty.square().sum() - rs)
    k_sum, l_sum = float(sx @ sx - r_total), float(sy @ sy - s_total)
    cross = float(sx @ (xty @ sy) - sx @ s_x - sy @ r_y + rs)
    return trace + k_sum * l_sum / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)


class Reservoir:
    """A uniform random sample of at most ``size`` rows of a stream (Algorithm R), the same
    rows for every site; decisions come from ``seed`` and the row count only."""

    def __init__(self, size: int, seed: int) -> None:
        self.capacity = size
        self.random = np.random.default_rng(seed)
        self.seen = 0
        self.rows: dict = {}

    @property
    def size(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, values: dict) -> None:
        count = int(next(iter(values.values())).shape[0])
        positions = np.arange(self.seen, self.seen + count)
        slots = np.where(positions < self.capacity, positions, self.random.integers(0, positions + 1))
        chosen = np.nonzero(slots < self.capacity)[0]
        # when one batch hits a slot twice, the later row wins (as one row at a time would)
        last_first = chosen[::-1]
        _, first = np.unique(slots[last_first], return_index=True)
        chosen = last_first[first]
        for key, x in values.items():
            store = self.rows.get(key)
            if store is None:
                dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
                store = self.rows[key] = torch.zeros(self.capacity, x.shape[1], dtype=dtype)
            store[torch.as_tensor(slots[chosen])] = x[torch.as_tensor(chosen).to(x.device)].to("cpu", store.dtype)
        self.seen += count

    def kept(self) -> dict:
        return {key: store[: self.size] for key, store in self.rows.items()}


def _sample_stats(x: torch.Tensor) -> dict:
    spectrum = sim.spectrum(x)
    return {"units": int(x.shape[1]), "effective_rank": sim.effective_rank_of(spectrum),
            "participation_ratio": sim.participation_ratio_of(spectrum)}


def _prepared(x: torch.Tensor, config: Measure) -> torch.Tensor:
    """What one site contributes to every pair: its centered (or U-centered) Gram matrix scaled
    to unit norm (CKA is then a dot product), or the ranks of its RDM's upper triangle."""
    x = x.to(torch.float64)
    if config.measure == "rsa":
        values = sim.upper(sim.rdm(x, config.metric)).numpy()
        if config.compare == "kendall":
            return torch.as_tensor(values)
        values = sim.rank_average(values) if config.compare == "spearman" else values
        values = values - values.mean()
        norm = np.sqrt(values @ values)
        if norm == 0:
            raise InputError("a site's dissimilarity matrix is constant over the sampled rows, so RSA is undefined for it")
        return torch.as_tensor(values / norm)
    k = sim.gram(x, config.kernel, sigma=config.sigma)
    k = u_centered(k) if config.unbiased else sim.centered(k)
    norm = float(k.square().sum().sqrt())
    if norm == 0:
        raise InputError("a site does not vary across the sampled rows, so its CKA is undefined; leave it out of the selection")
    return k / norm


def u_centered(k: torch.Tensor) -> torch.Tensor:
    """Székely and Rizzo's U-centering: with it, ⟨Ũ(K), Ũ(L)⟩ / (n(n − 3)) is the unbiased HSIC."""
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0)
    rows = k.sum(dim=1, keepdim=True) / (n - 2)
    columns = k.sum(dim=0, keepdim=True) / (n - 2)
    total = k.sum() / ((n - 1) * (n - 2))
    return (k - rows - columns + total).fill_diagonal_(0)


def _sampled_value(x: torch.Tensor, y: torch.Tensor, config: Measure) -> float:
    if config.measure == "rsa" and config.compare == "kendall":
        return sim.correlate(x.numpy(), y.numpy(), "kendall")
    return float((x * y).sum())


__all__ = ["RepresentationSimilarity", "compare_representations", "Measure"]
