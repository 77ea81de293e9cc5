"""The unit pages' data on the page: activation windows of the shown examples, quantile samples,
per-unit histograms and co-firing partners, each linked to the neuron rows (see examples.py).

Windows are the bulk, so they travel compactly: each value as two characters of the base-64
alphabet, the code ``round(2047 · v / peak) + 2048`` (0: no value) with ``peak`` the unit's
largest ``|v|`` over its shown windows, which is also what a token's shade is relative to; the
hover text reads the value back to about 3.5 significant digits (the run keeps float32). Token
texts come once per document position (the run's ``tokens`` table), as indices into one list
of distinct strings.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .columns import encode_column, round_floats
from .examples import _clip_left, _clip_right, _floats, _ints, _texts, row_index

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
LEVELS = 2047


def windows_payload(neurons: Any, examples: Any, chosen: np.ndarray, row: np.ndarray, tokens: Any | None) -> dict[str, Any] | None:
    """Per shown example (``chosen``, rows of ``examples`` in page order): its window codes and
    the window's first position relative to the example's; per neuron row the peak; the texts."""
    if "window" not in examples.column_names or not len(chosen):
        return None
    values, length = _window_matrix(examples.column("window").take(chosen))  # [m, W] NaN padded, [m]
    rows = row[chosen]
    peak = np.zeros(neurons.num_rows)
    np.maximum.at(peak, rows, np.nan_to_num(np.abs(values), nan=0.0, posinf=0.0).max(axis=1, initial=0.0))
    scale = peak[rows][:, None]
    scaled = np.where(scale > 0, np.round(np.divide(values, scale, where=scale > 0, out=np.zeros_like(values)) * LEVELS), 0.0)
    codes = np.where(np.isfinite(values), np.clip(scaled + LEVELS + 1, 1, 2 * LEVELS + 1), 0).astype(np.int64)
    pairs = _PAIRS[codes]  # [m, W] two characters each
    pairs[np.arange(values.shape[1])[None, :] >= length[:, None]] = ""  # past the window's end
    width = max(values.shape[1], 1)
    text = np.ascontiguousarray(pairs).view(f"<U{2 * width}").reshape(-1) if len(pairs) else np.zeros(0, dtype="<U2")
    offsets = _ints(examples, "window_start")[chosen] - _ints(examples, "pos")[chosen]
    return {"win": text.tolist(), "ws": offsets.astype(np.int64).tolist(), "peak": round_floats(peak),
            "tok": _token_texts(tokens, _ints(examples, "doc")[chosen]) if tokens is not None else None}


_PAIRS = np.array([ALPHABET[c >> 6] + ALPHABET[c & 63] for c in range(4096)], dtype="<U2")


def _window_matrix(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """A list<float> column → ``([rows, W] float64 NaN-padded, [rows] lengths)``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    length = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float64)
    width = int(length.max(initial=0))
    matrix = np.full((len(length), max(width, 1)), np.nan)
    starts = np.cumsum(length) - length
    within = np.arange(len(flat)) - np.repeat(starts, length)
    matrix[np.repeat(np.arange(len(length)), length), within] = flat
    return matrix, length


def _token_texts(tokens: Any, docs: np.ndarray) -> dict[str, Any]:
    """The texts of the shown documents' tokens: per document its first position and a run of
    string indices (-1 for a position the run has no text for)."""
    doc, pos, text = _ints(tokens, "doc"), _ints(tokens, "pos"), _texts(tokens, "token", np.arange(tokens.num_rows))
    wanted = np.isin(doc, np.unique(docs))
    doc, pos, text = doc[wanted], pos[wanted], [t for t, w in zip(text, wanted.tolist()) if w]
    strings, index = np.unique(np.array(text, dtype=object), return_inverse=True) if text else (np.array([], dtype=object), np.array([], np.int64))
    out: dict[str, list] = {"doc": [], "first": [], "ids": [], "strings": [str(s) for s in strings.tolist()]}
    order = np.lexsort((pos, doc))
    doc, pos, index = doc[order], pos[order], np.asarray(index).reshape(-1)[order]
    for d in np.unique(doc).tolist():
        rows = doc == d
        first, last = int(pos[rows].min()), int(pos[rows].max())
        ids = np.full(last - first + 1, -1, dtype=np.int64)
        ids[pos[rows] - first] = index[rows]
        out["doc"].append(d)
        out["first"].append(first)
        out["ids"].append(ids.tolist())
    return out


def samples_payload(neurons: Any, samples: Any) -> dict[str, Any]:
    """Per neuron row its quantile samples: ``cnt`` per row, then bin, value and context."""
    row = row_index(neurons, samples)
    chosen = np.flatnonzero(row >= 0)
    chosen = chosen[np.lexsort((_floats(samples, "value")[chosen], _ints(samples, "bin")[chosen], row[chosen]))]
    doc, pos = _ints(samples, "doc")[chosen], _ints(samples, "pos")[chosen]
    _, first, ctx = np.unique(doc * (int(pos.max(initial=0)) + 1) + pos, return_index=True, return_inverse=True)
    taken = chosen[first]  # one sample row per distinct context (tokens recur across units)
    return {
        "cnt": encode_column(np.bincount(row[chosen], minlength=neurons.num_rows)),
        "bin": _ints(samples, "bin")[chosen].tolist(),
        "bins": int(_ints(samples, "bin").max()) + 1 if samples.num_rows else 0,
        "val": round_floats(_floats(samples, "value")[chosen]),
        "ctx": ctx.reshape(-1).astype(np.int64).tolist(),
        "contexts": {"doc": doc[first].tolist(), "pos": pos[first].tolist(),
                     "left": [_clip_left(t) for t in _texts(samples, "left", taken)], "token": _texts(samples, "token", taken),
                     "right": [_clip_right(t) for t in _texts(samples, "right", taken)]},
    }


def hist_payload(neurons: Any, hist: Any) -> dict[str, Any]:
    """Per neuron row its histogram of sampled firing values: ``hi`` (the last bin's top edge,
    0 without one), ``n`` (tokens sampled), then ``bins`` counts each (flat, in row order)."""
    row = row_index(neurons, hist)
    bins = int(_ints(hist, "bin").max()) + 1 if hist.num_rows else 0
    counts = np.zeros((neurons.num_rows, bins), dtype=np.int64)
    top, sampled = np.zeros(neurons.num_rows), np.zeros(neurons.num_rows, dtype=np.int64)
    known = row >= 0
    counts[row[known], _ints(hist, "bin")[known]] = _ints(hist, "count")[known]
    last = known & (_ints(hist, "bin") == bins - 1)
    top[row[last]] = _floats(hist, "hi")[last]
    sampled[row[known]] = _ints(hist, "sampled")[known]
    return {"bins": bins, "hi": round_floats(top), "n": encode_column(sampled), "counts": counts.reshape(-1).tolist()}


def cofire_payload(neurons: Any, cofiring: Any) -> dict[str, Any]:
    """Per neuron row its co-firing partners: ``cnt`` per row, then the partner's neuron row,
    the Jaccard index and the sampled tokens both fired on; ``tokens``: the sample's size."""
    row = row_index(neurons, cofiring)
    partner = _partner_rows(neurons, cofiring)
    chosen = np.flatnonzero((row >= 0) & (partner >= 0))
    chosen = chosen[np.lexsort((_ints(cofiring, "rank")[chosen], row[chosen]))]
    return {
        "cnt": encode_column(np.bincount(row[chosen], minlength=neurons.num_rows)),
        "row": partner[chosen].tolist(), "j": round_floats(_floats(cofiring, "jaccard")[chosen]),
        "shared": _ints(cofiring, "shared")[chosen].tolist(),
        "tokens": int(_ints(cofiring, "tokens").max()) if cofiring.num_rows else 0,
    }


def _partner_rows(neurons: Any, cofiring: Any) -> np.ndarray:
    import pyarrow as pa

    other = pa.table({"site": cofiring.column("site"), "unit": cofiring.column("other")})
    return row_index(neurons, other)
