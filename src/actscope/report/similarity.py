"""The report's sections for representation comparisons: ``actscope compare``'s site × site
similarity heat map (model A's sites as rows, model B's as columns) and each site's effective
rank, from the run's ``similarity`` and ``similarity_sites`` tables; ``actscope encode``'s
cross-validated R² per (model, site), from its ``encoding`` and ``encoding_channels`` tables."""
from __future__ import annotations

import math
import os
from html import escape
from typing import Any

from ..drawing import charts
from ..drawing.bidi import isolate
from .sections import Section, column_values, long_to_grid, table_slot

TABLES = ("similarity", "similarity_sites", "encoding", "encoding_channels")
NARROW = 3  # characters a column key may have under a heat map cell


def short_labels(names: list[str]) -> list[str]:
    """Site names without the prefix and suffix they all share (``blocks.0.resid.post`` … →
    ``0`` …), so a heat map's column keys stay narrow; the full names are in the tooltips' table."""
    if len(names) < 2:
        return list(names)
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1] if "." in prefix else ""
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
    suffix = suffix[suffix.find("."):] if "." in suffix else ""
    cut = [n[len(prefix): len(n) - len(suffix) if suffix else None] for n in names]
    return cut if all(cut) and len(set(cut)) == len(cut) else list(names)


def similarity_section(run: Any) -> Section | None:
    if "similarity" not in run.tables:
        return None
    table = run.tables["similarity"]
    measures = column_values(table, "measure") if "measure" in table.column_names else ["similarity"] * table.num_rows
    models = run.manifest.get("models") or [{}, {}]
    name_a, name_b = (models[0].get("name", "A"), models[-1].get("name", "B"))
    charts_html, keys = "", ""
    for k, measure in enumerate(dict.fromkeys(measures)):
        keep = [i for i, m in enumerate(measures) if m == measure]
        site_a = [column_values(table, "site_a")[i] for i in keep]
        site_b = [column_values(table, "site_b")[i] for i in keep]
        values = [column_values(table, "similarity")[i] for i in keep]
        rows_a, rows_b = list(dict.fromkeys(site_a)), list(dict.fromkeys(site_b))
        short_a, short_b = dict(zip(rows_a, short_labels(rows_a))), dict(zip(rows_b, short_labels(rows_b)))
        rows, columns, grid = long_to_grid([short_a[s] for s in site_a], [rows_b.index(s) for s in site_b], values)
        finite = [v for row in grid for v in row if not math.isnan(v)]
        low = min(0.0, min(finite, default=0.0))  # RSA can be negative
        labels = [short_b[rows_b[c]] for c in columns]
        if max(len(label) for label in labels) > NARROW:  # too wide for a cell: number the columns, list them below
            keys = '<p class="note">Columns: ' + ", ".join(f"{c} = {isolate(rows_b[c])}" for c in columns) + "</p>"
            labels = [str(c) for c in columns]
        charts_html += charts.heatmap(f"similarity-{k}", rows, labels, grid, title=str(measure),
                                      low=low, high=1.0, value_label=str(measure))
    note = (f'<p class="note">Rows: sites of {isolate(name_a)}; columns: sites of {isolate(name_b)} '
            "(shown without the part every name shares). Dark = similar (1 = the same representation up to rotation and "
            "scale, for CKA). The table lists every pair with its full site names.</p>")
    body = note + charts_html + keys + table_slot("similarity") + _ranks(run)
    return Section("similarity", "Representation similarity (site × site)", body)


def _ranks(run: Any) -> str:
    if "similarity_sites" not in run.tables:
        return ""
    table = run.tables["similarity_sites"]
    sides, sites = column_values(table, "side"), column_values(table, "site")
    labels = [f"{side.upper()} {site}" for side, site in zip(sides, sites)]
    series = {name: column_values(table, name) for name in ("effective_rank", "participation_ratio") if name in table.column_names}
    chart = charts.bars("similarity-ranks", labels, series, title="Effective rank and participation ratio per site") if series else ""
    return (f'<h3>{escape("Dimensionality")}</h3><p class="note">Effective rank (exp of the entropy of the normalised singular values) '
            "and participation ratio ((Σλ)² / Σλ² of the covariance's eigenvalues), per site of model A and B.</p>"
            + chart + table_slot("similarity_sites"))


def encoding_section(run: Any) -> Section | None:
    if "encoding" not in run.tables:
        return None
    table = run.tables["encoding"]
    models, sites = column_values(table, "model"), column_values(table, "site")
    several = len(set(models)) > 1
    labels = [f"{model} · {site}" if several else str(site) for model, site in zip(models, sites)]
    if not labels:
        return None
    series = {"mean R²": column_values(table, "mean_r2")}
    if "mean_normalized_r2" in table.column_names:
        series["mean R² / noise ceiling"] = column_values(table, "mean_normalized_r2")
    finite = [v for values in series.values() for v in values if v is not None and math.isfinite(v)]
    chart = charts.bars("encoding", labels, series, title="Cross-validated ridge R² per site (mean over channels)",
                        top=max(1.0, max(finite, default=1.0)))
    scores = [v if v is not None and math.isfinite(v) else -math.inf for v in series["mean R²"]]
    best = max(range(len(labels)), key=scores.__getitem__)
    note = (f'<p class="note">How well each site\'s activations predict the recorded responses: ridge regression, R² on held-out '
            f"stimuli (cross-validated), averaged over channels; negative R² is drawn as 0. Best: {isolate(labels[best])}.</p>")
    body = note + chart + table_slot("encoding") + (table_slot("encoding_channels") if "encoding_channels" in run.tables else "")
    return Section("encoding", "Encoding models (R² per site)", body)


__all__ = ["similarity_section", "encoding_section", "short_labels", "TABLES"]
