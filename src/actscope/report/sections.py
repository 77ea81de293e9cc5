"""The report's sections, each built only when the run holds its data.

A section is (id, title, HTML body). Bodies hold Python-drawn SVG charts and empty table
placeholders (``<div class="as-table" data-table=NAME>``) that browser.js fills from the JSON
payload with textContent. Nothing here ever writes data-set text (contexts, tokens) into HTML;
a name from the run in a title is the section's ``subject``, shown isolated (see bidi.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from html import escape
from typing import Any

import numpy as np

from ..drawing import charts
from ..drawing.bidi import plain_isolated

# tables shown inside the unit cards ("decode" is what `actscope decode --out RUN` writes)
IN_CARDS = ("neurons", "examples", "decoded", "decode", "samples", "unit_hist", "cofiring", "tokens", "images")
FIRING_BINS = 100  # at most this many points per units-firing curve, whatever the unit count


@dataclass(frozen=True)
class Section:
    id: str
    title: str  # our words
    body: str
    subject: str = ""  # the run's text after the title (a table name), isolated when shown


def table_slot(name: str) -> str:
    return f'<div class="as-table" data-table="{escape(name, quote=True)}"></div>'


def slug(name: str) -> str:
    """A table name as an HTML id fragment (names come from the run, so keep only safe chars)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def column_named(table: Any, *names: str) -> str | None:
    """The first of ``names`` that ``table`` has (other developers name columns slightly apart)."""
    return next((n for n in names if n in table.column_names), None)


def column_values(table: Any, name: str) -> list:
    return table.column(name).to_pylist()


# -- profile sections ----------------------------------------------------------------------
def _criteria(layers: Any) -> list[tuple[str, str, str]]:
    """(label, ratio column, dead column) for a > 0 and every |a| > ε column of the layers table."""
    found = [("a > 0", "activation_ratio", "dead_units")]
    for name in layers.column_names:
        if name.startswith("activation_ratio_abs_gt_"):
            eps = name.removeprefix("activation_ratio_abs_gt_")
            found.append((f"|a| > {eps}", name, f"dead_units_abs_gt_{eps}"))
    return [c for c in found if c[1] in layers.column_names]


def layers_section(run: Any) -> Section | None:
    if "layers" not in run.tables:
        return None
    layers = run.tables["layers"]
    labels = [str(s) for s in column_values(layers, "site")]
    criteria = _criteria(layers)
    # an <option> holds plain text only, and ε comes from the run's column names
    options = "".join(f'<option value="{i}">{escape(plain_isolated(label))}</option>' for i, (label, _, _) in enumerate(criteria))
    panels = []
    for i, (label, ratio, dead) in enumerate(criteria):
        figures = charts.bars(f"activation-ratio-{i}", labels, {"activation ratio": column_values(layers, ratio)},
                              title=f"Activation ratio ({label}) per site", top=1.0)
        if dead in layers.column_names:
            figures += charts.bars(f"dead-units-{i}", labels, {"dead units": column_values(layers, dead)}, title=f"Dead units ({label}) per site")
        panels.append(f'<div class="crit" data-group="layers" data-key="{i}"{"" if i == 0 else " hidden"}>'
                      f'<p class="note">Activation ratio: the fraction of units firing per token, averaged over tokens '
                      f'(sparsity = 1 − ratio). Dead units: units that fire on no token.</p>{figures}</div>')
    body = (f'<label class="pick">criterion <select class="crit-select" data-group="layers">{options}</select></label>'
            + "".join(panels) + table_slot("layers"))
    return Section("layers", "Activation ratio and dead units per layer", body)


def _sites_with(run: Any, prefix: str) -> list[str]:
    return [name.removeprefix(prefix) for name in run.arrays if name.startswith(prefix)]


def histograms_section(run: Any) -> Section | None:
    sites = _sites_with(run, "hist.counts.")
    if not sites:
        return None
    cells = []
    for site in sites:
        edges, counts = run.histogram(site)
        edges, counts = edges.double().tolist(), counts.double().tolist()
        total = max(sum(counts), 1.0)
        zero, under, over = (c / total for c in counts[:3])
        note = f"zero {zero:.1%} · <{edges[0]:g}: {under:.1%} · ≥{edges[-1]:g}: {over:.1%}"
        shown_edges, shown_counts = _trim(edges, counts[3:])
        cells.append(charts.step_histogram(f"hist-{site}", shown_edges, shown_counts, title=site, note=note))
    body = ('<p class="note">Share of values per log-spaced bin of |a|, pooled over the site\'s units; exact zeros, '
            f'underflow and overflow are counted apart.</p><div class="grid">{"".join(cells)}</div>')
    return Section("histograms", "|activation| histograms", body)


def _trim(edges: list[float], counts: list[float], margin: int = 4) -> tuple[list[float], list[float]]:
    """Only the bins from the first to the last non-empty one (plus a margin): the fixed
    1e-6 … 1e4 range would squeeze most layers' values into a few pixels."""
    filled = [i for i, c in enumerate(counts) if c > 0]
    if not filled:
        return edges, counts
    lo, hi = max(0, filled[0] - margin), min(len(counts), filled[-1] + 1 + margin)
    return edges[lo:hi + 1], counts[lo:hi]


def firing_section(run: Any) -> Section | None:
    sites = _sites_with(run, "firing.")
    if not sites:
        return None
    eps = list(run.manifest.get("config", {}).get("eps", []))
    cells = []
    for site in sites:
        firing = run.firing(site).double().numpy()  # [criterion, units + 1]
        names = ["a > 0"] + [f"|a| > {e:g}" for e in eps]
        series = {names[c] if c < len(names) else f"criterion {c}": _firing_curve(firing[c]) for c in range(firing.shape[0])}
        cells.append(charts.lines(f"firing-{site}", series, title=site, x_label="fraction of units firing",
                                  y_label="share of tokens", x_range=(0.0, 1.0), width=420, height=200))
    body = ('<p class="note">Per token, the fraction of the site\'s units that fire; the curve is the distribution over '
            f'tokens (binned to at most {FIRING_BINS} points).</p><div class="grid">{"".join(cells)}</div>')
    return Section("firing", "Units firing per token", body)


def _firing_curve(counts: np.ndarray) -> tuple[list[float], list[float]]:
    """[units + 1] token counts → (bin centre as a fraction of units, share of tokens per bin)."""
    units = len(counts) - 1
    width = max(1, math.ceil(len(counts) / FIRING_BINS))
    padded = np.pad(counts, (0, (-len(counts)) % width)).reshape(-1, width).sum(axis=1)  # [bins]
    centres = (np.arange(len(padded)) * width + (width - 1) / 2) / max(units, 1)
    return centres.tolist(), (padded / max(counts.sum(), 1.0)).tolist()


def sinks_section(run: Any) -> Section | None:
    if "heads" not in run.tables:
        return None
    heads = run.tables["heads"]
    rows, columns, grid = long_to_grid(column_values(heads, "site"), column_values(heads, "head"), column_values(heads, "first_token_attention"))
    chart = charts.heatmap("sink-heatmap", rows, [str(c) for c in columns], grid, title="Attention on the first token (site × head)",
                           value_label="first-token attention")
    body = ('<p class="note">Mean attention probability that real queries put on key position 0 (the attention-sink score); '
            f"dark = sink.</p>{chart}{table_slot('heads')}")
    return Section("sinks", "Attention sinks (layer × head)", body)


def long_to_grid(rows: list, columns: list, values: list) -> tuple[list[str], list, list[list[float]]]:
    """Long rows (row key, column key, value) → (row labels, column keys, matrix with NaN holes)."""
    row_keys, column_keys = list(dict.fromkeys(str(r) for r in rows)), sorted(set(columns))
    row_at = {r: i for i, r in enumerate(row_keys)}
    column_at = {c: j for j, c in enumerate(column_keys)}
    matrix = [[math.nan] * len(column_keys) for _ in row_keys]
    for r, c, v in zip(rows, columns, values):
        matrix[row_at[str(r)]][column_at[c]] = float(v) if v is not None else math.nan
    return row_keys, column_keys, matrix


def neurons_section(run: Any) -> Section | None:
    if "neurons" not in run.tables:
        return None
    body = (
        '<div class="browser"><label class="pick">find <input id="unit-search" type="search" autocomplete="off" '
        'placeholder="unit number, site, or both: blocks.2.mlp.post 17"></label>'
        '<span id="unit-count" class="note"></span>'
        '<div id="unit-card" class="card" hidden></div><div id="neuron-table" class="as-table-neurons"></div></div>'
    )
    return Section("neurons", "Neuron browser", body)
