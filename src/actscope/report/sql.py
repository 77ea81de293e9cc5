"""SQL over a run: :func:`query_run` runs DuckDB SQL over the run's tables, each a view under
its run name, in a connection that can reach nothing else."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Set when the connection opens, before any SQL runs. The tables reach DuckDB as Arrow tables
# already in memory, so no path needs to stay readable: allowing the table files instead
# (allowed_paths) would also let COPY ... TO overwrite them.
_LOCKED = {
    "enable_external_access": False,  # no file, URL, ATTACH of a file, INSTALL or LOAD
    "autoinstall_known_extensions": False,  # never download an extension (httpfs for a URL)
    "autoload_known_extensions": False,
    "python_enable_replacements": False,  # a name in the SQL never finds a Python object
    "temp_directory": "",  # no spill files; DuckDB also allows SQL to write where it spills
    "lock_configuration": True,  # SET / RESET cannot undo any of the above
}
_REFUSED = ("reads only the run's tables, by name ({tables}); it cannot read other files, "
            "write files, attach databases, load extensions or change settings")


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
    ``neurons``, ``layers``, ``heads``, ``examples``, …). At most ``max_rows`` rows are kept.

    The SQL sees the run's tables and nothing else: it cannot read any file by path (not even
    the run's own files, so that one rule covers symlinks and ``..``), write files, attach a
    database file, install or load extensions, reach the network or change DuckDB settings.
    Such a statement raises InputError saying so; so does any other failing SQL."""
    import duckdb

    from ..errors import InputError
    from ..store import read_run

    tables = read_run(Path(run_dir)).tables  # validates the run (RunDirError → exit 2)
    if max_rows is not None and max_rows < 1:
        raise InputError(f"--max-rows must be at least 1, got {max_rows}")
    con = duckdb.connect(config=_LOCKED)
    try:
        for name, table in tables.items():
            con.register(name, table)
        try:
            cursor = con.execute(sql)
            if cursor.description is None:  # a statement without a result (e.g. CREATE VIEW)
                return QueryResult((), [], False)
            columns = tuple(d[0] for d in cursor.description)
            rows = cursor.fetchall() if max_rows is None else cursor.fetchmany(max_rows + 1)
        except duckdb.Error as error:
            raise InputError(_failure(error, list(tables))) from None
    finally:
        con.close()
    more = max_rows is not None and len(rows) > max_rows
    return QueryResult(columns, rows[:max_rows] if more else rows, more)


def _failure(error: Exception, names: list[str]) -> str:
    import duckdb

    listed = ", ".join(names) or "none"
    if isinstance(error, duckdb.PermissionException) or "configuration has been locked" in str(error):
        reason = str(error).splitlines()[0]  # DuckDB's words name the file or setting
        return (f"actscope query refused this SQL ({reason}): it {_REFUSED.format(tables=listed)}. "
                "To save a result, call actscope.report.query_run(run_dir, sql).to_pandas() in Python")
    return f"the SQL failed: {error}\nTables in this run: {listed} (e.g. SELECT * FROM layers LIMIT 5)"
