"""The report's header: model, data, sites, tokens and time, from the run's manifest."""
from __future__ import annotations

from html import escape
from typing import Any


def header_html(run: Any) -> str:
    """A definition list of what was run on what; every value is HTML-escaped."""
    manifest = run.manifest
    model, data, timings = manifest.get("model", {}), manifest.get("data", {}), manifest.get("timings", {})
    sites = [entry.get("site", "?") for entry in manifest.get("plan", [])]
    rows = [
        ("model", _join(model.get("name"), model.get("class"), model.get("family") and f"family {model.get('family')}",
                        model.get("weight_hash") and f"weights {str(model.get('weight_hash'))[:12]}")),
        ("data", _join(data.get("name"), data.get("source") if data.get("source") != data.get("name") else None,
                       data.get("documents") is not None and f"{data.get('documents'):,} documents",
                       data.get("fingerprint") and f"fingerprint {str(data.get('fingerprint'))[:12]}")),
        ("sites", _join(f"{len(sites)} sites", _sites_summary(sites))),
        ("tokens", f"{data['tokens']:,}" if isinstance(data.get("tokens"), int) else "?"),
        ("time", _join(timings.get("started"), isinstance(timings.get("seconds"), (int, float)) and f"{timings['seconds']:.1f} s",
                       isinstance(timings.get("tokens_per_second"), (int, float)) and f"{timings['tokens_per_second']:,.0f} tokens/s")),
    ]
    items = "".join(f'<dt>{escape(k)}</dt><dd data-field="{escape(k)}">{escape(v)}</dd>' for k, v in rows)
    title = escape(str(model.get("name", "run")))
    where = f'<p class="note">{escape(str(run.path))}</p>' if run.path else ""
    return f'<header id="header" data-section="header"><h1>actscope report · {title}</h1>{where}<dl>{items}</dl></header>'


def _join(*parts: Any) -> str:
    return " · ".join(str(p) for p in parts if p not in (None, False, ""))


def _sites_summary(sites: list[str], shown: int = 8) -> str:
    listed = ", ".join(sites[:shown])
    return listed + (f", … (+{len(sites) - shown})" if len(sites) > shown else "")
