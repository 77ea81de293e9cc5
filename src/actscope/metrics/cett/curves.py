"""CETT as a function of ε, recorded per MLP layer in ONE pass over calibration data.

For each layer and a log-spaced grid ε_0 < … < ε_{G−1}, the recorder keeps the token-averaged
``CETT(ε_g)`` with ``D_g = {i : ‖n_i‖ < ε_g}`` (METHODS.md, "CETT"), so that the per-layer ε for
any target c is read off the curve afterwards, without another forward pass.

How one batch is reduced, grid-exactly (every value equals the full-tensor CETT at the grid
point, up to float64 summation order):

* ``m = |a| ⊙ ‖W_out[:, i]‖`` per token and unit (``[n, d_ff]``) — that is ``‖n_i‖``.
* Unit i of a token falls in bucket ``k_i`` = number of grid points ≤ m_i; it is dropped at
  ε_g exactly when ``k_i ≤ g``. The bucket sums ``S[t, k] = Σ_{i : k_i = k} a_i W_out[:, i]``
  are one sparse-times-dense product: a ``[n·(G+1), d_ff]`` matrix with one entry per non-zero
  activation (row ``t·(G+1) + k_i``, column i, value a_i; every entry when most are non-zero)
  times ``W_outᵀ``. Cost: ``nnz(a) · d_model`` multiply-adds — at most one application of
  ``W_out``, though torch's sparse kernel runs it far slower than a dense matmul (the whole
  recording pass measured ≈ 16× a plain forward, docs/benchmarks.md) — and
  ``n · (G+1) · d_model`` memory, bounded by processing tokens in chunks.
* The dropped sum at ε_g is the prefix sum ``Σ_{k ≤ g} S[t, k]`` (a cumsum over G+1 buckets,
  ``n · G · d_model``), and ``FFN(x) = Σ_k S[t, k] + b``. Sorting units per token and
  cumulating their ``[d_model]`` contributions would cost ``n · d_ff · d_model`` memory traffic
  instead, and a dense per-ε product ``G`` times the projection.

The grid *(our choice)* is built per layer from the first calibration batch: G points
log-spaced from ``lo`` to ``hi = 2 · max m``. ``lo = max(1e-4 · median_t ‖FFN(x_t)‖ / d_ff,
hi · 1e-6)``: below it, the whole tail of a typical token can carry at most 1e-4 of its output
(triangle inequality: ``‖Σ_D n_i‖ < |D| · ε``), so no useful ε is left out. Units with
``m ≥ ε_{G−1}`` are never dropped at any grid ε; units below ``ε_0`` are dropped at all of them.
Tokens whose MLP output is exactly zero have no CETT and are left out of the average
(counted in ``undefined_tokens``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ...errors import DataError, InputError
from ...sites import Plan, Site, plan_sites
from ...trace import Tracer, flatten
from .core import F64, check_neuron_site, output_projection
from ...feeding import input_batches
from ...results import TableResult
from ...models import Model, ModelLike

DEFAULT_GRID_POINTS = 128
TAIL_FLOOR = 1e-4  # CETT a typical token's whole tail may carry below the grid
MAX_DECADES = 6.0  # the grid never spans more than this many decades
CHUNK_ELEMENTS = 1 << 22  # bound on the [tokens, G+1, d_model] bucket sums of one chunk


# -- the accumulator -------------------------------------------------------------------------
class CettCurveStats:
    """Streaming token sums of CETT(ε_g) and dropped-unit counts for one layer."""

    def __init__(self, w_out: torch.Tensor, bias: torch.Tensor | None, grid_points: int = DEFAULT_GRID_POINTS) -> None:
        self.w_t = w_out.T.contiguous()  # [d_ff, d_model] float64
        self.bias = bias
        self.col_norm = w_out.norm(dim=0)  # [d_ff]
        self.points = grid_points
        self.grid: torch.Tensor | None = None  # [G], set by the first batch
        self.cett_sum = torch.zeros(grid_points, dtype=F64)
        self.dropped_sum = torch.zeros(grid_points, dtype=F64)  # units dropped, summed over tokens
        self.tokens = 0
        self.undefined = 0
        self.nonzero = 0
        self.max_abs = 0.0

    @property
    def units(self) -> int:
        return int(self.w_t.shape[0])

    def update(self, a: torch.Tensor) -> None:
        """Add the real tokens ``a`` ``[n, d_ff]`` of one batch."""
        a = a.detach().to(self.w_t.device, F64)
        if a.shape[0] == 0:
            return
        if a.shape[1] != self.units:
            raise InputError(f"the site gives {a.shape[1]} units, but its output projection has {self.units} inputs")
        m = a.abs() * self.col_norm.to(a.device)  # [n, d_ff] = ‖n_i‖
        if self.grid is None:
            self.grid = _grid_from(a, m, self.w_t, self.bias, self.points)
        chunk = max(1, CHUNK_ELEMENTS // ((self.points + 1) * self.w_t.shape[1]))
        for start in range(0, a.shape[0], chunk):
            self._add_chunk(a[start:start + chunk], m[start:start + chunk])
        self.nonzero += int((a != 0).sum())
        self.max_abs = max(self.max_abs, float(a.abs().max()))

    def _add_chunk(self, a: torch.Tensor, m: torch.Tensor) -> None:
        grid = self.grid.to(a.device)
        bucket = torch.bucketize(m, grid, right=True)  # [n, d_ff]: grid points ≤ m
        lost, output = bucket_sums_to_cett(a, bucket, self.w_t, self.bias, len(grid))  # [n, G], [n]
        defined = output > 0
        self.cett_sum += (lost[defined] / output[defined, None]).sum(0).cpu()
        self.undefined += int((~defined).sum())
        per_bucket = torch.bincount(bucket.reshape(-1), minlength=len(grid) + 1)  # units per bucket, all tokens
        self.dropped_sum += per_bucket[:-1].cumsum(0).to(F64).cpu()  # dropped at ε_g: buckets 0 … g
        self.tokens += a.shape[0]

    def cett(self) -> torch.Tensor:
        """Token-averaged CETT at each grid ε (``[G]``; NaN before any defined token)."""
        defined = self.tokens - self.undefined
        return self.cett_sum / defined if defined else torch.full_like(self.cett_sum, math.nan)

    def dropped_fraction(self) -> torch.Tensor:
        return self.dropped_sum / (self.tokens * self.units) if self.tokens else torch.full_like(self.dropped_sum, math.nan)


def bucket_sums_to_cett(
    a: torch.Tensor, bucket: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None, points: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖dropped sum at ε_g‖ [n, G], ‖FFN(x)‖ [n])`` from each unit's bucket (see module doc)."""
    n, units = a.shape
    nonzero = a != 0
    if 2 * int(nonzero.sum()) > a.numel():  # mostly dense (SiLU, GELU): take every entry as it lies
        token = torch.arange(n, device=a.device).repeat_interleave(units)
        unit = torch.arange(units, device=a.device).repeat(n)
        values, unit_bucket = a.reshape(-1), bucket.reshape(-1)
    else:  # zero activations add nothing to any sum: leave them out of the sparse matrix
        token, unit = nonzero.nonzero(as_tuple=True)
        values, unit_bucket = a[token, unit], bucket[token, unit]
    rows = token * (points + 1) + unit_bucket
    spread = torch.sparse_coo_tensor(torch.stack([rows, unit]), values, (n * (points + 1), units), check_invariants=False)
    sums = torch.sparse.mm(spread, w_t).view(n, points + 1, -1)  # [n, G+1, d_model] per bucket
    output = sums.sum(1) + (0 if bias is None else bias.to(a.device))  # [n, d_model] = W_out a + b
    lost = sums[:, :points].cumsum(1).norm(dim=-1)  # [n, G]
    return lost, output.norm(dim=-1)


def _grid_from(a: torch.Tensor, m: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None, points: int) -> torch.Tensor:
    """The layer's log-spaced ε grid from its first batch (module docstring)."""
    output = a @ w_t + (0 if bias is None else bias.to(a.device))  # [n, d_model]
    hi = 2.0 * float(m.max())
    if not hi > 0:
        hi = 1.0  # an all-zero first batch: any positive scale; nothing can be dropped usefully
    lo = max(TAIL_FLOOR * float(output.norm(dim=-1).median()) / a.shape[1], hi * 10 ** -MAX_DECADES)
    lo = min(lo, hi / 10)
    return torch.logspace(math.log10(lo), math.log10(hi), points, dtype=F64)


# -- the result ------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CettCurves(TableResult):
    """Per MLP layer: the ε grid, the token-averaged CETT and the dropped fraction at each ε.

    ``grid``, ``cett``, ``dropped_fraction`` are ``[layers, G]``; ``dense_activation_ratio``
    (share of non-zero activations), ``max_abs`` (largest |a|), ``undefined_tokens`` are per
    layer; ``tokens`` counts the real calibration tokens.
    """

    table_name: ClassVar[str] = "cett_curves"

    sites: tuple[str, ...]
    layers: tuple[int, ...]
    units: tuple[int, ...]
    grid: np.ndarray
    cett: np.ndarray
    dropped_fraction: np.ndarray
    dense_activation_ratio: np.ndarray
    max_abs: np.ndarray
    undefined_tokens: np.ndarray
    tokens: int

    def index_for(self, c: float) -> np.ndarray:
        """Per layer, the largest grid index whose CETT is ≤ c (−1 when none is: ε = 0)."""
        within = self.cett <= c  # NaN compares False
        last = self.cett.shape[1] - 1 - np.argmax(within[:, ::-1], axis=1)
        return np.where(within.any(axis=1), last, -1).astype(np.int64)

    def eps_for(self, c: float) -> np.ndarray:
        """Per layer, the largest grid ε whose token-averaged CETT is ≤ c (0 when none is)."""
        return eps_of(self.grid, self.index_for(c))

    def breakpoints(self) -> list[tuple[float, tuple[int, ...]]]:
        """``(c, per-layer grid index)`` for c = 0 and every c in (0, 1] where some layer's ε
        changes, ascending; between two of them the thresholds are the same."""
        values = np.unique(self.cett[np.isfinite(self.cett) & (self.cett > 0) & (self.cett <= 1)])
        found = [(0.0, tuple(self.index_for(0.0).tolist()))]
        for c in values.tolist():
            index = tuple(self.index_for(c).tolist())
            if index != found[-1][1]:
                found.append((float(c), index))
        return found

    def to_table(self) -> dict[str, np.ndarray]:
        """One row per (layer, grid point): ε, CETT, dropped fraction."""
        layers, points = self.grid.shape
        return {
            "site": np.repeat(np.array(self.sites, dtype=object), points),
            "layer": np.repeat(np.array(self.layers, dtype=np.int64), points),
            "grid_index": np.tile(np.arange(points, dtype=np.int64), layers),
            "eps": self.grid.reshape(-1).copy(),
            "cett": self.cett.reshape(-1).copy(),
            "dropped_fraction": self.dropped_fraction.reshape(-1).copy(),
        }


def eps_of(grid: np.ndarray, index: Sequence[int] | np.ndarray) -> np.ndarray:
    """``grid[l, index[l]]`` per layer, 0 where the index is −1."""
    index = np.asarray(index, dtype=np.int64)
    picked = grid[np.arange(len(index)), np.maximum(index, 0)]
    return np.where(index >= 0, picked, 0.0)


# -- the pass ----------------------------------------------------------------------------------
class _CurveTracer(Tracer):
    def __init__(self, model: Model, sites: Any, grid_points: int) -> None:
        super().__init__(model, sites)
        self.stats: dict[str, CettCurveStats] = {}
        for site in self.plan.sites:
            check_neuron_site(site)
            self.stats[site.label] = CettCurveStats(*output_projection(self.model, site), grid_points)

    def on_site(self, site: Site, value: Any, module: torch.nn.Module) -> None:
        self.stats[site.label].update(flatten(site, value, self._batch_info(), module).values)


def record_cett_curves(
    model: ModelLike,
    data: Any,
    sites: str | Sequence[str] | Plan = "blocks.*.mlp.post",
    *,
    grid_points: int = DEFAULT_GRID_POINTS,
    batch_size: int = 16,
    max_length: int = 128,
    max_tokens: int | None = None,
) -> CettCurves:
    """One pass of ``model`` over ``data``: per MLP layer, token-averaged CETT on an ε grid.

    ``model``: an :class:`actscope.Model`, any ``nn.Module`` or a model directory. ``data``:
    strings, a text source or model-input dicts (:mod:`actscope.feeding`).
    ``sites``: whole neuron sites (default every ``blocks.{i}.mlp.post``).
    """
    from ...models import as_model

    if isinstance(grid_points, bool) or not isinstance(grid_points, int) or grid_points < 2:
        raise InputError(f"grid_points must be a whole number of at least 2, got {grid_points!r}; e.g. 128")
    model = as_model(model)
    plan = plan_sites(model, sites)
    tracer = _CurveTracer(model, plan, grid_points)
    with torch.no_grad(), tracer.attached():
        for inputs in input_batches(model, data, batch_size=batch_size, max_length=max_length, max_tokens=max_tokens):
            model(**inputs)
    return _curves(tracer)


def _curves(tracer: _CurveTracer) -> CettCurves:
    sites = [site for site in tracer.plan.sites if tracer.stats[site.label].grid is not None]
    if not sites:
        raise DataError("no calibration token reached the MLP sites; pass non-empty calibration data")
    stats = [tracer.stats[site.label] for site in sites]
    return CettCurves(
        sites=tuple(site.label for site in sites),
        layers=tuple(-1 if site.layer is None else site.layer for site in sites),
        units=tuple(s.units for s in stats),
        grid=np.stack([s.grid.cpu().numpy() for s in stats]),
        cett=np.stack([s.cett().numpy() for s in stats]),
        dropped_fraction=np.stack([s.dropped_fraction().numpy() for s in stats]),
        dense_activation_ratio=np.array([s.nonzero / (s.tokens * s.units) for s in stats]),
        max_abs=np.array([s.max_abs for s in stats]),
        undefined_tokens=np.array([s.undefined for s in stats], dtype=np.int64),
        tokens=stats[0].tokens,
    )
