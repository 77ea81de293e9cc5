"""The offline HTML report of a run: one self-contained file with charts and a neuron browser.

``write_report(run_or_dir, out=None)`` writes it (default ``RUN_DIR/report.html``);
``render_report(run)`` returns the HTML text; ``query_run(run_dir, sql)`` runs DuckDB SQL over
the run's Parquet tables. numpy and pyarrow are the only heavy imports, done on first use.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPORT_NAME = "report.html"


def render_report(run: Any) -> str:
    """The report of ``run`` (a Run, or a run directory) as one HTML string."""
    from .data import page_payload
    from .html import page_html
    from .sections import build_sections

    run = _as_run(run)
    return page_html(run, build_sections(run), page_payload(run))


def write_report(run: Any, out: str | os.PathLike | None = None) -> Path:
    """Write the report of ``run`` to ``out`` (default: ``report.html`` in the run directory),
    atomically, and return its path."""
    from ..errors import InputError

    run = _as_run(run)
    if out is None:
        if run.path is None:
            raise InputError("this run was not saved, so the report has no default place; pass out='report.html'")
        out = Path(run.path) / REPORT_NAME
    target = Path(out)
    if target.is_dir():
        raise InputError(f"--out {target} is a directory; give a file name such as {target / REPORT_NAME}")
    if not target.parent.is_dir():
        raise InputError(f"cannot write the report to {target}: the folder {target.parent} does not exist; create it first")
    text = render_report(run)
    partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    partial.replace(target)  # a reader never sees half a report
    return target


def query_run(run_dir: str | os.PathLike, sql: str, max_rows: int | None = None) -> Any:
    """Run DuckDB ``sql`` over the run's tables; returns a pyarrow Table (see report/sql.py)."""
    from .sql import query_run as _query

    return _query(run_dir, sql, max_rows=max_rows)


def _as_run(run: Any) -> Any:
    from ..run import Run, open_run

    return run if isinstance(run, Run) else open_run(run)


__all__ = ["render_report", "write_report", "query_run", "REPORT_NAME"]
