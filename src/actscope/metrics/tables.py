"""Turn observed accumulators into the run's plain tables (one row per unit/site/head/example)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..sites import Plan, Site
from ..trace import split_token_id


def eps_column(prefix: str, eps: float) -> str:
    """Column name for a threshold: ``frac_abs_gt_0``, ``frac_abs_gt_0.001``, ``frac_abs_gt_1``."""
    return f"{prefix}_{eps:g}"


def neurons_table(plan: Plan, stats: Mapping[str, Any], eps: Sequence[float]) -> dict[str, np.ndarray]:
    """One row per (site, unit): count, moments, firing fractions, non-finite count."""
    parts = [_neuron_rows(site, stats[site.label], eps) for site in _unit_sites(plan, stats)]
    return _concat(parts)


def _neuron_rows(site: Site, stats: Any, eps: Sequence[float]) -> dict[str, np.ndarray]:
    moments, ladder = stats.moments, stats.ladder
    units = moments.count.shape[0]
    rows = {
        "site": np.array([site.label] * units, dtype=object),
        "layer": np.full(units, _layer(site), dtype=np.int64),
        "unit": np.asarray(site.units, dtype=np.int64) if site.units else np.arange(units, dtype=np.int64),
        "count": _np(moments.count),
        "mean": _np(moments.mean),
        "std": _np(moments.std),
        "min": _np(moments.min),
        "max": _np(moments.max),
        "frac_pos": _np(ladder.frac_pos),
    }
    for j, value in enumerate(eps):
        rows[eps_column("frac_abs_gt", value)] = _np(ladder.frac_abs_gt[j])
    rows["nonfinite"] = _np(moments.nonfinite)
    return rows


def layers_table(plan: Plan, stats: Mapping[str, Any], eps: Sequence[float]) -> dict[str, np.ndarray]:
    """One row per unit site: tokens, activation ratio (a > 0 and |a| > ε), dead units."""
    rows: list[dict[str, Any]] = []
    for site in _unit_sites(plan, stats):
        ladder, moments = stats[site.label].ladder, stats[site.label].moments
        row: dict[str, Any] = {
            "site": site.label,
            "layer": _layer(site),
            "units": int(moments.count.shape[0]),
            "tokens": _tokens(ladder),
            "activation_ratio": float(ladder.activation_ratio(0)),
            "dead_units": int(ladder.dead_units(0).sum()),
        }
        for j, value in enumerate(eps, start=1):
            row[eps_column("activation_ratio_abs_gt", value)] = float(ladder.activation_ratio(j))
            row[eps_column("dead_units_abs_gt", value)] = int(ladder.dead_units(j).sum())
        row["mean_abs_max"] = float(np.nanmean(np.abs(_np(moments.max)))) if moments.count.sum() else float("nan")
        row["nonfinite"] = int(moments.nonfinite.sum())
        rows.append(row)
    return _columns(rows)


def _tokens(ladder: Any) -> int:
    return int(ladder.firing_hist[0].sum())


def heads_table(plan: Plan, stats: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """One row per (attention site, head): mean attention on the first token, and more."""
    rows: list[dict[str, Any]] = []
    for site in plan.sites:
        if site.hook.layout != "pattern" or site.label not in stats:
            continue
        sink = stats[site.label]
        heads = site.heads or range(len(sink.first_token_attention))
        for position, head in enumerate(heads):
            rows.append({
                "site": site.label,
                "layer": _layer(site),
                "head": int(head),
                "queries": int(sink.count[position]),
                "first_token_attention": float(sink.first_token_attention[position]),
                "max_attention": float(sink.mean_max_attention[position]),
                "entropy": float(sink.mean_entropy[position]),
            })
    return _columns(rows) if rows else None


def examples_table(
    plan: Plan,
    stats: Mapping[str, Any],
    context: Callable[[int, int], tuple[str, str, str]] | None,
) -> dict[str, np.ndarray]:
    """The top-k activating tokens of every unit, with surrounding text when known."""
    parts = []
    for site in _unit_sites(plan, stats):
        unit, rank, value, tok = stats[site.label].top.to_rows()
        doc, pos = split_token_id(torch.as_tensor(tok, dtype=torch.int64))
        names = np.asarray(site.units, dtype=np.int64) if site.units else None
        texts = _contexts(context, doc.tolist(), pos.tolist())
        parts.append({
            "site": np.array([site.label] * len(unit), dtype=object),
            "layer": np.full(len(unit), _layer(site), dtype=np.int64),
            "unit": names[unit] if names is not None else np.asarray(unit, dtype=np.int64),
            "rank": np.asarray(rank, dtype=np.int64),
            "value": np.asarray(value, dtype=np.float64),
            "doc": doc.numpy(),
            "pos": pos.numpy(),
            "left": np.array([t[0] for t in texts], dtype=object),
            "token": np.array([t[1] for t in texts], dtype=object),
            "right": np.array([t[2] for t in texts], dtype=object),
        })
    return _concat(parts)


def _contexts(context: Callable[[int, int], tuple[str, str, str]] | None, docs: list[int], positions: list[int]) -> list[tuple[str, str, str]]:
    """Context text per example; tokens shared by many units' top lists are decoded once."""
    if context is None:
        return [("", "", "")] * len(docs)
    cache: dict[tuple[int, int], tuple[str, str, str]] = {}
    for key in zip(docs, positions):
        if key not in cache:
            cache[key] = context(*key)
    return [cache[key] for key in zip(docs, positions)]


def site_arrays(plan: Plan, stats: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Histograms of |a| and per-token firing distributions, for safetensors."""
    arrays: dict[str, torch.Tensor] = {}
    for site in _unit_sites(plan, stats):
        stat = stats[site.label]
        hist = stat.hist
        arrays[f"hist.edges.{site.label}"] = hist.edges.to(torch.float64)
        extra = torch.tensor([hist.zero, hist.underflow, hist.overflow], dtype=torch.int64)
        arrays[f"hist.counts.{site.label}"] = torch.cat([extra, hist.counts.to(torch.int64)])
        arrays[f"firing.{site.label}"] = stat.ladder.firing_hist.to(torch.int64)
    return arrays


def _unit_sites(plan: Plan, stats: Mapping[str, Any]) -> list[Site]:
    return [s for s in plan.sites if s.hook.layout != "pattern" and s.label in stats]


def _layer(site: Site) -> int:
    return -1 if site.layer is None else site.layer


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    if not rows:
        return {}
    return {key: np.array([row[key] for row in rows], dtype=object if isinstance(rows[0][key], str) else None) for key in rows[0]}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
