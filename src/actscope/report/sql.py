"""SQL over a run: each Parquet table of the run is a DuckDB view under its run name."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class QueryResult:
    """The first rows of a query's result; ``more`` is True when rows were left out."""

    columns: tuple[str, ...]
    rows: list[tuple]
    more: bool

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(self.columns))


def query_run(run_dir: str | os.PathLike, sql: str, max_rows: int | None = None) -> QueryResult:
    """Run DuckDB ``sql`` over the tables of the run at ``run_dir`` (views named as in the run:
    ``neurons``, ``layers``, ``heads``, ``examples``, …). At most ``max_rows`` rows are kept."""
    import duckdb

    from ..errors import InputError
    from ..store import read_run

    root = Path(run_dir)
    names = list(read_run(root).manifest.get("tables", []))  # validates the run (RunDirError → exit 2)
    if max_rows is not None and max_rows < 1:
        raise InputError(f"--max-rows must be at least 1, got {max_rows}")
    con = duckdb.connect()
    try:
        for name in names:
            path = str(root / f"{name}.parquet").replace("'", "''")  # a view cannot take a parameter
            con.execute(f"CREATE VIEW {_quoted(name)} AS SELECT * FROM read_parquet('{path}')")
        try:
            cursor = con.execute(sql)
            if cursor.description is None:  # a statement without a result (e.g. SET)
                return QueryResult((), [], False)
            columns = tuple(d[0] for d in cursor.description)
            rows = cursor.fetchall() if max_rows is None else cursor.fetchmany(max_rows + 1)
        except duckdb.Error as error:
            raise InputError(f"the SQL failed: {error}\nTables in this run: {', '.join(names) or 'none'} "
                             f"(e.g. SELECT * FROM layers LIMIT 5)") from None
    finally:
        con.close()
    more = max_rows is not None and len(rows) > max_rows
    return QueryResult(columns, rows[:max_rows] if more else rows, more)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
