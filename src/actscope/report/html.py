"""Assemble the one self-contained page: header, sections, CSS, the JSON payload and browser.js.

The payload sits in ``<script type="application/json">`` with ``<``, ``>``, ``&`` and the
U+2028/9 line separators escaped, so no data-set string can close the element or start markup.
A Content-Security-Policy allows only this page's own script (by hash) and no network at all.
The ``generator`` meta tag (:data:`MARKER`) comes first in the file: it is how ``write_report``
knows a file at its target is a report it wrote, and so may be replaced.
"""
from __future__ import annotations

import base64
import hashlib
import json
from html import escape
from importlib.resources import files
from typing import Any

from ..drawing.bidi import isolate, plain_isolated
from .header import header_html
from .sections import Section

from ..store.writer import REPORT_MARKER as MARKER

_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def asset(name: str) -> str:
    return files("actscope.report").joinpath("assets", name).read_text(encoding="utf-8")


def safe_json(payload: Any) -> str:
    """JSON that is inert inside a ``<script>`` element (see the module docstring)."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    for raw, escaped in _JSON_ESCAPES.items():
        text = text.replace(raw, escaped)
    return text


SCRIPTS = ("browser.js", "units.js", "views.js")  # one script, hashed once: browser.js first (it shares its helpers)


def page_html(run: Any, sections: list[Section], payload: dict[str, Any]) -> str:
    script = "\n".join(asset(name) for name in SCRIPTS)
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    policy = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
              "img-src data:; base-uri 'none'; form-action 'none'")
    # <title> is plain text (no <bdi> possible): the model name loses its bidi controls there
    title = escape(f"actscope report · {plain_isolated(run.manifest.get('model', {}).get('name', 'run'))}")
    nav = "".join(f'<a href="#{escape(s.id, quote=True)}">{heading(s)}</a>' for s in sections)
    body = "".join(
        f'<section id="{escape(s.id, quote=True)}" data-section="{escape(s.id, quote=True)}"><h2>{heading(s)}</h2>{s.body}</section>'
        for s in sections
    )
    return (
        f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{MARKER}"
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{asset('report.css')}</style></head><body>"
        f"{header_html(run)}<nav>{nav}</nav>{body}"
        f'<script type="application/json" id="actscope-data">{safe_json(payload)}</script>'
        f"<script>{script}</script></body></html>\n"
    )


def heading(section: Section) -> str:
    """A section's title as HTML: our words escaped, the run's name for it (a table name) isolated."""
    return escape(section.title) + (f" {isolate(section.subject)}" if section.subject else "")
