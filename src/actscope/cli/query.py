"""``actscope query``: DuckDB SQL over a run's Parquet tables, printed as a table."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import console, friendly_errors, quiet_libraries


def query(
    run_dir: Path = typer.Argument(..., help="Run directory written by `actscope profile --out`."),
    sql: str = typer.Argument(..., help="SQL over the run's tables, e.g. \"SELECT site, dead_units FROM layers\"."),
    max_rows: int = typer.Option(100, "--max-rows", "-n", help="Print at most this many rows."),
) -> None:
    """Run DuckDB SQL over the run's tables (neurons, layers, heads, examples, …: each under its own name)."""
    quiet_libraries()
    with friendly_errors():
        from actscope.report.sql import query_run

        result = query_run(run_dir, sql, max_rows=max_rows)
        table = Table(show_lines=False, title_justify="left")
        for i, name in enumerate(result.columns):
            numeric = all(isinstance(row[i], (int, float)) for row in result.rows if row[i] is not None)
            table.add_column(name, overflow="fold", justify="right" if numeric and result.rows else "left")
        for row in result.rows:
            table.add_row(*(_cell(v) for v in row))  # the console reads no markup: data-set text prints as written
        console.print(table)
        shown = f"{len(result.rows)} row{'s' if len(result.rows) != 1 else ''}"
        console.print(f"{shown} (more rows left out; raise --max-rows)" if result.more else shown, highlight=False)


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
