"""Circuit reuse: which components matter for task A, which for task B, and how much the two
sets overlap (METHODS.md, "Circuit reuse").

Each task's circuit is read from a patching table (exact or attribution, one row per
component): the ``top`` components by ``|score|``, or every component with
``|score| >= threshold``. Components are matched across the tables by (kind, site, head, unit,
position). Reported: ``|A∩B| / |A|``, ``|A∩B| / |B|`` and the Jaccard index ``|A∩B| / |A∪B|``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from ..errors import InputError
from ..results import TableResult

KEY_COLUMNS = ("per", "site", "head", "unit", "position")


@dataclass(frozen=True)
class CircuitOverlap(TableResult):
    """The two circuits and their overlap; ``to_table()`` has one row per component in A ∪ B."""

    table_name: ClassVar[str] = "circuit_overlap"

    score: str  # the column the circuits were chosen by
    in_a: tuple[tuple, ...]  # component keys of circuit A, best first
    in_b: tuple[tuple, ...]
    scores_a: Mapping[tuple, float]
    scores_b: Mapping[tuple, float]
    key_columns: tuple[str, ...]

    @property
    def shared(self) -> tuple[tuple, ...]:
        b = set(self.in_b)
        return tuple(key for key in self.in_a if key in b)

    @property
    def overlap_a(self) -> float:
        """``|A∩B| / |A|``: the share of task A's circuit that task B reuses."""
        return len(self.shared) / len(self.in_a) if self.in_a else float("nan")

    @property
    def overlap_b(self) -> float:
        return len(self.shared) / len(self.in_b) if self.in_b else float("nan")

    @property
    def jaccard(self) -> float:
        union = len(set(self.in_a) | set(self.in_b))
        return len(self.shared) / union if union else float("nan")

    def to_table(self) -> dict[str, np.ndarray]:
        union = list(self.in_a) + [key for key in self.in_b if key not in set(self.in_a)]
        table = {name: np.asarray([key[i] for key in union], dtype=object if name in ("per", "site") else np.int64)
                 for i, name in enumerate(self.key_columns)}
        a, b = set(self.in_a), set(self.in_b)
        table.update({
            "in_a": np.asarray([key in a for key in union]), "in_b": np.asarray([key in b for key in union]),
            "score_a": np.asarray([self.scores_a.get(key, np.nan) for key in union], dtype=np.float64),
            "score_b": np.asarray([self.scores_b.get(key, np.nan) for key in union], dtype=np.float64),
        })
        return table


def circuit_overlap(table_a: Any, table_b: Any, *, top: int | None = None, threshold: float | None = None,
                    score: str = "recovered") -> CircuitOverlap:
    """Overlap of the components that matter for two tasks.

    ``table_a`` / ``table_b``: patching results (``ComponentEffects``), or any table-like object
    with ``to_table()`` / a mapping of columns holding the key columns and ``score``. Give
    exactly one of ``top`` (the n components with the largest ``|score|``) or ``threshold``
    (every component with ``|score| >= threshold``).
    """
    if (top is None) == (threshold is None):
        raise InputError("circuit_overlap: give exactly one of top=n or threshold=x")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise InputError(f"circuit_overlap: top must be an int >= 1, got {top!r}")
    columns_a, columns_b = _columns(table_a, "table_a"), _columns(table_b, "table_b")
    keys = tuple(c for c in KEY_COLUMNS if c in columns_a and c in columns_b)
    if not keys:
        raise InputError(f"circuit_overlap: the tables share none of the key columns {', '.join(KEY_COLUMNS)}")
    a, scores_a = _circuit(columns_a, keys, score, top, threshold, "table_a")
    b, scores_b = _circuit(columns_b, keys, score, top, threshold, "table_b")
    return CircuitOverlap(score, a, b, scores_a, scores_b, keys)


def _columns(table: Any, what: str) -> Mapping[str, Any]:
    if hasattr(table, "to_table"):
        return table.to_table()
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # a pandas DataFrame
        return {name: table[name].to_numpy() for name in table.columns}
    if isinstance(table, Mapping):
        return table
    raise InputError(f"circuit_overlap: {what} must be a patching result, a DataFrame or a mapping of columns, got {type(table).__name__}")


def _circuit(columns: Mapping[str, Any], keys: tuple[str, ...], score: str, top: int | None, threshold: float | None,
             what: str) -> tuple[tuple[tuple, ...], dict[tuple, float]]:
    if score not in columns:
        raise InputError(f"circuit_overlap: {what} has no '{score}' column; it has {', '.join(columns)}")
    values = np.asarray(columns[score], dtype=np.float64)
    rows = list(zip(*(np.asarray(columns[k]).tolist() for k in keys)))
    strength = np.abs(np.nan_to_num(values, nan=0.0))
    order = np.argsort(-strength, kind="stable")
    chosen = order[:top] if top is not None else [i for i in order if strength[i] >= threshold]
    circuit = tuple(rows[i] for i in chosen)
    return circuit, {rows[i]: float(values[i]) for i in chosen}


__all__ = ["CircuitOverlap", "circuit_overlap"]
