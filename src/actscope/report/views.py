"""Sections for what the explain commands add to a run: the lens grid (``actscope lens --out``),
the steering sweep (``actscope steer --out``) and the attention viewer (``actscope attention
--out``). Charts are drawn here in Python; the grid and the viewer are built by views.js from the
tables in the JSON payload, with textContent only. Nothing here writes run text into HTML except
through :func:`~actscope.drawing.bidi.plain_isolated` in escaped chart labels."""
from __future__ import annotations

import math
from typing import Any

from ..drawing import charts
from .sections import Section, column_values, table_slot

TABLES = ("lens", "lens_kl", "steering", "attention", "attention_tokens")  # shown by these sections


def lens_section(run: Any) -> Section | None:
    if "lens" not in run.tables:
        return None
    kinds = list(dict.fromkeys(str(k) for k in column_values(run.tables["lens"], "kind")))
    picker = ""
    if len(kinds) > 1:
        options = "".join(f'<option value="{i}">{"tuned lens" if k == "tuned" else "logit lens"}</option>' for i, k in enumerate(kinds))
        picker = f'<label class="pick">lens <select id="lens-kind">{options}</select></label>'
    chart = ""
    if "lens_kl" in run.tables:
        kl = run.tables["lens_kl"]
        layers = [float(v) for v in column_values(kl, "layer")]
        series = {name: (layers, [float(v) for v in column_values(kl, name)]) for name in ("logit", "tuned") if name in kl.column_names}
        chart = charts.lines("lens-kl", {f"{name} lens": xy for name, xy in series.items()}, title="KL from the final distribution on held-out text",
                             x_label="layer", y_label="KL (nats)", width=480, height=220)
    body = ('<p class="note">The token each layer\'s residual stream would predict (the next token for a causal LM, the '
            "position's own for an encoder), read out through the final norm and the unembedding (the logit lens; the tuned "
            "lens first applies an affine translator fitted per layer). Rows are layers, columns the prompt's tokens; darker "
            f'= more probable; hover a cell for its top tokens.</p>{picker}<div id="lens-grid" class="lens-view scroll"></div>{chart}')
    return Section("lens", "Logit lens", body)


def steering_section(run: Any) -> Section | None:
    if "steering" not in run.tables:
        return None
    table = run.tables["steering"]
    scale = [float(v) for v in column_values(table, "scale")]
    chart = ""
    for column, label in (("logprob", "mean log p(target tokens)"), ("score", "mean classifier score")):
        values = [float(v) if v is not None else math.nan for v in column_values(table, column)] if column in table.column_names else []
        if not any(math.isfinite(v) for v in values):
            continue
        by_scale: dict[float, list[float]] = {}
        for s, v in zip(scale, values):
            if math.isfinite(v):
                by_scale.setdefault(s, []).append(v)
        xs = sorted(by_scale)
        chart += charts.lines(f"steering-{column}", {label: (xs, [sum(by_scale[x]) / len(by_scale[x]) for x in xs])},
                              title=f"{label} versus steering scale", x_label="scale", y_label=label, width=480, height=220)
    body = ('<p class="note">Greedy continuations with the steering vector added at each scale (scale 0 is the model '
            f"unchanged); the effect metric is averaged over the prompts.</p>{chart}{table_slot('steering')}")
    return Section("steering", "Steering sweep", body)


def attention_section(run: Any) -> Section | None:
    if "attention" not in run.tables:
        return None
    body = ('<p class="note">Each head\'s attention probabilities over the prompt: rows are queries, columns keys; darker = '
            "more attention. Hover a cell for the query and key tokens; the dashed column is the first token, where sink "
            'heads put most of their attention.</p><div class="attention-view"><label class="pick">head '
            '<select id="attention-head"></select></label><div class="readout" id="attention-readout"></div>'
            '<div id="attention-grid" class="scroll"></div></div>')
    return Section("attention", "Attention viewer", body)
