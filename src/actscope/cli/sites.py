"""``actscope sites``: list what a model offers to observe, with shapes."""
from __future__ import annotations

from fnmatch import fnmatch
from typing import Optional

import typer
from rich.table import Table

from .common import MODEL_HELP, ModelOptions, console, friendly_errors, model_options


@model_options
def sites(
    model_dir: Optional[str] = typer.Argument(None, metavar="MODEL", help=MODEL_HELP + " (default: the embedded MiniLM)."),
    match: Optional[str] = typer.Option(None, "--match", "-m", help="Only sites whose name matches this glob, e.g. 'blocks.0.*'."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """List the canonical sites of a model (or its modules, for models without a table)."""
    with friendly_errors():
        model = options.load(model_dir)
        rows = [s for s in model.sites() if match is None or fnmatch(s.name, match)]
        table = Table(title=f"{model.name}: {len(rows)} sites", title_justify="left")
        table.add_column("site", no_wrap=True)
        table.add_column("shape", no_wrap=True)
        table.add_column("at", no_wrap=True)
        named = any(not row.name.startswith("module:") for row in rows)  # module sites carry their path already
        if named:
            table.add_column("module", overflow="fold")
        for row in rows:
            shape = "[" + ", ".join(map(str, row.shape)) + "]" if row.shape else "?"
            table.add_row(row.name, shape, row.at, *([row.module] if named else []))
        console.print(table)
        if model.adapter is None:
            example = next((row.name for row in rows if ".0." in row.name), None)
            pattern = f", several at once with * (e.g. {example.replace('.0.', '.*.', 1)})" if example else ""
            console.print(f"No adapter table for this family: select sites as module:PATH@output or @input{pattern}.")
