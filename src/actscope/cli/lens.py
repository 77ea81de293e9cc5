"""``actscope lens``: the tokens each layer would predict at every position of a prompt (logit
lens; with ``--tuned``, a tuned lens fitted here on ``--data``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import MODEL_HELP, ModelOptions, console, friendly_errors, model_options


@model_options
def lens(
    model_dir: Optional[str] = typer.Argument(None, metavar="MODEL", help=MODEL_HELP + " (default: the embedded MiniLM)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text to read layer by layer."),
    top: int = typer.Option(5, "--top", help="Tokens kept per layer and position."),
    tuned: bool = typer.Option(False, "--tuned", help="Also fit a tuned lens (an affine translator per layer) on --data."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Text to fit the tuned lens on (default: the built-in corpus); the last fifth is held out."),
    steps: int = typer.Option(100, "--steps", help="Adam steps after the closed-form start of the tuned lens."),
    seed: int = typer.Option(0, "--seed", help="Seed of the tuned lens's minibatches: the same seed and data give the same lens."),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="Tokens of --data the tuned lens is fitted on (and at most as many held out)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory: the lens grid goes into its report (a run of the same model, or a new one)."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Print the top token of every layer at every position (logit lens, optionally tuned)."""
    with friendly_errors():
        from actscope.explain.lens import fit_tuned_lens, logit_lens

        model = options.load(model_dir)
        model.module.eval()
        results = [logit_lens(model, prompt, top=top)]
        fitted = None
        if tuned:
            fitted = fit_tuned_lens(model, str(data) if data is not None else None, seed=seed, steps=steps, max_tokens=max_tokens)
            results.append(logit_lens(model, prompt, top=top, lens=fitted))
        for result in results:
            _print_grid(result)
        if fitted is not None:
            _print_kl(fitted)
        if out is not None:
            import numpy as np

            from .saving import save_tables

            tables = {"lens": {key: np.concatenate([r.to_table()[key] for r in results]) for key in results[0].to_table()}}
            if fitted is not None:
                tables["lens_kl"] = {"layer": np.arange(len(fitted.held_out["logit"])), "logit": np.array(fitted.held_out["logit"]),
                                     "tuned": np.array(fitted.held_out["tuned"])}
            save_tables(model, out, "lens", {"prompt": prompt, "top": top, "tuned": tuned, "seed": seed, "steps": steps,
                                             "data": str(data) if data is not None else "builtin"}, tables)


def _print_grid(result) -> None:
    """Positions down, layers across (prompts are longer than models are deep)."""
    grid = result.grid()
    table = Table(title=f"{result.kind} lens: the most likely token (probability) per position (rows) and layer (columns)",
                  title_justify="left")
    table.add_column("position", justify="right")
    table.add_column("token", overflow="fold")
    for layer in range(len(grid)):
        table.add_column(f"layer {layer}", overflow="fold")
    probs = {(l, p): pr for l, p, r, pr in zip(result.layer.tolist(), result.position.tolist(), result.rank.tolist(), result.prob.tolist()) if r == 0}
    for position, token in enumerate(result.inputs):
        cells = [f"{repr(grid[layer][position])[1:-1]} {probs[(layer, position)]:.2f}" for layer in range(len(grid))]
        table.add_row(str(position), repr(token)[1:-1], *cells)
    console.print(table)


def _print_kl(fitted) -> None:
    table = Table(title=f"KL from the final distribution on held-out text (nats, mean over tokens; fitted on {fitted.tokens} tokens)",
                  title_justify="left")
    for column in ("layer", "logit lens", "tuned lens"):
        table.add_column(column, justify="right")
    for layer, (logit, tuned) in enumerate(zip(fitted.held_out["logit"], fitted.held_out["tuned"])):
        table.add_row(str(layer), f"{logit:.3f}", f"{tuned:.3f}")
    console.print(table)
