"""Inline SVG charts drawn in Python: horizontal bars, lines, heatmaps, log-x step histograms.

No plotting library: each chart is a short SVG string with explicit width/height, so the page
stays light and works offline. Every piece of text goes through ``_text`` (XML-escaped), and
hover details are SVG ``<title>`` elements, which browsers show as text, never as markup.

SVG text cannot hold a ``<bdi>`` and tooltips hold no elements at all, so labels lose their bidi
controls instead (bidi.py): each ``<text>`` is laid out on its own, so what is left of a label
cannot reorder another, and in a tooltip that joins a name to our words the name sits in FSI…PDI.
"""
from __future__ import annotations

import math
from html import escape
from typing import Mapping, Sequence

from .bidi import plain, plain_isolated

WIDTH = 640
ROW = 16  # px per bar row
PALETTE = ("#3b6fb6", "#e07b39", "#4c9a5b", "#b04a8f", "#8a7b2f", "#5a5a5a", "#2aa7b8", "#c23b3b")


def _text(value: object) -> str:
    return escape(plain(value), quote=True)


def _name(value: object) -> str:
    """A name from the run inside a tooltip that goes on with our words: isolated."""
    return escape(plain_isolated(value), quote=True)


def _num(value: float) -> str:
    """A short label for a number: 3 significant digits, integers as integers."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.3g}"


def _svg(name: str, width: int, height: int, body: str, title: str) -> str:
    return (
        f'<svg class="chart" data-chart="{_text(name)}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
        f"<title>{_text(title)}</title>{body}</svg>"
    )


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def bars(name: str, labels: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str, top: float | None = None) -> str:
    """Horizontal bars, one row per label, one bar per series (grouped); ``top`` fixes the scale."""
    names = list(series)
    longest = max((len(str(label)) for label in labels), default=4)
    left = round(min(8 + 6.5 * longest, WIDTH * 0.45))
    right = 60
    per_row = ROW * len(names)
    legend = 18 + (18 if len(names) > 1 else 0)  # the title line, then the colour keys
    height = legend + per_row * len(labels) + 6 * len(labels) + 24
    values = _finite([v for s in series.values() for v in s])
    scale_top = top if top is not None else (max(values) if values else 1.0) or 1.0
    span = WIDTH - left - right
    parts = [f'<text x="{left}" y="12" class="lbl">{_text(title)}</text>']
    if len(names) > 1:
        parts.append(_legend(names, left, WIDTH, 18)[0])
    for i, label in enumerate(labels):
        y0 = legend + i * (per_row + 6)
        parts.append(f'<text x="{left - 6:.0f}" y="{y0 + per_row / 2 + 4:.0f}" text-anchor="end" class="lbl">{_text(label)}</text>')
        for j, key in enumerate(names):
            value = series[key][i]
            ok = value is not None and math.isfinite(float(value))
            w = max(0.0, min(1.0, float(value) / scale_top)) * span if ok and scale_top > 0 else 0.0
            y = y0 + j * ROW
            parts.append(
                f'<rect class="bar" x="{left:.0f}" y="{y + 1}" width="{w:.1f}" height="{ROW - 3}" fill="{PALETTE[j % len(PALETTE)]}">'
                f"<title>{_name(label)} · {_name(key)}: {_text(_num(value) if ok else 'n/a')}</title></rect>"
                f'<text x="{left + w + 4:.1f}" y="{y + ROW - 4}" class="val">{_text(_num(value) if ok else "n/a")}</text>'
            )
    parts.append(f'<text x="{left:.0f}" y="{height - 6}" class="axis">0</text>'
                 f'<text x="{left + span:.0f}" y="{height - 6}" text-anchor="end" class="axis">{_text(_num(scale_top))}</text>')
    return _svg(name, WIDTH, int(height), "".join(parts), title)


def _legend(names: Sequence[str], x0: float, width: int = WIDTH, y0: float = 0) -> tuple[str, float]:
    """Colour keys left to right, wrapping at ``width``; returns (SVG, height used)."""
    parts, x, y = [], x0, y0
    for j, key in enumerate(names):
        step = 24 + 6.5 * len(str(key))
        if x + step > width and x > x0:
            x, y = x0, y + 15
        parts.append(f'<rect x="{x:.0f}" y="{y + 3:.0f}" width="10" height="10" fill="{PALETTE[j % len(PALETTE)]}"/>'
                     f'<text x="{x + 14:.0f}" y="{y + 12:.0f}" class="lbl">{_text(key)}</text>')
        x += step
    return "".join(parts), y + 18 - y0


def lines(name: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str, x_label: str, y_label: str,
          log_x: bool = False, x_range: tuple[float, float] | None = None, width: int = WIDTH, height: int = 260) -> str:
    """One polyline with point markers per series; ``log_x`` plots x on a log10 axis. The
    chart's ``title`` is drawn above the plot; ``x_range`` fixes the x axis."""
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    legend, legend_height = _legend(list(series), 52, width, 16) if len(series) > 1 else ("", 0)
    pad_l, pad_r, pad_t, pad_b = 52, 14, 20 + legend_height, 34
    height += legend_height
    xs = [fx(x) for xs_, _ in series.values() for x in _finite(xs_) if not log_x or x > 0]
    ys = _finite([y for _, ys_ in series.values() for y in ys_])
    x_lo, x_hi = (fx(x_range[0]), fx(x_range[1])) if x_range else ((min(xs), max(xs)) if xs else (0.0, 1.0))
    y_lo, y_hi = min(0.0, min(ys)) if ys else 0.0, (max(ys) if ys else 1.0)
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)

    def px(x: float) -> float:
        return pad_l + (fx(x) - x_lo) / (x_hi - x_lo) * (width - pad_l - pad_r)

    def py(y: float) -> float:
        return height - pad_b - (y - y_lo) / (y_hi - y_lo) * (height - pad_t - pad_b)

    parts = [f'<text x="{pad_l}" y="12" class="lbl">{_text(title)}</text>', legend]
    parts.append(_axes(width, height, pad_l, pad_r, pad_t, pad_b, x_label, y_label,
                       (_num(10 ** x_lo if log_x else x_lo), _num(10 ** x_hi if log_x else x_hi)), (_num(y_lo), _num(y_hi))))
    for j, (key, (x_values, y_values)) in enumerate(series.items()):
        points = [(float(x), float(y)) for x, y in zip(x_values, y_values)
                  if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y)) and (not log_x or x > 0)]
        color = PALETTE[j % len(PALETTE)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(points))
        parts.append(f'<polyline class="line" fill="none" stroke="{color}" stroke-width="1.8" points="{path}"/>')
        if len(points) <= 60:
            parts.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"><title>{_name(key)}: '
                         f"{_text(x_label)} {_text(_num(x))}, {_text(y_label)} {_text(_num(y))}</title></circle>" for x, y in points)
    return _svg(name, width, height, "".join(parts), title)


def _axes(width, height, pad_l, pad_r, pad_t, pad_b, x_label, y_label, x_ends, y_ends) -> str:
    x1, y1 = width - pad_r, height - pad_b
    return (
        f'<path class="axisline" d="M{pad_l},{pad_t}V{y1}H{x1}" fill="none" stroke="#888"/>'
        f'<text x="{pad_l}" y="{y1 + 14}" class="axis">{_text(x_ends[0])}</text>'
        f'<text x="{x1}" y="{y1 + 14}" text-anchor="end" class="axis">{_text(x_ends[1])}</text>'
        f'<text x="{(pad_l + x1) / 2:.0f}" y="{height - 4}" text-anchor="middle" class="axis">{_text(x_label)}</text>'
        f'<text x="{pad_l - 4}" y="{y1}" text-anchor="end" class="axis">{_text(y_ends[0])}</text>'
        f'<text x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end" class="axis">{_text(y_ends[1])}</text>'
        f'<text x="10" y="{(pad_t + y1) / 2:.0f}" class="axis" transform="rotate(-90 10 {(pad_t + y1) / 2:.0f})" '
        f'text-anchor="middle">{_text(y_label)}</text>'
    )


def heatmap(name: str, rows: Sequence[str], columns: Sequence[str], values: Sequence[Sequence[float]], *, title: str,
            low: float = 0.0, high: float = 1.0, value_label: str = "value") -> str:
    """A grid of cells shaded from white (``low``) to dark blue (``high``); NaN cells are grey."""
    longest = max((len(str(r)) for r in rows), default=4)
    left = min(8 + 6.5 * longest, 260)
    cell = max(8, min(28, int((WIDTH - left - 10) / max(len(columns), 1))))
    width = int(left + cell * len(columns) + 10)
    height = 34 + cell * len(rows) + 6
    parts = [f'<text x="{left:.0f}" y="12" class="lbl">{_text(title)}</text>']
    parts += [f'<text x="{left + i * cell + cell / 2:.0f}" y="28" text-anchor="middle" class="axis">{_text(c)}</text>'
             for i, c in enumerate(columns) if len(columns) <= 32 or i % max(1, len(columns) // 16) == 0]
    for r, label in enumerate(rows):
        y = 34 + r * cell
        parts.append(f'<text x="{left - 6:.0f}" y="{y + cell / 2 + 4:.0f}" text-anchor="end" class="lbl">{_text(label)}</text>')
        for c, value in enumerate(values[r]):
            ok = value is not None and math.isfinite(float(value))
            share = max(0.0, min(1.0, (float(value) - low) / (high - low))) if ok and high > low else 0.0
            fill = _blue(share) if ok else "#ddd"
            parts.append(f'<rect class="cell" x="{left + c * cell:.0f}" y="{y}" width="{cell - 1}" height="{cell - 1}" fill="{fill}">'
                         f"<title>{_name(label)} · {_name(columns[c])}: {_text(value_label)} {_text(_num(value) if ok else 'n/a')}</title></rect>")
    return _svg(name, width, int(height), "".join(parts), title)


def _blue(share: float) -> str:
    """White → #1f4e99 as ``share`` goes 0 → 1."""
    r, g, b = (int(255 + (t - 255) * share) for t in (0x1F, 0x4E, 0x99))
    return f"#{r:02x}{g:02x}{b:02x}"


def step_histogram(name: str, edges: Sequence[float], counts: Sequence[float], *, title: str, note: str = "",
                   width: int = 300, height: int = 150) -> str:
    """A log-x histogram as one filled step path (compact for many bins and many layers)."""
    pad_l, pad_r, pad_t, pad_b = 8, 8, 18, 28
    lo, hi = math.log10(edges[0]), math.log10(edges[-1])
    total = max(float(sum(counts)), 1.0)
    top = max(max(counts, default=0) / total, 1e-12)
    span_x, span_y = width - pad_l - pad_r, height - pad_t - pad_b

    def px(edge: float) -> float:
        return pad_l + (math.log10(edge) - lo) / (hi - lo) * span_x

    base = height - pad_b
    d = [f"M{px(edges[0]):.1f},{base}"]
    for i, count in enumerate(counts):
        y = base - (count / total) / top * span_y
        d.append(f"V{y:.1f}H{px(edges[i + 1]):.1f}")
    d.append(f"V{base}Z")
    body = (
        f'<text x="{pad_l}" y="12" class="lbl">{_text(title)}</text>'
        f'<path class="hist" d="{"".join(d)}" fill="#3b6fb6" fill-opacity="0.75" stroke="#1f4e99" stroke-width="0.6"/>'
        f'<path d="M{pad_l},{base}H{width - pad_r}" stroke="#888"/>'
        f'<text x="{pad_l}" y="{base + 12}" class="axis">{_text(_num(edges[0]))}</text>'
        f'<text x="{width - pad_r}" y="{base + 12}" text-anchor="end" class="axis">{_text(_num(edges[-1]))}</text>'
        f'<text x="{width / 2:.0f}" y="{height - 3}" text-anchor="middle" class="axis">{_text(note or "|a| (log scale)")}</text>'
    )
    return _svg(name, width, height, body, title)


STANDALONE_STYLE = (".lbl{font:12px sans-serif;fill:#222}.axis{font:11px sans-serif;fill:#555}"
                    ".val{font:10px sans-serif;fill:#333}")


def standalone(svg: str) -> str:
    """A chart as a file of its own (a page figure, a reproduction's figure): the report's text
    styles inlined, so it reads the same outside the report."""
    head, sep, rest = svg.partition(">")
    return f"{head}{sep}<style>{STANDALONE_STYLE}</style>{rest}"
