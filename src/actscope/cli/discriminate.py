"""``actscope discriminate``: the most discriminative stimuli of a vision model's site (Burg et al. 2024):
its units clustered by the k stimuli that tell the clusters apart, the stimuli side by side as one PNG."""
from __future__ import annotations

from pathlib import Path

import typer

from .common import MODEL_HELP, ModelOptions, console, friendly_errors, model_options

SHOWN_UNITS = 6  # unit indices listed per cluster


@model_options
def discriminate(
    model_dir: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP + " (a vision model)."),
    site: str = typer.Option(..., "--site", "-s", help="The site whose units are clustered, e.g. blocks.3.mlp.post or module:layer1.0.conv2@output."),
    data: Path = typer.Option(..., "--data", "-d", help="Images (folder, .npy, saved data set): standardise the responses and start k-means."),
    k: int = typer.Option(4, "--k", "-k", help="Clusters, one stimulus each (at least 2)."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write: the k stimuli left to right, cluster 0 first."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a PNG actscope wrote at --out."),
    rounds: int = typer.Option(4, "--rounds", help="EM rounds at most (optimise the stimuli, reassign the units); stops early when no unit moves."),
    steps: int = typer.Option(128, "--steps", help="Optimisation steps per round."),
    seed: int = typer.Option(0, "--seed", help="Seed of k-means, the start and the random transformations (same seed, same stimuli)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature over the stimuli in the objective."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Most discriminative stimuli: cluster a site's units by k optimised images that tell the clusters apart; the images as one PNG."""
    with friendly_errors():
        from actscope.errors import InputError
        from actscope.explain.image_examples import png_target, side_by_side, write_png
        from actscope.explain.mds import discriminative_stimuli
        from actscope.explain.visualize import VisConfig
        from actscope.feeding import images_for

        if k < 2:
            raise InputError(f"--k must be at least 2 (clusters to tell apart), got {k}; pass --k 2 or more")
        if rounds < 1:
            raise InputError(f"--rounds must be at least 1, got {rounds}")
        config = VisConfig(steps=steps, seed=seed).checked()
        png_target(out, overwrite=overwrite)  # refused before any optimisation; checked again when written
        model = options.load(model_dir)
        found = discriminative_stimuli(model, site, images_for(model, data), k=k, rounds=rounds, temperature=temperature, config=config)
        path = write_png(out, side_by_side(list(found.images)), overwrite=overwrite)
        console.print(_table(site, found))
        console.print(f"units moved per round: {', '.join(map(str, found.moved))} "
                      + ("(converged: none moved in the last)" if found.moved[-1] == 0 else f"(stopped after --rounds {rounds})"))
        console.print(f"stimuli left to right, cluster 0 first · {path}")


def cluster_rows(found) -> list[tuple[int, list[int], float | None, float | None, int | None]]:
    """Per cluster c: (c, its units, their mean standardised response to stimulus c, the largest mean
    response of those units to another stimulus, which one); the means are None for an empty cluster."""
    import numpy as np

    rows = []
    for c in range(found.responses.shape[1]):
        units = np.flatnonzero(found.clusters == c)
        if not len(units):
            rows.append((c, [], None, None, None))
            continue
        means = found.responses[units].mean(0)  # [k]: the cluster's mean response to each stimulus
        others = np.delete(np.arange(len(means)), c)
        best = int(others[means[others].argmax()])
        rows.append((c, units.tolist(), float(means[c]), float(means[best]), best))
    return rows


def _table(site: str, found):
    from rich.table import Table

    table = Table(title=f"most discriminative stimuli · {site}", title_justify="left", caption_justify="left",
                  caption="own stimulus, best other: the mean standardised response of the cluster's units to its stimulus, "
                          "and to the other stimulus they respond to most (of cluster 'other')")
    for column in ("cluster", "units", "unit indices", "own stimulus", "best other", "other"):
        table.add_column(column, justify="left" if column == "unit indices" else "right", overflow="fold")
    for c, units, own, other, which in cluster_rows(found):
        shown = ", ".join(map(str, units[:SHOWN_UNITS])) + (", …" if len(units) > SHOWN_UNITS else "")
        numbers = ("—", "—", "—") if own is None else (f"{own:.3f}", f"{other:.3f}", str(which))
        table.add_row(str(c), str(len(units)), shown or "—", *numbers)
    return table
