"""``actscope train-sae``: train a small sparse autoencoder (ReLU + L1, or top-k) on one site's
activations, streamed from the model or read from a harvested dataset, and save it in the SAELens
layout; ``actscope profile --sae DIR`` then profiles its features."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .common import MODEL_HELP, ModelOptions, console, friendly_errors, model_options, styled


SAE_HELP = ("A sparse autoencoder or transcoder whose features become a site (repeatable): a SAELens folder (cfg.json + "
            "sae_weights.safetensors), DIR@SITE to say where it reads, NAME=DIR to tell two on one site apart; its features are SITE.sae.")


def attach_saes(model, specs: Optional[List[str]]) -> list[str]:
    """Attach each ``--sae`` to ``model``; the feature sites, in order."""
    from actscope.sae import attach
    from actscope.sae.files import load_spec

    return [attach(model, load_spec(spec)) for spec in specs or []]


@model_options
def train_sae(
    model_dir: Optional[str] = typer.Argument(None, metavar="MODEL", help=MODEL_HELP + " (default: the embedded MiniLM)."),
    site: Optional[str] = typer.Option(None, "--site", "-s", help="The site whose activations the SAE reconstructs, e.g. 'blocks.3.resid.post' (with --activations: one of its sites)."),
    out: Path = typer.Option(..., "--out", "-o", help="SAE folder to write (cfg.json + sae_weights.safetensors, the SAELens layout)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Text, .jsonl, .csv, .tsv, .parquet or a saved HF dataset to run the model on (default: built-in corpus)."),
    activations: Optional[Path] = typer.Option(None, "--activations", help="Train on an activation dataset `actscope harvest` wrote instead of running the model."),
    column: Optional[str] = typer.Option(None, "--column", help="Text column of a table-shaped data file."),
    architecture: str = typer.Option("standard", "--architecture", help="standard (ReLU + L1) or topk."),
    d_sae: Optional[int] = typer.Option(None, "--d-sae", help="Features (default: --expansion × the site's width)."),
    expansion: int = typer.Option(8, "--expansion", help="Features per input dimension when --d-sae is not given."),
    k: int = typer.Option(32, "--k", help="Features kept per token (topk)."),
    l1: float = typer.Option(5.0, "--l1", help="L1 coefficient (standard), on inputs scaled to mean norm √d_in."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    steps: int = typer.Option(2000, "--steps", help="Training steps."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Tokens per training step."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation and the shuffling (the same seed, the same SAE)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Use at most this many real tokens of the data per epoch."),
    max_length: int = typer.Option(128, "--max-length", help="Truncate documents to this many tokens."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an SAE actscope wrote at --out."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Train a sparse autoencoder on one site's activations and save it in the SAELens layout."""
    with friendly_errors():
        import actscope
        from actscope.sae.save import check_target

        check_target(out, overwrite)  # before any work
        model = None
        if activations is None or model_dir is not None:
            model = options.load(model_dir)
        corpus = None
        if activations is None:
            from actscope.data import load_corpus

            corpus = load_corpus(data, column=column)
        with _bar(steps) as advance:
            trained = actscope.train_sae(model, corpus, site=site, activations=activations, d_sae=d_sae, expansion=expansion,
                                         architecture=architecture, k=k, l1=l1, lr=lr, steps=steps, batch_size=batch_size, seed=seed,
                                         out=out, overwrite=overwrite, max_tokens=max_tokens, max_length=max_length, progress=advance)
        _summary(trained)


class _bar:
    def __init__(self, steps: int) -> None:
        self.bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps · loss {task.fields[loss]:.4g}"),
                            TimeElapsedColumn(), console=console)
        self.task = self.bar.add_task("train", total=steps, loss=float("nan"))

    def __enter__(self):
        self.bar.__enter__()
        return lambda step, steps, loss: self.bar.update(self.task, completed=step, loss=loss)

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)


def _summary(trained) -> None:
    sae = trained.sae
    console.print(f"{sae.architecture} SAE at {sae.site}: d_in {sae.d_in} → d_sae {sae.d_sae}; {trained.tokens:,} training tokens "
                  f"in {trained.seconds:.1f} s", highlight=False, soft_wrap=True)
    console.print(f"loss {trained.loss[0]:.4g} → {trained.loss[-1]:.4g}; last batch: explained variance "
                  f"{trained.explained_variance[-1]:.3f}, L0 {trained.l0[-1]:.1f}", highlight=False)
    console.print(styled("SAE: ", (str(trained.path), "bold"), "  (profile it: actscope profile MODEL --sae ", str(trained.path), ")"),
                  highlight=False, soft_wrap=True)
