"""``actscope report``: write the offline HTML report (charts + neuron browser) of a run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, friendly_errors, quiet_libraries, styled


def report(
    run_dir: Path = typer.Argument(..., help="Run directory written by `actscope profile --out`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default: RUN_DIR/report.html)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing report at --out (only one actscope wrote; "
                                                              "RUN_DIR/report.html is always rewritten)."),
) -> None:
    """Write one self-contained HTML report of a run; open it in any browser, no server or network needed."""
    quiet_libraries()
    with friendly_errors():
        from actscope.report import write_report
        from actscope.run import open_run

        path = write_report(open_run(run_dir), out, overwrite=overwrite)
        # the console reads no markup (cli/common.py): the path prints as written
        console.print(styled("Report: ", (str(path), "bold"), f" ({path.stat().st_size / 1e6:.1f} MB)"), highlight=False, soft_wrap=True)
