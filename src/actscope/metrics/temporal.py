"""Temporal (delta) sparsity (Delta Activation Layer, see METHODS.md).

For consecutive tokens (or frames) t−1, t of one sequence, a unit is *temporally sparse* at
threshold ε when ``|a_t − a_{t−1}| ≤ ε``: a delta network would skip sending it. The report is
the fraction of (pair, unit) that are, per site and ε, beside the plain activation sparsity
(fraction of (token, unit) with ``|a| ≤ ε``) over the same real tokens for comparison.

Pairs: two rows form a pair only when both are real tokens of the same example at adjacent
positions, so a pair never crosses padding (also a hole inside a mask), a sequence boundary
or a batch boundary. The position axis is the token axis for sequence sites and axis 1 for a
``[batch, frames, units]`` module output (``[batch, channels, time]`` for 1-D convolutions);
tensors with more than one position axis (image feature maps) are refused. Differences are
taken in float64 after upcasting, and compared with ε in float64.

:func:`delta_l1_loss` is the differentiable training-time penalty ``λ·‖Δ‖₁/numel(Δ)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ..errors import DataError, InputError, SiteError
from ..sites import Plan, Site, plan_sites
from ..trace import Reading, Tracer, flatten, split_token_id
from ..results import TableResult
from .tables import eps_column
from ..models import Model, ModelLike

DEFAULT_EPS = (0.0, 1e-3, 1e-2, 1e-1)


# -- the training-time loss ---------------------------------------------------------------
def delta_l1_loss(x: torch.Tensor, mask: torch.Tensor | None = None, lam: float = 1.0) -> torch.Tensor:
    """``λ · ‖Δ‖₁ / numel(Δ)`` with ``Δ = x[:, t] − x[:, t−1]``, differentiable.

    ``x`` is ``[batch, pos, units]`` (further trailing axes count as units). ``mask``
    (``[batch, pos]``, true/1 = real token) keeps only pairs of two real tokens, so
    ``numel(Δ)`` is (real pairs) × units: the loss is the mean ``|Δ|`` over real pairs and
    units, times λ. With no real pair it is a zero that still carries the graph. The default
    ``lam=1.0`` returns the bare mean; scale it (or pass λ) for your loss.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"delta_l1_loss needs x of shape [batch, pos, units], got {shape}; add the missing axes with x.unsqueeze")
    _check_lam(lam)
    delta = (x[:, 1:] - x[:, :-1]).abs().flatten(2)  # [batch, pos-1, units]
    if mask is None:
        return lam * delta.mean() if delta.numel() else x.sum() * 0.0
    pair = _pair_mask(mask, x.shape[:2]).to(delta.dtype)  # [batch, pos-1]
    total = (delta * pair.unsqueeze(-1)).sum()
    count = pair.sum() * delta.shape[-1]
    return lam * total / count.clamp(min=1)


def _check_lam(lam: Any) -> None:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise InputError(f"lam must be a finite number ≥ 0, got {lam!r}; pass e.g. lam=1e-3")


def _pair_mask(mask: torch.Tensor, grid: torch.Size) -> torch.Tensor:
    """[batch, pos] real-token mask → [batch, pos-1] mask of pairs of two real tokens."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(grid):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"mask must be a tensor of shape {tuple(grid)} (batch, pos) like x's first two axes, got {shape}")
    real = mask.to(torch.bool)
    return real[:, 1:] & real[:, :-1]


# -- the result ------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SiteDelta:
    """Counts of one site: ``le[j, u]`` = pairs with ``|Δ_u| ≤ eps[j]``, ``zero[j, u]`` = real
    tokens with ``|a_u| ≤ eps[j]``, ``abs_delta_sum[u]`` = Σ over pairs of ``|Δ_u|``."""

    site: str
    layer: int
    units: np.ndarray  # [units] unit ids (the selection's, or 0..U-1)
    tokens: int
    pairs: int
    le: np.ndarray  # [eps, units] int64
    zero: np.ndarray  # [eps, units] int64
    abs_delta_sum: np.ndarray  # [units] float64


@dataclass(frozen=True, eq=False)
class TemporalSparsity(TableResult):
    """Temporal sparsity per site and ε (``to_table``) and per unit (``unit_table``)."""

    table_name: ClassVar[str] = "temporal"
    eps: tuple[float, ...]
    sites: tuple[SiteDelta, ...]

    def site(self, label: str) -> SiteDelta:
        for entry in self.sites:
            if entry.site == label:
                return entry
        raise SiteError(f"'{label}' was not measured; measured: {', '.join(s.site for s in self.sites)}")

    def unit_fractions(self, label: str) -> np.ndarray:
        """``[eps, units]``: per unit, the fraction of pairs with ``|Δ| ≤ ε``."""
        entry = self.site(label)
        return _ratio(entry.le, entry.pairs)

    def to_table(self) -> dict[str, np.ndarray]:
        """One row per (site, ε): ``temporal_sparsity`` = fraction of (pair, unit) with
        ``|Δ| ≤ ε``; ``activation_sparsity`` = fraction of (real token, unit) with ``|a| ≤ ε``."""
        rows = [_site_row(entry, j, value) for entry in self.sites for j, value in enumerate(self.eps)]
        return {key: np.array([row[key] for row in rows], dtype=object if key == "site" else None) for key in rows[0]}

    def unit_table(self) -> dict[str, np.ndarray]:
        """One row per (site, unit): pairs, mean ``|Δ|`` and ``frac_delta_le_<ε>`` per ε."""
        parts = [_unit_rows(entry, self.eps) for entry in self.sites]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def unit_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.unit_table())


def _site_row(entry: SiteDelta, j: int, value: float) -> dict[str, Any]:
    cells = entry.pairs * len(entry.units)
    return {
        "site": entry.site,
        "layer": entry.layer,
        "units": len(entry.units),
        "tokens": entry.tokens,
        "pairs": entry.pairs,
        "eps": float(value),
        "temporal_sparsity": float(_ratio(entry.le[j].sum(), cells)),
        "activation_sparsity": float(_ratio(entry.zero[j].sum(), entry.tokens * len(entry.units))),
        "mean_abs_delta": float(_ratio(entry.abs_delta_sum.sum(), cells)),
    }


def _unit_rows(entry: SiteDelta, eps: tuple[float, ...]) -> dict[str, np.ndarray]:
    count = len(entry.units)
    rows = {
        "site": np.array([entry.site] * count, dtype=object),
        "layer": np.full(count, entry.layer, dtype=np.int64),
        "unit": entry.units,
        "pairs": np.full(count, entry.pairs, dtype=np.int64),
        "mean_abs_delta": _ratio(entry.abs_delta_sum, entry.pairs),
    }
    for j, value in enumerate(eps):
        rows[eps_column("frac_delta_le", value)] = _ratio(entry.le[j], entry.pairs)
    return rows


def _ratio(count: Any, total: int) -> Any:
    """``count / total``, NaN where nothing was counted (an expert with no routed pair)."""
    return np.asarray(count, dtype=np.float64) / total if total else np.full(np.shape(count), np.nan)


# -- streaming ----------------------------------------------------------------------------
class _DeltaCounts:
    """Per-site counts, updated with one call's real tokens at a time."""

    def __init__(self, units: int, eps: tuple[float, ...]) -> None:
        self.eps = eps
        self.tokens = self.pairs = 0
        self.le = torch.zeros(len(eps), units, dtype=torch.int64)
        self.zero = torch.zeros(len(eps), units, dtype=torch.int64)
        self.abs_delta_sum = torch.zeros(units, dtype=torch.float64)

    def update(self, reading: Reading) -> None:
        values, tok = _in_token_order(reading)
        x = values.to(torch.float64)  # [n, units]
        example, position = split_token_id(tok)
        pair = (example[1:] == example[:-1]) & (position[1:] == position[:-1] + 1)  # [n-1]
        keep = pair.nonzero().squeeze(1).to(x.device)
        delta = (x[keep + 1] - x[keep]).abs()  # [pairs, units]
        magnitude = x.abs()  # [n, units]
        for j, value in enumerate(self.eps):  # one ε at a time: no [eps, n, units] temporary
            self.le[j] += (delta <= value).sum(0).cpu()
            self.zero[j] += (magnitude <= value).sum(0).cpu()
        self.tokens += x.shape[0]
        self.pairs += delta.shape[0]
        self.abs_delta_sum += delta.sum(0).cpu()


def _in_token_order(reading: Reading) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by token id; gathered (MoE expert) readings may come in routing order."""
    tok = reading.tok
    if tok.numel() < 2 or bool((tok[1:] > tok[:-1]).all()):
        return reading.values, tok
    order = torch.argsort(tok, stable=True)
    return reading.values[order.to(reading.values.device)], tok[order]


class _DeltaTracer(Tracer):
    def __init__(self, model: Model, plan: Plan, eps: tuple[float, ...]) -> None:
        super().__init__(model, plan)
        self.eps = eps
        self.counts: dict[str, _DeltaCounts] = {}

    def on_site(self, site: Site, value: Any, module: torch.nn.Module) -> None:
        _check_one_position_axis(site, value)
        reading = flatten(site, value, self._batch_info(), module)
        counts = self.counts.get(site.label)
        if counts is None:
            counts = self.counts[site.label] = _DeltaCounts(reading.values.shape[-1], self.eps)
        counts.update(reading)


def _check_one_position_axis(site: Site, value: Any) -> None:
    """Refuse tensors whose positions span several axes: their flattened order is not a time."""
    layout = site.hook.layout
    if layout in ("tokens", "flat") or not isinstance(value, torch.Tensor):
        return
    position_axes = value.dim() - (3 if layout == "heads" else 2)
    if position_axes > 1:
        raise SiteError(
            f"{site.label} gives a tensor of shape {tuple(value.shape)} with {position_axes} position axes (e.g. an image "
            "feature map); temporal sparsity needs one sequence or frame axis: choose a site shaped "
            "[batch, frames, units] (or [batch, channels, time] from a 1-D convolution)"
        )


def temporal_sparsity(
    model: ModelLike,
    data: Any = None,
    sites: str | Sequence[str] | Plan = "blocks.*.mlp.post",
    eps: float | Sequence[float] = DEFAULT_EPS,
    *,
    batch_size: int = 8,
    max_length: int = 128,
    max_tokens: int | None = None,
    column: str | None = None,
) -> TemporalSparsity:
    """Measure temporal (delta) sparsity of ``sites`` over ``data``, streaming batch by batch.

    ``model`` and ``data`` are what :func:`actscope.profile` takes (text sources are tokenized
    and right-padded; an iterable of model-input dicts is fed as is, e.g. frames
    ``{"input": x}`` for a wrapped module). ``eps``: thresholds ≥ 0. A site without pairs
    (e.g. an MoE expert never given two neighbouring tokens) reports ``pairs = 0`` and NaN
    fractions; ``DataError`` when no site saw a token, ``SiteError`` when no site saw a pair.
    """
    from ..feeding import feed
    from ..models import as_model

    thresholds = _checked_eps(eps)
    model = as_model(model)
    plan = plan_sites(model, sites)
    _refuse_patterns(plan)
    tracer = _DeltaTracer(model, plan, thresholds)
    feed(tracer, data, batch_size=batch_size, max_length=max_length, max_tokens=max_tokens, column=column)
    entries = tuple(_freeze(site, tracer.counts.get(site.label), thresholds) for site in plan.sites)
    _check_measured(entries)
    return TemporalSparsity(thresholds, entries)


def _checked_eps(eps: Any) -> tuple[float, ...]:
    values = (eps,) if isinstance(eps, (int, float)) else tuple(eps)
    if not values:
        raise InputError("eps is empty; pass at least one threshold, e.g. eps=(0, 1e-2)")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InputError(f"every eps must be a finite number ≥ 0, got {value!r} in {values!r}")
    if len(set(values)) != len(values):
        raise InputError(f"eps has repeated thresholds: {values!r}; list each threshold once")
    return tuple(float(value) for value in values)


def _refuse_patterns(plan: Plan) -> None:
    for site in plan.sites:
        if site.hook.layout == "pattern":
            raise SiteError(
                f"{site.label} is an attention pattern [batch, head, query, key], which has no units per token; "
                "measure temporal sparsity on unit sites such as blocks.*.mlp.post or blocks.*.attn.v"
            )


def _freeze(site: Site, counts: _DeltaCounts | None, eps: tuple[float, ...]) -> SiteDelta:
    """Counts → a frozen site entry; a site that saw no token (an expert never routed to) has
    no units, and one without pairs gets NaN fractions."""
    units = counts.le.shape[1] if counts is not None else 0
    empty = np.zeros((len(eps), 0), dtype=np.int64)
    return SiteDelta(
        site=site.label,
        layer=-1 if site.layer is None else site.layer,
        units=np.asarray(site.units if site.units and units else range(units), dtype=np.int64),
        tokens=counts.tokens if counts is not None else 0,
        pairs=counts.pairs if counts is not None else 0,
        le=counts.le.numpy() if counts is not None else empty,
        zero=counts.zero.numpy() if counts is not None else empty,
        abs_delta_sum=counts.abs_delta_sum.numpy() if counts is not None else np.zeros(0),
    )


def _check_measured(entries: tuple[SiteDelta, ...]) -> None:
    if not any(entry.tokens for entry in entries):
        raise DataError("no real token reached the selected sites; the data produced no input (is it empty?)")
    if not any(entry.pairs for entry in entries):
        tokens = max(entry.tokens for entry in entries)
        raise SiteError(
            f"no site gave a pair of consecutive real tokens (at most {tokens} tokens per site); temporal sparsity "
            "needs sequences of at least two tokens or a frame axis ([batch, frames, units])"
        )
