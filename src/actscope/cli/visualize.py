"""``actscope visualize``: an image that maximises a unit or channel of a vision model (or one per facet)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import MODEL_HELP, ModelOptions, console, friendly_errors, model_options


@model_options
def visualize(
    model_dir: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP + " (a vision model)."),
    site: str = typer.Option(..., "--site", "-s", help="The site, e.g. blocks.3.mlp.post or module:layer1.0.conv2@output."),
    unit: int = typer.Option(..., "--unit", "-u", help="Channel (conv) or neuron index."),
    kind: str = typer.Option("channel", "--kind", help="channel (mean over positions) or unit (the centre position)."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write (facets side by side with --facets)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a PNG actscope wrote at --out."),
    steps: int = typer.Option(256, "--steps", help="Optimisation steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of the start and the random transformations (same seed, same image)."),
    size: Optional[int] = typer.Option(None, "--size", help="Image side in pixels (default: the model's image size)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Images (folder, .npy, saved data set): give facets, sizes and colours."),
    facets: int = typer.Option(0, "--facets", help="Multifaceted: cluster the top images of --data into this many facets, one image each."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Optimise an image (decorrelated Fourier parameterisation, jitter, scale, rotation, total variation) to maximise a unit."""
    with friendly_errors():
        from actscope.data.images import preprocess_from
        from actscope.errors import InputError
        from actscope.explain import visualize as vis
        from actscope.explain.image_examples import png_target, side_by_side, write_png
        from actscope.feeding import images_for

        png_target(out, overwrite=overwrite)  # refused before any optimisation; checked again when written
        model = options.load(model_dir)
        config, target = vis.VisConfig(steps=steps, seed=seed), vis.Target(site, kind, unit)
        if facets and data is None:
            raise InputError("--facets clusters the top images of a data set; pass --data too")
        if data is not None:
            images = images_for(model, data)
            if facets:
                found = vis.facets(model, target, images, k=facets, top=min(len(images), max(facets * 20, 60)), config=config)
                pictures, values = [v.image for v in found.images], [v.value for v in found.images]
            else:
                pre = images.preprocess
                shown = vis.visualize(model, target, shape=tuple(images.pixels.shape[1:]), mean=pre.mean, std=pre.std, config=config,
                                      colour=vis.colour_matrix(images.pixels))
                pictures, values = [shown.image], [shown.value]
        else:
            pre = preprocess_from(model.source)
            side = size or getattr(model.config, "image_size", None)
            channels = getattr(model.config, "num_channels", None)
            if not side or not channels:
                raise InputError("the model does not say its image size and channels; pass --size, or --data with images")
            shown = vis.visualize(model, target, shape=(channels, side, side), mean=pre.get("mean", (0.0,)), std=pre.get("std", (1.0,)), config=config)
            pictures, values = [shown.image], [shown.value]
        path = write_png(out, side_by_side(pictures), overwrite=overwrite)
        console.print(f"{site} {kind} {unit}: objective " + ", ".join(f"{v:.4g}" for v in values) + f" · {path}")
