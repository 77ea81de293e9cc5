"""``actscope filters``: the 3×3 filter statistics of a CNN (CNN Filter DB), or how two models' differ."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from .common import MODEL_HELP, ModelOptions, console, friendly_errors, model_options


@model_options
def filters(
    model_dir: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP + " (with 3×3 convolutions)."),
    compare: Optional[str] = typer.Option(None, "--compare", help="A second model: print the KL divergence between its filters and MODEL's."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Per 3×3 conv layer: filters, sparsity, variance entropy, principal components' shares (and KL to --compare)."""
    with friendly_errors():
        from actscope.metrics.filters import filter_stats, pooled_divergence

        stats = filter_stats(options.load(model_dir))
        table = Table(title=f"3×3 filters · {model_dir}", title_justify="left")
        for column in ("layer", "filters", "sparsity", "variance entropy", "PC1", "PC2", "PC3"):
            table.add_column(column, justify="left" if column == "layer" else "right", overflow="fold")
        for row in range(len(stats.layer)):
            shares = [f"{stats.explained[row, j]:.3f}" for j in range(3)]
            table.add_row(str(stats.layer[row]), str(stats.filters[row]), f"{stats.sparsity[row]:.3f}", f"{stats.variance_entropy[row]:.3f}", *shares)
        console.print(table)
        if compare is not None:
            other = filter_stats(options.load(compare))
            console.print(f"KL(MODEL ‖ --compare) = {pooled_divergence(stats, other):.4f} · KL(--compare ‖ MODEL) = {pooled_divergence(other, stats):.4f} "
                          "(all 3×3 filters of each pooled; docs/vision.md)")
