"""``actscope encode``: encoding models — how well each site of one or more models predicts
recorded responses (cross-validated ridge R² per channel, with the noise ceiling when the
responses hold repeats), ranked, printed and written into a run."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .common import MODEL_HELP, ModelOptions, console, friendly_errors, model_options, styled

SHOWN = 20  # rows of the ranking printed (the run holds all)


@model_options
def encode(
    models: List[str] = typer.Argument(..., metavar="MODEL...", help=MODEL_HELP + "; several models (e.g. one per training objective) are ranked together."),
    stimuli: Path = typer.Option(..., "--stimuli", help="The stimuli, one document each, in the order of the responses' rows: text (one per line), .jsonl, .csv, .tsv, .parquet or a saved HF dataset."),
    responses: Path = typer.Option(..., "--responses", help="Recorded responses: .npy/.npz (stimuli × channels, or repeats × stimuli × channels), or .csv/.parquet (numeric columns are channels; optional 'stimulus' and 'repeat' columns)."),
    column: Optional[str] = typer.Option(None, "--column", help="Text column of a table-shaped stimuli file."),
    sites: str = typer.Option("blocks.*.resid.post", "--sites", "-s", help="Sites of every model, e.g. 'blocks.*.mlp.post'."),
    pool: str = typer.Option("mean", "--pool", help="One row per stimulus: mean over its tokens, or its last token."),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds (shuffled k-fold, the same folds for every model and site)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the folds' shuffle."),
    alphas: str = typer.Option("1e-2,1e-1,1,10,1e2,1e3,1e4,1e5,1e6", "--alphas", help="Ridge penalties to choose from per channel (comma-separated), by leave-one-out error on each training fold."),
    standardize: bool = typer.Option(True, "--standardize/--no-standardize", help="z-score the features with the training fold's mean and sd."),
    batch_size: int = typer.Option(8, "--batch-size", help="Stimuli per forward pass."),
    max_length: int = typer.Option(128, "--max-length", help="Truncate stimuli to this many tokens."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to write (encoding.parquet, encoding_channels.parquet, report.html)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run at --out."),
    report: bool = typer.Option(True, "--report/--no-report", help="With --out, write RUN_DIR/report.html."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Encoding models: which model and which site predict the recorded responses best."""
    with friendly_errors():
        from actscope.data import load_corpus
        from actscope.errors import InputError
        from actscope.metrics.encoding import encoding_scores, load_responses

        grid = parse_alphas(alphas)
        if pool not in ("mean", "last"):
            raise InputError(f"--pool must be mean or last (one row per stimulus), got {pool!r}")
        target = load_responses(responses)  # read and checked before any model is loaded
        corpus = load_corpus(stimuli, column=column)
        if len(corpus) != target.stimuli:
            raise InputError(f"{stimuli} holds {len(corpus)} stimuli (non-empty documents) and {responses} {target.stimuli} rows; "
                             "give one stimulus per row of the responses, in the same order (blank lines are not stimuli)")
        if out is not None:
            from actscope.store.writer import check_target

            check_target(out, overwrite)  # refuse before the forward passes
        loaded = [options.load(source) for source in models]
        named = dict(zip(unique_names([m.name for m in loaded]), loaded))
        from actscope.store import now_iso

        started, clock = now_iso(), time.perf_counter()
        scores = encoding_scores(named, corpus, target, sites, pool=pool, alphas=grid, folds=folds, seed=seed,
                                 standardize=standardize, batch_size=batch_size, max_length=max_length)
        seconds = time.perf_counter() - clock
        _print(scores, target)
        if out is not None:
            run = _write(out, overwrite, named, scores, corpus, target, responses,
                         dict(sites=sites, pool=pool, folds=folds, seed=seed, alphas=list(grid), standardize=standardize),
                         (started, seconds))
            console.print(styled("Run directory: ", (str(out), "bold")), highlight=False, soft_wrap=True)
            if report:
                from actscope.report import write_report

                console.print(styled("Report: ", (str(write_report(run)), "bold")), highlight=False, soft_wrap=True)


def parse_alphas(text: str) -> list[float]:
    """``"0.1,1,10"`` → penalties; anything else is an input error naming the form."""
    from actscope.errors import InputError

    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not v > 0 or v == float("inf") for v in values):
        raise InputError(f"--alphas must be positive numbers separated by commas (ridge penalties), e.g. 0.1,1,10; got {text!r}")
    return values


def unique_names(names: list[str]) -> list[str]:
    """Model names, a repeated one numbered (``m``, ``m (2)``)."""
    seen: dict[str, int] = {}
    found = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        found.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return found


def _print(scores, target) -> None:
    import numpy as np

    table = scores.to_table()
    normalized = "mean_normalized_r2" in table
    ceiling = target.noise_ceiling()
    title = (f"encoding models · {scores.stimuli} stimuli × {len(scores.channels)} channels · cross-validated ridge R²"
             + (f" · noise ceiling {np.nanmean(ceiling):.3f} (mean over channels)" if ceiling is not None else ""))
    shown = Table(title=title, title_justify="left")
    for name, justify in (("rank", "right"), ("model", "left"), ("site", "left"), ("mean R²", "right"), ("median R²", "right")):
        shown.add_column(name, justify=justify, no_wrap=True)
    if normalized:
        shown.add_column("R² / ceiling", justify="right")
    order = np.argsort(-np.nan_to_num(table["mean_r2"], nan=-np.inf), kind="stable")
    for rank, i in enumerate(order[:SHOWN], start=1):
        cells = [str(rank), str(table["model"][i]), str(table["site"][i]), f"{table['mean_r2'][i]:.3f}", f"{table['median_r2'][i]:.3f}"]
        if normalized:
            cells.append(f"{table['mean_normalized_r2'][i]:.3f}")
        shown.add_row(*cells)
    console.print(shown)
    if len(order) > SHOWN:
        console.print(f"… {len(order) - SHOWN} more (model, site) pairs in the run's encoding table", highlight=False)
    best = scores.best()
    console.print(styled("Best: ", (f"{best['model']} · {best['site']}", "bold"), f" (mean R² {best['r2']:.3f})"), highlight=False,
                  soft_wrap=True)


def _write(out: Path, overwrite: bool, named: dict, scores, corpus, target, responses: Path, config: dict, timing: tuple[str, float]):
    import actscope
    from actscope.store import library_versions, now_iso, weight_hash
    from actscope.store.writer import write_run

    described = [{"name": name, "source": model.source, "family": model.family, "weight_hash": weight_hash(model.module)}
                 for name, model in named.items()]
    first = described[0]
    manifest = {
        "kind": "encode",
        "created": now_iso(),
        "model": {"name": " vs ".join(d["name"] for d in described), "family": first["family"], "weight_hash": first["weight_hash"]},
        "models": described,
        "data": {"name": corpus.name, "source": corpus.source, "fingerprint": corpus.fingerprint, "documents": len(corpus)},
        "responses": {"source": str(responses), "stimuli": target.stimuli, "channels": len(target.channels),
                      "repeats": None if target.repeats is None else int(target.repeats.shape[0])},
        "plan": [{"site": site} for site in dict.fromkeys(site for _, site in scores.fits)],
        "config": config,
        "timings": {"started": timing[0], "seconds": round(timing[1], 3)},
        "versions": library_versions(),
    }
    tables = {scores.table_name: scores.to_table(), "encoding_channels": scores.channels_table()}
    write_run(out, manifest=manifest, tables=tables, overwrite=overwrite)
    return actscope.open_run(out)
