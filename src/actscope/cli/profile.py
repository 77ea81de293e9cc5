"""``actscope profile``: observe a model's sites over a data set and write a run directory."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .common import EXIT_BAD_INPUT, MODEL_HELP, ModelOptions, console, errors, friendly_errors, model_options, styled

_METRIC_NAMES = "cett, temporal, core, codes, extreme, outliers, memory, moe, sensitivity"


@model_options
def profile(
    command: typer.Context,
    model_dir: Optional[str] = typer.Argument(None, metavar="MODEL", help=MODEL_HELP + " (default: the embedded MiniLM)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Text, .jsonl, .csv, .tsv, .parquet or a saved HF dataset (default: built-in corpus)."),
    column: Optional[str] = typer.Option(None, "--column", help="Text column of a table-shaped data file."),
    sites: Optional[str] = typer.Option(None, "--sites", "-s", help="Site selection, e.g. 'blocks.*.mlp.post,blocks.0-2.attn.pattern' (default: blocks.*.mlp.post; with --sae, only the SAE's features)."),
    sae: Optional[List[str]] = typer.Option(None, "--sae", help="A sparse autoencoder or transcoder to profile (repeatable): a SAELens folder (cfg.json + sae_weights.safetensors), DIR@SITE to say where it reads, NAME=DIR to tell two on one site apart. Its features become the site SITE.sae."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to write (default: ./actscope-runs/<model>-<time>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run at --out."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop after this many real tokens."),
    batch_size: int = typer.Option(8, "--batch-size", help="Documents per forward pass."),
    max_length: int = typer.Option(128, "--max-length", help="Truncate documents to this many tokens."),
    top_k: int = typer.Option(8, "--top-k", help="Top-activating examples kept per unit."),
    unit_pages: bool = typer.Option(True, "--unit-pages/--no-unit-pages", help="Keep what unit pages show: each top example's per-token activations, quantile samples, histograms, co-firing."),
    metrics: Optional[str] = typer.Option(None, "--metrics", "-m", help="Measurements to add to the run: 'all' or a comma list of " + _METRIC_NAMES + "."),
    checkpoints: Optional[str] = typer.Option(None, "--checkpoints", help="Earlier checkpoint directories, comma-separated, in training order (for --metrics sensitivity)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write RUN_DIR/report.html (charts + neuron browser) at the end."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", metavar="TOKENS", help="Save the statistics and the data position every TOKENS tokens (per process) beside --out, to --resume after a crash."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint (same model, data, sites, options and processes)."),
    spatial: str = typer.Option("positions", "--spatial", help="Feature maps and ViT patches: every position a row (positions), or per image its max or mean."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="Image data: resize to SIZE or H,W (default: the model directory's preprocessing, else the images' own size)."),
    image_mean: Optional[str] = typer.Option(None, "--image-mean", help="Image data: per-channel mean to subtract, e.g. 0.485,0.456,0.406 (default: the model directory's, else 0)."),
    image_std: Optional[str] = typer.Option(None, "--image-std", help="Image data: per-channel std to divide by (default: the model directory's, else 1)."),
    processes: int = typer.Option(1, "--processes", help="Profile in N processes (torchrun on this machine), each taking every N-th batch; the result equals one process's."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Stream per-neuron statistics of chosen sites into a run directory and summarise them."""
    if processes != 1:
        with friendly_errors():  # what needs no model is checked once, here, not in every process
            import actscope
            from actscope.store import check_target

            actscope.ProfileConfig(max_tokens=max_tokens, batch_size=batch_size, max_length=max_length, k=top_k, column=column, pages=unit_pages).checked()
            if out is not None:
                check_target(out, overwrite)
        relaunch(command, processes)
    with rank_errors() as context:
        import actscope
        from actscope.data import load_corpus
        from actscope.distributed import rank_device
        from actscope.store import check_target
        config = actscope.ProfileConfig(max_tokens=max_tokens, batch_size=batch_size, max_length=max_length, k=top_k, column=column, pages=unit_pages,
                                        spatial=spatial).checked()
        if (checkpoint_every is not None or resume) and out is None:
            raise actscope.InputError(f"{'--resume' if resume else '--checkpoint-every'} needs --out: the checkpoint is kept beside the run directory")
        model = options.load(model_dir, device=rank_device(options.device, context))
        from actscope.profiling import plan_with_saes
        from actscope.sae.files import load_spec

        saes = [load_spec(spec) for spec in sae] if sae else None
        plan, _ = plan_with_saes(model, sites if sites is not None or saes else "blocks.*.mlp.post", saes)
        corpus = _images(model, data, image_size, image_mean, image_std, max_tokens) or load_corpus(data, column=column)
        target = out or _default_out(model.name)
        if context.main:
            check_target(target, overwrite)  # before the progress bar: a bad --out fails at once
        with progress_bar(len(corpus), shown=context.main) as advance, _interrupted(target, checkpoint_every, resume, context.main):
            run = actscope.profile(model, corpus, sites=plan, out=target, overwrite=overwrite, config=config, progress=advance,
                                   metrics=metrics, measure_config=_measure_config(checkpoints), on_metric=_announce(context),
                                   checkpoint_every=checkpoint_every, resume=resume, sae=saes)
        if not context.main:
            return
        _summary(run)
        if report:
            from actscope.report import write_report

            console.print(styled("Report: ", (str(write_report(run)), "bold")), highlight=False, soft_wrap=True)


def _images(model: Any, data: Any, size: Optional[str], mean: Optional[str], std: Optional[str], limit: Optional[int]) -> Any:
    """Image data (a folder of images, an .npy array, a saved image data set) as Images, or None for text."""
    from actscope.data.images import Preprocess, is_image_data, parse_floats
    from actscope.errors import InputError
    from actscope.feeding import images_for

    if data is None or not is_image_data(data):
        if any(v is not None for v in (size, mean, std)):
            raise InputError("--image-size, --image-mean and --image-std apply to image data; --data is not a folder of images, an .npy file or a saved image data set")
        return None
    sizes = tuple(int(v) for v in parse_floats(size, "--image-size")) if size else None
    chosen = Preprocess(size=(sizes * 2 if len(sizes) == 1 else sizes) if sizes else None,
                        mean=parse_floats(mean, "--image-mean") if mean else (0.0,), std=parse_floats(std, "--image-std") if std else (1.0,))
    return images_for(model, data, preprocess=chosen, limit=limit)


def relaunch(command: typer.Context, processes: int) -> None:
    """``--processes N``: run this same command in N processes through torchrun, and exit with its code."""
    from actscope.distributed import launch, launched

    with friendly_errors():
        from actscope.errors import InputError

        if processes < 1:
            raise InputError(f"--processes must be at least 1, got {processes}")
        if launched().distributed:
            raise InputError("--processes starts torchrun itself; under torchrun leave --processes out")
    raise typer.Exit(launch([command.info_name, *_arguments(command)], processes))


def _arguments(command: typer.Context) -> list[str]:
    """The command line of ``command`` as given (what the user set), without --processes."""
    words: list[str] = []
    options: list[str] = []
    for param in command.command.params:
        value = command.params.get(param.name)
        source = command.get_parameter_source(param.name)
        given = source is not None and source.name != "DEFAULT"
        if param.name == "processes" or not given or value is None:
            continue
        if param.param_type_name == "argument":
            words.append(str(value))
        elif getattr(param, "is_flag", False):
            options.append(param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0])
        elif isinstance(value, (list, tuple)):  # a repeatable option (--sae)
            options += [part for item in value for part in (param.opts[0], str(item))]
        else:
            options += [param.opts[0], str(value)]
    return words + options


@contextmanager
def rank_errors() -> Iterator[Any]:
    """friendly_errors for one of several processes: only rank 0 prints what every process
    agreed on, other ranks stay silent but for their own errors, and each process's exit code
    is left for ``--processes`` to pass on."""
    from actscope.distributed import end, is_quiet, launched, record_exit

    try:
        with friendly_errors():
            context = launched()
            if context.distributed and not context.main:
                _silence()
            try:
                yield context
            except Exception as error:
                if is_quiet(error) and context.distributed and not context.main:
                    raise typer.Exit(EXIT_BAD_INPUT) from None
                raise
            finally:
                end()
    except typer.Exit as done:
        record_exit(done.exit_code)
        raise


def _silence() -> None:
    """Ranks other than 0 print errors only: warnings and logs come from rank 0."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("actscope").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)


@contextmanager
def _interrupted(target: Path, every: Optional[int], resume: bool, main: bool) -> Iterator[None]:
    """Ctrl-C with checkpoints: say (rank 0) where the last one is and how to resume."""
    try:
        yield
    except KeyboardInterrupt:
        from actscope.store.checkpoint import checkpoint_folder, rank_files

        folder = checkpoint_folder(target)
        if (every is not None or resume) and not main:
            raise typer.Exit(130) from None
        if (every is not None or resume) and rank_files(folder):
            errors.print(f"interrupted; the last checkpoint is in {folder}: run the same command with --resume to continue")
            raise typer.Exit(130) from None
        raise


def _default_out(name: str) -> Path:
    # a hub id's "org/name" becomes one folder, "org--name", as in the Hugging Face cache
    return Path("actscope-runs") / f"{name.replace('/', '--')}-{time.strftime('%Y%m%d-%H%M%S')}"


class progress_bar:
    """A rich progress bar over documents that also shows tokens and tokens/s (rank 0's only)."""

    def __init__(self, documents: int, shown: bool = True, label: str = "profiling") -> None:
        self.shown = shown
        self.bar = Progress(
            TextColumn(f"[bold]{label}"),
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
        if not self.shown:
            return None
        self.bar.__enter__()
        return self.advance

    def advance(self, documents: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, completed=documents, tokens=self.tokens, rate=rate)

    def __exit__(self, *exc) -> None:
        if self.shown:
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
    _sae_quality(run.tables.get("sae"))
    console.print(styled("Run directory: ", (str(run.path), "bold")), highlight=False, soft_wrap=True)


def _measure_config(checkpoints: Optional[str]):
    from actscope.measure import MeasureConfig

    return MeasureConfig(checkpoints=tuple(c.strip() for c in (checkpoints or "").split(",") if c.strip()))


def _announce(context):
    where = " (on rank 0 only: measurements do not run distributed)" if context.distributed else ""

    def announce(name: str) -> None:
        console.print(styled((f"measuring {name}…{where}", "dim")))

    return announce


def _measurements(outcome: dict) -> None:
    """One block per measurement: its summary lines, or why it was skipped."""
    for name, result in outcome.items():
        if result["skipped"]:
            console.print(styled((name, "bold"), ": ", (f"skipped — {result['skipped']}", "dim")))
            continue
        where = f" ({result['processes']})" if result.get("processes") else ""
        console.print(styled((name, "bold"), f" → tables {', '.join(result['tables'])}{where}"))
        for line in result["summary"]:
            console.print(f"  {line}", highlight=False)


def _sae_quality(table: Any) -> None:
    """One line per profiled SAE: its reconstruction quality (the run's sae table)."""
    if table is None:
        return
    for row in table.to_pylist():
        loss = (f", loss {row['clean']:.4f} → {row['reconstructed']:.4f} nats (+{row['loss_increase']:.4f}; "
                f"{row['recovered']:.1%} recovered against zeroing)" if row["clean"] == row["clean"] else
                f", {row['objective']} degradation {row['degradation']:.4f} (zeroed: {row['degradation_ablated']:.4f})" if row["objective"] else "")
        console.print(styled((row["site"], "bold"), f": explained variance {row['explained_variance']:.3f}, L0 {row['l0']:.1f}, "
                             f"dead {row['dead']}/{row['d_sae']}{loss}"), highlight=False, soft_wrap=True)
