"""``actscope examples``: a run's top-activating examples of chosen units, token highlighted."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .common import console, friendly_errors, quiet_libraries


def examples(
    run_dir: Path = typer.Argument(..., help="Run directory written by `actscope profile --out`."),
    site: str = typer.Option(..., "--site", "-s", help="Site as profiled, a glob, and units: 'blocks.3.mlp.post[17]'."),
    unit: Optional[List[int]] = typer.Option(None, "--unit", "-u", help="Unit index (repeat for several)."),
    top: Optional[int] = typer.Option(None, "--top", help="Examples per unit (default: all the run kept)."),
    limit: int = typer.Option(50, "--limit", help="Rows printed at most."),
    sheet: Optional[Path] = typer.Option(None, "--sheet", help="Runs fed images: also write a contact sheet PNG here (one row per unit, its top images left to right)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a contact sheet actscope wrote at --sheet."),
) -> None:
    """Print the top-activating tokens of units in their context, the token highlighted."""
    quiet_libraries()
    with friendly_errors():
        from actscope.explain.examples import top_examples

        shown = top_examples(run_dir, site, unit, top=top)
        if sheet is not None:
            _write_sheet(run_dir, shown, sheet, overwrite)
        table = Table(title=f"top-activating examples · {site}", title_justify="left")
        for column in ("site", "unit", "rank", "value", "doc", "context"):
            table.add_column(column, justify="right" if column in ("unit", "rank", "value", "doc") else "left", overflow="fold")
        for row in range(min(limit, len(shown.unit))):
            table.add_row(shown.site[row], str(shown.unit[row]), str(shown.rank[row]), f"{shown.value[row]:.4g}", str(shown.doc[row]), shown.rich_text(row))
        console.print(table)
        if len(shown.unit) > limit:
            console.print(f"… {len(shown.unit) - limit} more rows (raise --limit)")


def _write_sheet(run_dir: Path, shown, sheet: Path, overwrite: bool) -> None:
    """The contact sheet of the shown rows: the run's thumbnails of those (site, unit, rank)."""
    import actscope
    from actscope.explain.image_examples import contact_sheet, write_png

    run = actscope.open_run(run_dir)
    if "images" not in run.tables:
        raise actscope.InputError("this run has no images table (it was not fed images), so there is no contact sheet; drop --sheet")
    table = run.tables["images"].to_pydict()
    index = {(s, u, r): i for i, (s, u, r) in enumerate(zip(table["site"], table["unit"], table["rank"]))}
    rows = [index[key] for key in zip(shown.site, shown.unit.tolist(), shown.rank.tolist()) if key in index]
    picked = {name: [table[name][i] for i in rows] for name in ("site", "unit", "png")}
    path = write_png(sheet, contact_sheet(picked), overwrite=overwrite)
    console.print(f"Contact sheet: {path} ({len(rows)} images)")
