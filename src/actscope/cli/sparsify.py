"""``actscope sparsify``: calibrate sparse MLP execution, save it, and report what it costs."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import MODEL_HELP, ModelOptions, console, friendly_errors, model_options

@model_options
def sparsify(
    model_dir: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP + ": a causal LM with its tokenizer."),
    data: Path = typer.Option(..., "--data", "-d", help="Calibration text: .txt, .jsonl, .csv, .tsv, .parquet or a saved dataset."),
    out: Path = typer.Option(..., "--out", "-o", help="Calibration file to write (.safetensors)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="cats | teal | cett | core (default: cett with --p, cats with --sparsity)."),
    p: Optional[float] = typer.Option(None, "--p", help="CETT: allowed perplexity increase in percent (1 = 1 %)."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="cats/teal/core: target sparsity in [0, 1)."),
    alpha: float = typer.Option(0.4, "--alpha", help="core: token-wise core fraction α."),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="teal: greedy (default: TEAL's search over the projections of each block) | uniform."),
    projections: Optional[str] = typer.Option(None, "--projections", help="teal: all (default: every linear layer of a block, attention ones included) | mlp."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Held-out text for the perplexity report (default: the last --held-out share of --data, not calibrated on)."),
    held_out: Optional[float] = typer.Option(None, "--held-out", help="Share of --data held out for the perplexity report when --eval-data is absent (default 0.2)."),
    column: Optional[str] = typer.Option(None, "--column", help="Text column of a table-shaped data file."),
    batch_size: int = typer.Option(8, "--batch-size", help="Documents per forward pass."),
    max_length: int = typer.Option(128, "--max-length", help="Truncate documents to this many tokens."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file at --out."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Calibrate what the MLP blocks may skip; print expected sparsity per layer and dense vs sparse perplexity."""
    with friendly_errors():
        from actscope.data import load_corpus
        from actscope.sparse import calibrate, evaluate
        from actscope.store.bound import check_target

        chosen = method or ("cett" if p is not None else "cats")
        check_target(out.expanduser(), overwrite, "--out", kind="sparse-calibration")  # a user's file, a folder, no write access: before the work
        calibration_docs, held_out_docs = _split(load_corpus(data, column=column).documents, eval_data, column, held_out)
        model = options.load(model_dir)
        model.module.eval()
        calibration = calibrate(model, list(calibration_docs), method=chosen, sparsity=sparsity,
                                p=None if p is None else p / 100, alpha=alpha, batch_size=batch_size, max_length=max_length,
                                allocation=allocation, projections=projections)
        calibration.save(out, overwrite=overwrite)
        _layers(calibration)
        _quality(evaluate(model, calibration, list(held_out_docs), batch_size=batch_size, max_length=max_length))
        console.print(f"wrote {out}")


def _split(documents: tuple[str, ...], eval_data: Optional[Path], column: Optional[str], held_out: Optional[float]) -> tuple:
    from actscope.data import load_corpus
    from actscope.feeding import HELD_OUT, split_held_out

    if eval_data is not None:
        return documents, load_corpus(eval_data, column=column).documents
    return split_held_out(documents, HELD_OUT if held_out is None else held_out)


SHORT_NAMES = {"expected_sparsity": "sparsity", "expected_weight_skipped": "weights skipped",
               "expected_in_sparsity": "in sparsity", "expected_down_sparsity": "down sparsity"}


def _layers(calibration) -> None:
    frame = calibration.to_pandas()
    if calibration.by_projection:  # per layer its totals; the projections get a table of their own
        _projections(calibration)
        frame = frame[[c for c in frame.columns if not c.startswith(("threshold_", "sparsity "))]]
    table = Table(title=f"{calibration.method} calibration of {calibration.model_name}: expected per layer", title_justify="left")
    for name in frame.columns:
        table.add_column(SHORT_NAMES.get(name, name.replace("threshold_", "t_")), justify="right")
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)


def _projections(calibration) -> None:
    table = Table(title=f"TEAL ({calibration.settings['allocation']}): sparsity of each projection's input over the layers",
                  title_justify="left")
    for name in ("projection", "mean", "min", "max"):
        table.add_column(name, justify="left" if name == "projection" else "right")
    for name in calibration.settings["names"]:
        values = calibration.per_layer[f"sparsity {name}"]
        table.add_row(name, *(f"{v:.3f}" for v in (values.mean(), values.min(), values.max())))
    console.print(table)


def _quality(report) -> None:
    console.print(
        f"perplexity on held-out text ({report.setting}; {report.tokens:,} tokens scored, {report.scored}): "
        f"dense {report.dense_ppl:.4f} → sparse {report.sparse_ppl:.4f} ({report.increase:+.2%}); "
        f"realised sparsity {report.realised_sparsity:.2%}, weights skipped {report.weight_skipped:.2%}",
        soft_wrap=True, highlight=False,
    )
