"""Top-activating examples and decoded tokens, linked to neuron rows for the unit cards.

The page holds one list of distinct contexts (a (doc, pos) token with its left/right text) and,
per neuron row, how many examples it has; the browser turns the counts into offsets. Contexts
repeat across units (one strong token fires many units), so sharing them keeps the page small.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .columns import encode_column, round_floats

# How many examples the page may hold in all; above it each unit keeps only its strongest
# ranks (the full set stays in examples.parquet). 100k units × 4 ranks fits in ~20 MB.
MAX_EXAMPLES = 400_000
# Characters of context shown on each side of the token: what one line of a card shows.
CONTEXT_CHARS = 48


def row_index(neurons: Any, other: Any) -> np.ndarray:
    """For each row of ``other`` (site, unit columns), the row of ``neurons`` with the same
    (site, unit), or -1 when the unit is not in ``neurons``."""
    sites = {s: i for i, s in enumerate(dict.fromkeys(_strings(neurons, "site")))}
    n_key = _keys(sites, _strings(neurons, "site"), _ints(neurons, "unit"))  # [n_neurons]
    o_key = _keys(sites, _strings(other, "site"), _ints(other, "unit"))  # [n_other]
    order = np.argsort(n_key, kind="stable")
    found = np.searchsorted(n_key[order], o_key).clip(0, len(order) - 1)
    hit = (n_key[order][found] == o_key) if len(order) else np.zeros(len(o_key), bool)
    return np.where(hit, order[found] if len(order) else -1, -1)


def examples_payload(neurons: Any, examples: Any, keep: int | None = None) -> dict[str, Any]:
    """Per neuron row its strongest examples: ``cnt`` per row, then ``ctx`` (context index)
    and ``val`` per example in row order, and the distinct ``contexts``. ``keep`` caps the
    ranks kept per unit (besides the MAX_EXAMPLES cap)."""
    n = neurons.num_rows
    rank = _ints(examples, "rank")
    keep, row, chosen = chosen_examples(neurons, examples, keep)
    doc, pos = _ints(examples, "doc")[chosen], _ints(examples, "pos")[chosen]
    key = doc * (int(pos.max(initial=0)) + 1) + pos
    _, first, ctx = np.unique(key, return_index=True, return_inverse=True)
    taken = chosen[first]  # one example row per distinct context
    return {
        "keep": keep,
        "k": int(rank.max()) + 1 if len(rank) else 0,
        "cnt": encode_column(np.bincount(row[chosen], minlength=n)),
        "ctx": ctx.reshape(-1).astype(np.int64).tolist(),
        "val": round_floats(_floats(examples, "value")[chosen]),
        "contexts": {
            "doc": doc[first].tolist(),
            "pos": pos[first].tolist(),
            "left": [_clip_left(t) for t in _texts(examples, "left", taken)],
            "token": _texts(examples, "token", taken),
            "right": [_clip_right(t) for t in _texts(examples, "right", taken)],
        },
    }


def chosen_examples(neurons: Any, examples: Any, keep: int | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """``(keep, row, chosen)``: the ranks kept per unit, each example's neuron row, and the
    examples the page shows (indices into ``examples``, by neuron row, then rank)."""
    rank = _ints(examples, "rank")
    keep = min(_ranks_to_keep(neurons.num_rows, int(rank.max()) + 1 if len(rank) else 0), keep or len(rank))
    row = row_index(neurons, examples)
    chosen = np.flatnonzero((row >= 0) & (rank < keep))
    return keep, row, chosen[np.lexsort((rank[chosen], row[chosen]))]


def decoded_payload(neurons: Any, decoded: Any) -> dict[str, Any]:
    """Per neuron row its decoded tokens: ``cnt`` per row, then token, score and direction.
    Sites are matched without a unit selection: a run profiled on ``blocks.1.mlp.post[0:8]``
    (site ``blocks.1.mlp.post[0,1,…]``) takes the tokens decoded for ``blocks.1.mlp.post``."""
    row = row_index(_whole_sites(neurons), _whole_sites(decoded))
    rank = _ints(decoded, "rank") if "rank" in decoded.column_names else np.zeros(decoded.num_rows, np.int64)
    direction = np.array([str(d) for d in decoded.column("direction").to_pylist()], dtype=object)
    chosen = np.flatnonzero(row >= 0)
    chosen = chosen[np.lexsort((rank[chosen], direction[chosen], row[chosen]))]
    return {
        "cnt": encode_column(np.bincount(row[chosen], minlength=neurons.num_rows)),
        "token": encode_column(np.array(_texts(decoded, "token", chosen), dtype=object)),
        "score": round_floats(_floats(decoded, "score")[chosen]),
        "dir": encode_column(direction[chosen]),
    }


def images_payload(examples: Any, rows: np.ndarray, images: Any) -> dict[str, Any]:
    """For the shown examples (``rows`` of ``examples``), ``img``: each one's index into ``uris``
    (PNG data URIs of the run's ``images`` table) or -1, and each one's box ``y0 x0 y1 x1``."""
    import base64

    key = {(s, u, r): i for i, (s, u, r) in enumerate(zip(_strings(images, "site"), _ints(images, "unit"), _ints(images, "rank")))}
    wanted = zip(np.array(_strings(examples, "site"), dtype=object)[rows], _ints(examples, "unit")[rows], _ints(examples, "rank")[rows])
    found = [key.get((s, int(u), int(r)), -1) for s, u, r in wanted]
    used = sorted({i for i in found if i >= 0})
    slot = {i: n for n, i in enumerate(used)}
    png = images.column("png").to_pylist()
    return {
        "img": [slot.get(i, -1) for i in found],
        "uris": ["data:image/png;base64," + base64.b64encode(png[i]).decode("ascii") for i in used],
        "box": [[int(images.column(c)[i].as_py()) for c in ("y0", "x0", "y1", "x1")] if i >= 0 else None for i in found],
    }


def _clip_left(text: str) -> str:
    """The last CONTEXT_CHARS characters, starting at a word when it can, marked with '…'."""
    if len(text) <= CONTEXT_CHARS:
        return text
    tail = text[-CONTEXT_CHARS:]
    space = tail.find(" ")
    return "…" + (tail[space:] if 0 <= space < CONTEXT_CHARS // 2 else tail)


def _clip_right(text: str) -> str:
    if len(text) <= CONTEXT_CHARS:
        return text
    head = text[:CONTEXT_CHARS]
    space = head.rfind(" ")
    return (head[:space] if space > CONTEXT_CHARS // 2 else head) + "…"


def _ranks_to_keep(units: int, k: int) -> int:
    if units * k <= MAX_EXAMPLES:
        return k
    return max(1, MAX_EXAMPLES // max(units, 1))


def _keys(sites: dict[str, int], site: list[str], unit: np.ndarray) -> np.ndarray:
    codes = np.array([sites.get(s, -1) for s in site], dtype=np.int64)  # unknown site → no match
    return np.where(codes >= 0, codes * (1 << 32) + unit, -1 - np.arange(len(codes)))


def _whole_sites(table: Any) -> Any:
    """``site`` and ``unit`` of ``table``, each site name without its unit selection."""
    import pyarrow as pa

    return pa.table({"site": [s.split("[", 1)[0] for s in _strings(table, "site")], "unit": _ints(table, "unit")})


def _strings(table: Any, name: str) -> list[str]:
    return [str(v) for v in table.column(name).to_pylist()]


def _texts(table: Any, name: str, rows: np.ndarray) -> list[str]:
    if name not in table.column_names:
        return [""] * len(rows)
    picked = table.column(name).take(rows).to_pylist()
    return ["" if v is None else str(v) for v in picked]


def _ints(table: Any, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(), dtype=np.int64)


def _floats(table: Any, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(), dtype=np.float64)
