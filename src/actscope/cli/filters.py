"""``actscope filters``: the 3×3 filter statistics of a CNN (CNN Filter DB), or how two models' differ."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from .common import (
    DEVICE, DEVICE_MAP, DOWNLOAD, DTYPE, MODEL_HELP, REVISION, TRUST_REMOTE_CODE, console, friendly_errors, load_model, quiet_libraries,
)


def filters(
    model_dir: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP + " (with 3×3 convolutions)."),
    compare: Optional[str] = typer.Option(None, "--compare", help="A second model: print the KL divergence between its filters and MODEL's."),
    device: Optional[str] = DEVICE,
    dtype: Optional[str] = DTYPE,
    device_map: Optional[str] = DEVICE_MAP,
    revision: Optional[str] = REVISION,
    download: bool = DOWNLOAD,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
) -> None:
    """Per 3×3 conv layer: filters, sparsity, variance entropy, principal components' shares (and KL to --compare)."""
    quiet_libraries(download)
    with friendly_errors():
        from actscope.metrics.filters import filter_stats, pooled_divergence

        options = dict(device=device, dtype=dtype, device_map=device_map, revision=revision, download=download, trust_remote_code=trust_remote_code)
        stats = filter_stats(load_model(model_dir, **options))
        table = Table(title=f"3×3 filters · {model_dir}", title_justify="left")
        for column in ("layer", "filters", "sparsity", "variance entropy", "PC1", "PC2", "PC3"):
            table.add_column(column, justify="left" if column == "layer" else "right", overflow="fold")
        for row in range(len(stats.layer)):
            shares = [f"{stats.explained[row, j]:.3f}" for j in range(3)]
            table.add_row(str(stats.layer[row]), str(stats.filters[row]), f"{stats.sparsity[row]:.3f}", f"{stats.variance_entropy[row]:.3f}", *shares)
        console.print(table)
        if compare is not None:
            other = filter_stats(load_model(compare, **options))
            console.print(f"KL(MODEL ‖ --compare) = {pooled_divergence(stats, other):.4f} · KL(--compare ‖ MODEL) = {pooled_divergence(other, stats):.4f} "
                          "(all 3×3 filters of each pooled; docs/vision.md)")
