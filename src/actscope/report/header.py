"""The report's header: model, data, sites, tokens and time, from the run's manifest.

Every value from the manifest is user text (a model name, a file path, a site): each sits in its
own ``<bdi>`` (see bidi.py), so a control inside one cannot reorder the labels around it.
"""
from __future__ import annotations

from html import escape
from typing import Any

from ..drawing.bidi import isolate


def header_html(run: Any) -> str:
    """A definition list of what was run on what; every value is escaped and isolated."""
    manifest = run.manifest
    model, data, timings = manifest.get("model", {}), manifest.get("data", {}), manifest.get("timings", {})
    sites = [entry.get("site", "?") for entry in manifest.get("plan", [])]
    rows = [
        ("model", _join(_user(model.get("name")), _user(model.get("class")), _labelled("family", model.get("family")),
                        _labelled("weights", model.get("weight_hash") and str(model.get("weight_hash"))[:12]))),
        ("data", _join(_user(data.get("name")), _user(data.get("source")) if data.get("source") != data.get("name") else None,
                       isinstance(data.get("documents"), int) and f"{data['documents']:,} documents",
                       _labelled("fingerprint", data.get("fingerprint") and str(data.get("fingerprint"))[:12]))),
        ("sites", _join(f"{len(sites)} sites", _sites_summary(sites))),
        ("tokens", f"{data['tokens']:,}" if isinstance(data.get("tokens"), int) else "?"),
        ("time", _join(_user(timings.get("started")), isinstance(timings.get("seconds"), (int, float)) and f"{timings['seconds']:.1f} s",
                       isinstance(timings.get("tokens_per_second"), (int, float)) and f"{timings['tokens_per_second']:,.0f} tokens/s")),
    ]
    items = "".join(f'<dt>{escape(k)}</dt><dd data-field="{escape(k)}">{v}</dd>' for k, v in rows)
    title = isolate(model.get("name", "run"))
    where = f'<p class="note">{isolate(run.path)}</p>' if run.path else ""
    return f'<header id="header" data-section="header"><h1>actscope report · {title}</h1>{where}<dl>{items}</dl></header>'


def _user(value: Any) -> str | None:
    return None if value in (None, False, "") else isolate(value)


def _labelled(label: str, value: Any) -> str | None:
    return None if value in (None, False, "") else f"{escape(label)} {isolate(value)}"


def _join(*parts: Any) -> str:
    """Parts already HTML (user values isolated; our own text has nothing to escape), joined."""
    return " · ".join(str(p) for p in parts if p not in (None, False, ""))


def _sites_summary(sites: list[str], shown: int = 8) -> str:
    listed = ", ".join(isolate(site) for site in sites[:shown])
    return listed + (f", … (+{len(sites) - shown})" if len(sites) > shown else "")
