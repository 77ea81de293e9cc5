"""Compact column-oriented JSON for the page: one encoded column per table column.

Encodings (decoded by browser.js):
  {"t": "num", "v": [...]}   floats rounded to 4 significant digits, NaN/Inf → null
  {"t": "int", "v": [...]}   integers;  {"t": "bool", "v": [0/1, ...]}
  {"t": "cat", "d": [...], "v": [...]}   strings (and anything else) as a dictionary + codes
  {"t": ..., "c": value}    a column whose every value is the same (e.g. ``nonfinite`` = 0)
  {"t": "int", "s": [...]}   integers that count 0, 1, 2, … and restart: the run lengths
                             (the ``unit`` column of a site's units, 6 characters per site)
Rounding to 4 digits is what a table or card can show; the exact values stay in the run.
"""
from __future__ import annotations

from typing import Any

import numpy as np

DIGITS = 4


def round_floats(values: np.ndarray) -> list[float | None]:
    """Floats to 4 significant digits as Python floats (short JSON), NaN/Inf → None."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    out = [float(f"{v:.{DIGITS}g}") for v in np.where(finite, values, 0.0).tolist()]  # shortest repr
    if not finite.all():
        for i in np.flatnonzero(~finite).tolist():
            out[i] = None
    return out


def encode_column(values: Any) -> dict[str, Any]:
    """One column (numpy array, pyarrow array or list) → its compact JSON-able form."""
    array = _as_numpy(values)
    kind = _kind(array)
    if kind == "cat":  # strings, nullable columns, lists: shown as their text
        array = np.array(["" if v is None else str(v) for v in array.tolist()], dtype=object)
    if len(array) > 1 and _constant(array, kind):
        first = encode_column(array[:1])
        return {"t": first["t"], "c": first["d"][first["v"][0]] if first["t"] == "cat" else first["v"][0]}
    if kind == "num":
        return {"t": "num", "v": round_floats(array)}
    if kind == "int":
        runs = _counting_runs(array.astype(np.int64))
        return {"t": "int", "s": runs} if runs is not None else {"t": "int", "v": array.astype(np.int64).tolist()}
    if kind == "bool":
        return {"t": "bool", "v": array.astype(np.int8).tolist()}
    dictionary, codes = np.unique(array, return_inverse=True)
    return {"t": "cat", "d": dictionary.tolist(), "v": codes.astype(np.int64).tolist()}


def encode_table(table: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A pyarrow table → ``{"n": rows, "columns": {name: encoded}}`` in column order."""
    return {
        "n": table.num_rows,
        "columns": {name: encode_column(table.column(name)) for name in table.column_names if name not in skip},
    }


def _counting_runs(values: np.ndarray) -> list[int] | None:
    """Run lengths when ``values`` is 0..a-1, 0..b-1, …, else None."""
    if len(values) < 2 or values[0] != 0:
        return None
    restarts = np.flatnonzero(values == 0)  # [runs]
    lengths = np.diff(np.append(restarts, len(values)))
    expected = np.arange(len(values)) - np.repeat(restarts, lengths)
    return lengths.tolist() if np.array_equal(values, expected) and len(restarts) * 8 < len(values) else None


def _as_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):
        try:
            return values.to_numpy(zero_copy_only=False)
        except TypeError:
            return values.to_numpy()
    return np.asarray(values)


def _kind(array: np.ndarray) -> str:
    if array.dtype == np.bool_:
        return "bool"
    if np.issubdtype(array.dtype, np.integer):
        return "int"
    if np.issubdtype(array.dtype, np.floating):
        return "num"
    return "cat"


def _constant(array: np.ndarray, kind: str) -> bool:
    if kind == "num":
        finite = np.isfinite(array)
        return bool(finite.all() and (array == array[0]).all())
    if kind == "cat":
        return all(v == array[0] for v in array.tolist())  # str == str
    return bool((array == array[0]).all())
