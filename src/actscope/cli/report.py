"""``actscope report``: write the offline HTML report (charts + neuron browser) of a run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .common import console, friendly_errors, quiet_libraries


def report(
    run_dir: Path = typer.Argument(..., help="Run directory written by `actscope profile --out`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default: RUN_DIR/report.html)."),
) -> None:
    """Write one self-contained HTML report of a run; open it in any browser, no server or network needed."""
    quiet_libraries()
    with friendly_errors():
        from actscope.report import write_report
        from actscope.run import open_run

        path = write_report(open_run(run_dir), out)
        console.print(f"Report: [bold]{escape(str(path))}[/] ({path.stat().st_size / 1e6:.1f} MB)", highlight=False, soft_wrap=True)
