"""The offline HTML report of a run: one self-contained file with charts and a neuron browser.

``write_report(run_or_dir, out=None, overwrite=False)`` writes it (default ``RUN_DIR/report.html``;
it replaces only a report actscope wrote);
``render_report(run)`` returns the HTML text; ``query_run(run_dir, sql)`` runs DuckDB SQL over
the run's Parquet tables. numpy and pyarrow are the only heavy imports, done on first use.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..store.writer import REPORT as REPORT_NAME  # the run's own report, part of the run
from ..store.writer import is_actscope_report



def render_report(run: Any) -> str:
    """The report of ``run`` (a Run, or a run directory) as one HTML string."""
    from .data import page_payload
    from .html import page_html
    from .page import build_sections

    run = _as_run(run)
    return page_html(run, build_sections(run), page_payload(run))


def write_report(run: Any, out: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
    """Write the report of ``run`` to ``out`` (default: ``report.html`` in the run directory),
    atomically, and return its path.

    A file already at ``out`` is replaced only when actscope wrote it (its marker, see html.py),
    and then only with ``overwrite``, except the run's own ``report.html``, which is part of the
    run and is always rewritten. A file of anyone else is never replaced, whatever ``overwrite``.
    """
    from ..store.files import atomic_file

    run = _as_run(run)
    target = _target(run, out)
    _check_target(target, overwrite=overwrite or _is_runs_own(run, target))
    data = render_report(run).encode("utf-8")
    with atomic_file(target, size_hint=len(data)) as partial:
        partial.write_bytes(data)  # a reader sees the old report or the new one, never half
    return target


def _target(run: Any, out: str | os.PathLike | None) -> Path:
    from ..errors import InputError

    if out is not None:
        return Path(out)
    if run.path is None:
        raise InputError("this run was not saved, so the report has no default place; pass out='report.html'")
    return Path(run.path) / REPORT_NAME


def _is_runs_own(run: Any, target: Path) -> bool:
    """Whether ``target`` is the run directory's own report (the default place)."""
    if run.path is None:
        return False
    # folders resolved (a linked run directory is the same run), the file name itself not followed
    return target.parent.resolve() / target.name == Path(run.path).resolve() / REPORT_NAME


def _check_target(target: Path, *, overwrite: bool) -> None:
    """Refuse, before the page is built, a target that is a folder, in a missing or unwritable
    folder, a file actscope did not write, or an actscope report without ``overwrite``."""
    from ..errors import InputError
    from ..store import files

    if target.is_dir():
        raise InputError(f"--out {target} is a directory; give a file name such as {target / REPORT_NAME}")
    if not target.parent.is_dir():
        raise InputError(f"cannot write the report to {target}: the folder {target.parent} does not exist; create it first")
    if target.is_symlink() or target.exists():
        if not is_actscope_report(target):
            raise InputError(f"{target} exists and was not written by actscope, so it is never replaced; "
                             "choose another --out or remove it yourself")
        if not overwrite:
            raise InputError(f"{target} is an actscope report already; pass --overwrite to replace it, or choose another --out")
    files.check_writable(target, "--out")


def query_run(run_dir: str | os.PathLike, sql: str, max_rows: int | None = None) -> Any:
    """Run DuckDB ``sql`` over the run's tables; returns a pyarrow Table (see report/sql.py)."""
    from .sql import query_run as _query

    return _query(run_dir, sql, max_rows=max_rows)


def _as_run(run: Any) -> Any:
    from ..run import Run, open_run

    return run if isinstance(run, Run) else open_run(run)


__all__ = ["render_report", "write_report", "query_run", "is_actscope_report", "REPORT_NAME"]
