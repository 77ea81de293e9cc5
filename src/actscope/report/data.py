"""A Run → the JSON payload the page's browser.js reads (tables, neurons, examples, decoded).

Only what the page shows is sent: every table as compact columns (see columns.py), and for the
neuron browser the neuron rows plus their strongest examples and decoded tokens.
"""
from __future__ import annotations

import json
from typing import Any

from .columns import encode_table
from .examples import chosen_examples, decoded_payload, examples_payload, images_payload
from .sections import IN_CARDS
from .units import cofire_payload, hist_payload, samples_payload, windows_payload

DECODED = ("decoded", "decode")  # the decode table, as a test or `actscope decode --out` names it
# The unit pages' extras on the page, in the order they are kept when the budget is short.
EXTRAS = {"cofire": ("cofiring", cofire_payload), "hist": ("unit_hist", hist_payload), "samples": ("samples", samples_payload)}

# JSON bytes the neuron browser may take; above it units keep fewer examples (halving until
# one is left), so a 100k-unit run stays well under 20 MB whatever its texts look like.
NEURON_BUDGET = 16_000_000


def page_payload(run: Any) -> dict[str, Any]:
    """``{"tables": {name: encoded}, "neurons": {...} | None}`` for one run."""
    tables = {name: encode_table(table) for name, table in run.tables.items() if name not in IN_CARDS}
    return {"tables": tables, "neurons": _neurons(run)}


def _neurons(run: Any) -> dict[str, Any] | None:
    if "neurons" not in run.tables:
        return None
    neurons = run.tables["neurons"]
    payload = encode_table(neurons)
    for name in DECODED:  # `actscope decode --out RUN` writes "decode"
        if name in run.tables and run.tables[name].num_rows:
            payload["decoded"] = decoded_payload(neurons, run.tables[name])
    extras = {name: build(neurons, run.tables[table]) for name, (table, build) in EXTRAS.items()
              if table in run.tables and run.tables[table].num_rows}
    if "examples" in run.tables and run.tables["examples"].num_rows:
        payload["examples"], extras = _examples_within_budget(run, neurons, extras, _size(payload))
    payload.update(extras)
    return payload


def _examples_within_budget(run: Any, neurons: Any, extras: dict[str, Any], used: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The most examples per unit (with their windows) that fit the budget together with as many
    of the unit-page extras as fit (dropped last first: samples, then histograms, then co-firing)."""
    examples = run.tables["examples"]
    sizes = {name: _size({name: part}) for name, part in extras.items()}  # with its key, as on the page
    keep = None
    while True:
        chosen = _with_windows(run, neurons, examples, examples_payload(neurons, examples, keep=keep))
        for dropped in range(len(extras) + 1):
            kept = dict(list(extras.items())[:len(extras) - dropped])
            if used + _size(chosen) + sum(sizes[name] for name in kept) <= NEURON_BUDGET:
                return chosen, kept
        if chosen["keep"] <= 1:
            return chosen, {}
        keep = chosen["keep"] // 2


def _with_windows(run: Any, neurons: Any, examples: Any, chosen: dict[str, Any]) -> dict[str, Any]:
    _, row, rows = chosen_examples(neurons, examples, chosen["keep"])
    windows = windows_payload(neurons, examples, rows, row, run.tables.get("tokens"))
    chosen = {**chosen, "windows": windows} if windows is not None else chosen
    if "images" in run.tables and run.tables["images"].num_rows:  # a run fed images: thumbnails
        chosen.update(images_payload(examples, rows, run.tables["images"]))
    return chosen


def _size(payload: Any) -> int:
    return len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
