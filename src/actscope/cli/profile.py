"""``actscope profile``: observe a model's sites over a data set and write a run directory."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .common import (
    DEVICE, DEVICE_MAP, DOWNLOAD, DTYPE, MODEL_HELP, REVISION, TRUST_REMOTE_CODE, console, friendly_errors,
    load_model, quiet_libraries, styled,
)

_METRIC_NAMES = "cett, temporal, core, codes, extreme, outliers, memory, moe, sensitivity"


def profile(
    model_dir: Optional[str] = typer.Argument(None, metavar="MODEL", help=MODEL_HELP + " (default: the embedded MiniLM)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Text, .jsonl, .csv, .tsv, .parquet or a saved HF dataset (default: built-in corpus)."),
    column: Optional[str] = typer.Option(None, "--column", help="Text column of a table-shaped data file."),
    sites: str = typer.Option("blocks.*.mlp.post", "--sites", "-s", help="Site selection, e.g. 'blocks.*.mlp.post,blocks.0-2.attn.pattern'."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to write (default: ./actscope-runs/<model>-<time>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run at --out."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop after this many real tokens."),
    batch_size: int = typer.Option(8, "--batch-size", help="Documents per forward pass."),
    max_length: int = typer.Option(128, "--max-length", help="Truncate documents to this many tokens."),
    top_k: int = typer.Option(8, "--top-k", help="Top-activating examples kept per unit."),
    metrics: Optional[str] = typer.Option(None, "--metrics", "-m", help="Measurements to add to the run: 'all' or a comma list of " + _METRIC_NAMES + "."),
    checkpoints: Optional[str] = typer.Option(None, "--checkpoints", help="Earlier checkpoint directories, comma-separated, in training order (for --metrics sensitivity)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write RUN_DIR/report.html (charts + neuron browser) at the end."),
    device: Optional[str] = DEVICE,
    dtype: Optional[str] = DTYPE,
    device_map: Optional[str] = DEVICE_MAP,
    revision: Optional[str] = REVISION,
    download: bool = DOWNLOAD,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
) -> None:
    """Stream per-neuron statistics of chosen sites into a run directory and summarise them."""
    quiet_libraries(download)
    with friendly_errors():
        import actscope
        from actscope.data import load_corpus
        from actscope.store import check_target
        config = actscope.ProfileConfig(max_tokens=max_tokens, batch_size=batch_size, max_length=max_length, k=top_k, column=column).checked()
        model = load_model(model_dir, device=device, dtype=dtype, device_map=device_map, revision=revision,
                           download=download, trust_remote_code=trust_remote_code)
        plan = actscope.plan_sites(model, sites)
        corpus = load_corpus(data, column=column)
        target = out or _default_out(model.name)
        check_target(target, overwrite)  # before the progress bar: a bad --out fails at once
        with _progress(len(corpus)) as advance:
            run = actscope.profile(model, corpus, sites=plan, out=target, overwrite=overwrite, config=config, progress=advance,
                                   metrics=metrics, measure_config=_measure_config(checkpoints), on_metric=_announce)
        _summary(run)
        if report:
            from actscope.report import write_report

            console.print(styled("Report: ", (str(write_report(run)), "bold")), highlight=False, soft_wrap=True)


def _default_out(name: str) -> Path:
    # a hub id's "org/name" becomes one folder, "org--name", as in the Hugging Face cache
    return Path("actscope-runs") / f"{name.replace('/', '--')}-{time.strftime('%Y%m%d-%H%M%S')}"


class _progress:
    """A rich progress bar over documents that also shows tokens and tokens/s."""

    def __init__(self, documents: int) -> None:
        self.bar = Progress(
            TextColumn("[bold]profiling"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("docs · {task.fields[tokens]:,} tokens · {task.fields[rate]:,.0f} tok/s"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task = self.bar.add_task("profile", total=documents, tokens=0, rate=0.0)
        self.tokens = 0
        self.start = time.perf_counter()

    def __enter__(self):
        self.bar.__enter__()
        return self.advance

    def advance(self, documents: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, completed=documents, tokens=self.tokens, rate=rate)

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)


def _summary(run) -> None:
    manifest = run.manifest
    table = Table(title=f"{manifest['model']['name']} · {manifest['data']['tokens']:,} tokens · {manifest['timings']['seconds']:.1f} s", title_justify="left")
    for column in ("site", "units", "activation ratio (a>0)", "ratio |a|>0.01", "ratio |a|>0.1", "dead units"):
        if column == "site":
            table.add_column(column, no_wrap=True)
        else:
            table.add_column(column, justify="right", overflow="fold")
    for row in run.layer_summary():
        table.add_row(
            row["site"],
            str(row["units"]),
            f"{row['activation_ratio']:.3f}",
            f"{row.get('activation_ratio_abs_gt_0.01', float('nan')):.3f}",
            f"{row.get('activation_ratio_abs_gt_0.1', float('nan')):.3f}",
            str(row["dead_units"]),
        )
    console.print(table)
    _measurements(run.manifest.get("measurements", {}))
    console.print(styled("Run directory: ", (str(run.path), "bold")), highlight=False, soft_wrap=True)


def _measure_config(checkpoints: Optional[str]):
    from actscope.measure import MeasureConfig

    return MeasureConfig(checkpoints=tuple(c.strip() for c in (checkpoints or "").split(",") if c.strip()))


def _announce(name: str) -> None:
    console.print(styled((f"measuring {name}…", "dim")))


def _measurements(outcome: dict) -> None:
    """One block per measurement: its summary lines, or why it was skipped."""
    for name, result in outcome.items():
        if result["skipped"]:
            console.print(styled((name, "bold"), ": ", (f"skipped — {result['skipped']}", "dim")))
            continue
        console.print(styled((name, "bold"), f" → tables {', '.join(result['tables'])}"))
        for line in result["summary"]:
            console.print(f"  {line}", highlight=False)
