"""Sections for the tables that measurements add to a run (``actscope profile --metrics``):
active/dormant heads, the CETT sweep and thresholds, MoE experts, outlier channels.

Column names differ a little between producers (``frequency`` / ``routing_frequency``,
``dormant`` / ``active``), so each section looks for the first of a few names.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..drawing import charts
from .sections import Section, column_named, column_values, long_to_grid, table_slot


def _row_labels(table: Any) -> list:
    column = column_named(table, "site", "layer")
    return column_values(table, column) if column else list(range(table.num_rows))


def extreme_heads(run: Any) -> Section | None:
    if "extreme_heads" not in run.tables:
        return None
    table = run.tables["extreme_heads"]
    head = column_named(table, "head")
    if "active" in table.column_names:
        active = [bool(v) for v in column_values(table, "active")]
    elif "dormant" in table.column_names:
        active = [not bool(v) for v in column_values(table, "dormant")]
    else:
        active = None
    chart = ""
    if head and active is not None:
        rows, columns, grid = long_to_grid(_row_labels(table), column_values(table, head), [float(a) for a in active])
        chart = charts.heatmap("active-heads", rows, [str(c) for c in columns], grid, title="Active (dark) and dormant (light) heads",
                               value_label="active")
    score = column_named(table, "sink_score")
    if head and score:
        rows, columns, grid = long_to_grid(_row_labels(table), column_values(table, head), column_values(table, score))
        chart += charts.heatmap("sink-score", rows, [str(c) for c in columns], grid, title="Sink score", value_label="sink score")
    return Section("extreme_heads", "Active and dormant heads", chart + table_slot("extreme_heads"))


def cett_sweep(run: Any) -> Section | None:
    if "cett_sweep" not in run.tables:
        return None
    table = run.tables["cett_sweep"]
    series: dict[str, tuple[list, list]] = {}
    for method, p, sparsity in zip(column_values(table, "method"), column_values(table, "p"), column_values(table, "sparsity")):
        xs, ys = series.setdefault(str(method), ([], []))
        xs.append(p)
        ys.append(sparsity)
    ps = [p for xs, _ in series.values() for p in xs if p is not None and p > 0]
    log_x = bool(ps) and max(ps) / min(ps) >= 10
    chart = charts.lines("cett-sweep", series, title="Sparsity versus p", x_label="p (allowed degradation)", y_label="sparsity", log_x=log_x)
    return Section("cett_sweep", "Sparsity versus p (CETT-PPL-p%)", chart + table_slot("cett_sweep"))


def cett_layers(run: Any) -> Section | None:
    if "cett_layers" not in run.tables:
        return None
    table = run.tables["cett_layers"]
    labels = [str(v) for v in _row_labels(table)]
    ratios = {name: column_values(table, name) for name in ("activation_ratio", "dense_activation_ratio") if name in table.column_names}
    chart = charts.bars("cett-ratios", labels, ratios, title="Activation ratio after thresholding vs dense", top=1.0) if ratios else ""
    if "eps" in table.column_names:
        chart += charts.bars("cett-eps", labels, {"ε": column_values(table, "eps")}, title="Per-layer threshold ε")
    return Section("cett_layers", "Per-layer CETT thresholds", chart + table_slot("cett_layers"))


def moe_experts(run: Any) -> Section | None:
    if "moe_experts" not in run.tables:
        return None
    table = run.tables["moe_experts"]
    chart = ""
    expert = column_named(table, "expert")
    for name, title in (("routing_frequency", "Routing frequency"), ("frequency", "Routing frequency"), ("activation_ratio", "Activation ratio")):
        if expert and name in table.column_names and not (name == "frequency" and "routing_frequency" in table.column_names):
            values = column_values(table, name)
            top = max([v for v in values if v is not None and math.isfinite(v)], default=1.0) or 1.0
            rows, columns, grid = long_to_grid(_row_labels(table), column_values(table, expert), values)
            chart += charts.heatmap(f"moe-{name}", rows, [str(c) for c in columns], grid, title=f"{title} (layer × expert)",
                                    high=top, value_label=name.replace("_", " "))
    return Section("moe_experts", "MoE expert usage", chart + table_slot("moe_experts"))


def outliers(run: Any) -> Section | None:
    if "outliers" not in run.tables:
        return None
    table = run.tables["outliers"]
    measure = column_named(table, "ratio", *[n for n in table.column_names if "ratio" in n], "kurtosis")
    chart = ""
    if measure:
        values = np.array([np.nan if v is None else float(v) for v in column_values(table, measure)])
        finite = np.where(np.isfinite(values), values, -np.inf)
        top = [int(i) for i in np.argsort(-finite, kind="stable")[:20] if np.isfinite(values[i])]
        sites, channel = _row_labels(table), column_named(table, "channel", "unit")
        channels = column_values(table, channel) if channel else list(range(table.num_rows))
        labels = [f"{sites[i]} ch {channels[i]}" for i in top]
        chart = charts.bars("outlier-channels", labels, {measure: [values[i] for i in top]}, title=f"Top outlier channels by {measure}")
    return Section("outliers", "Outlier channels", chart + table_slot("outliers"))


TRAINING_POINTS = 400  # at most this many points per line of a training chart


def training_steps(run: Any) -> Section | None:
    """``training_steps`` (step, metric, site, value; actscope.train): one chart per metric
    against steps, a line per site (long runs thinned to every n-th step)."""
    if "training_steps" not in run.tables:
        return None
    table = run.tables["training_steps"]
    if not {"step", "metric", "site", "value"} <= set(table.column_names):
        return None
    steps, metrics = column_values(table, "step"), column_values(table, "metric")
    sites, values = column_values(table, "site"), column_values(table, "value")
    grouped: dict[str, dict[str, tuple[list, list]]] = {}
    for step, metric, site, value in zip(steps, metrics, sites, values):
        xs, ys = grouped.setdefault(str(metric), {}).setdefault(str(site or "model"), ([], []))
        xs.append(step)
        ys.append(value)
    charts_html = ""
    for j, (metric, series) in enumerate(grouped.items()):
        every = max(1, max(len(xs) for xs, _ in series.values()) // TRAINING_POINTS)
        thinned = {site: (xs[::every], ys[::every]) for site, (xs, ys) in series.items()}
        charts_html += charts.lines(f"training-{j}", thinned, title=f"{metric} per training step", x_label="step", y_label=metric)
    return Section("training_steps", "Training: per-step scalars", charts_html + table_slot("training_steps"))
