"""A Run → the JSON payload the page's browser.js reads (tables, neurons, examples, decoded).

Only what the page shows is sent: every table as compact columns (see columns.py), and for the
neuron browser the neuron rows plus their strongest examples and decoded tokens.
"""
from __future__ import annotations

import json
from typing import Any

from .columns import encode_table
from .examples import decoded_payload, examples_payload
from .sections import IN_CARDS

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
    if "examples" in run.tables and run.tables["examples"].num_rows:
        payload["examples"] = _examples_within_budget(neurons, run.tables["examples"], _size(payload))
    if "decoded" in run.tables and run.tables["decoded"].num_rows:
        payload["decoded"] = decoded_payload(neurons, run.tables["decoded"])
    return payload


def _examples_within_budget(neurons: Any, examples: Any, used: int) -> dict[str, Any]:
    chosen = examples_payload(neurons, examples)
    while used + _size(chosen) > NEURON_BUDGET and chosen["keep"] > 1:
        chosen = examples_payload(neurons, examples, keep=chosen["keep"] // 2)
    return chosen


def _size(payload: Any) -> int:
    return len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
