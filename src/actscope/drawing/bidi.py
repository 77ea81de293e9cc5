"""User text on the page, kept apart from the page's own text (bidirectional-text isolation).

A string from the run (a model name, a path, a site, a table name or value, a document) may hold
bidi controls such as U+202E RIGHT-TO-LEFT OVERRIDE, which reverse everything after them up to
the end of the paragraph, the page's own labels included. So every such string is isolated:

* in HTML, by ``<bdi>`` (:func:`isolate`): the browser closes whatever the string opened at the
  element's end, and lays the string out as one unit among its neighbours;
* in plain text, where no element can be put (the page ``<title>``, SVG labels and tooltips), by
  removing the controls (:func:`plain`): an FSI…PDI pair around a string could be closed early by
  a PDI inside it, and a control has no use in a label. :func:`plain_isolated` then wraps what is
  left in FSI…PDI, which nothing inside can close any more, so right-to-left letters still keep
  to themselves. The run keeps the exact string; only the label drops the controls.
"""
from __future__ import annotations

import re
from html import escape

# ALM, LRM, RLM, the embeddings and overrides (LRE RLE PDF LRO RLO) and the isolates (LRI RLI FSI PDI)
CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
FSI, PDI = "\u2068", "\u2069"


def isolate(value: object) -> str:
    """``value`` as escaped HTML inside ``<bdi>``."""
    return f"<bdi>{escape(str(value))}</bdi>"


def plain(value: object) -> str:
    """``str(value)`` without bidi controls (for text that cannot hold an element)."""
    return CONTROLS.sub("", str(value))


def plain_isolated(value: object) -> str:
    """:func:`plain` inside FSI…PDI: isolated in plain text (not yet escaped)."""
    return f"{FSI}{plain(value)}{PDI}"
