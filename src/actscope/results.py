"""What every measurement returns: a frozen result that is also a table.

A result class is a frozen dataclass that mixes in :class:`TableResult` and implements
``to_table()`` (plain columns: one row per unit, layer, head, … as the measurement dictates).
``to_pandas()`` and the notebook view come from that one method, and a run directory stores
the same columns as ``<table_name>.parquet``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np


class TableResult:
    """Mixin for frozen result dataclasses: ``to_table`` → pandas, HTML, Parquet."""

    table_name: ClassVar[str] = "result"

    def to_table(self) -> dict[str, np.ndarray]:  # pragma: no cover - every result defines it
        raise NotImplementedError

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.to_table())

    def _repr_html_(self) -> str:
        return f"<b>{type(self).__name__}</b>" + self.to_pandas().to_html(max_rows=20)
