"""``actscope harvest``: write the raw activations of chosen sites for every real token to an
activation dataset (sharded safetensors files and a manifest), for training probes or sparse
autoencoders; ``actscope.open_activations(DIR)`` reads it back."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import MODEL_HELP, ModelOptions, console, model_options, styled
from .profile import progress_bar, rank_errors, relaunch


@model_options
def harvest(
    command: typer.Context,
    model_dir: Optional[str] = typer.Argument(None, metavar="MODEL", help=MODEL_HELP + " (default: the embedded MiniLM)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Text, .jsonl, .csv, .tsv, .parquet or a saved HF dataset (default: built-in corpus)."),
    column: Optional[str] = typer.Option(None, "--column", help="Text column of a table-shaped data file."),
    sites: str = typer.Option(..., "--sites", "-s", help="Sites to write, e.g. 'blocks.3.mlp.post' or 'blocks.*.resid.post'."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write."),
    store_dtype: Optional[str] = typer.Option(None, "--store-dtype", help="float32, bfloat16, float16 or float64 (default: each site's own dtype, exactly as computed)."),
    shard_mb: float = typer.Option(256.0, "--shard-mb", help="The most megabytes (10^6 bytes) one shard file takes; memory holds one shard."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop after this many real tokens."),
    batch_size: int = typer.Option(8, "--batch-size", help="Documents per forward pass."),
    max_length: int = typer.Option(128, "--max-length", help="Truncate documents to this many tokens."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an activation dataset actscope wrote at --out."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted harvest after its last complete shards."),
    processes: int = typer.Option(1, "--processes", help="Harvest in N processes (torchrun on this machine), each writing its own shards."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Write the activations of chosen sites for every real token (with document and position ids) as sharded safetensors."""
    if processes != 1:
        relaunch(command, processes)
    with rank_errors() as context:
        import actscope
        from actscope.data import load_corpus
        from actscope.distributed import rank_device
        from actscope.store.activations import check_folder

        model = options.load(model_dir, device=rank_device(options.device, context))
        plan = actscope.plan_sites(model, sites)
        corpus = load_corpus(data, column=column)
        if context.main:  # before the progress bar: a bad --out fails at once
            check_folder(out, overwrite=overwrite, resume=resume)
        with progress_bar(len(corpus), shown=context.main, label="harvesting") as advance:
            dataset = actscope.harvest(model, corpus, sites=plan, out=out, store_dtype=store_dtype, shard_mb=shard_mb,
                                       max_tokens=max_tokens, batch_size=batch_size, max_length=max_length, overwrite=overwrite,
                                       resume=resume, progress=advance)
        if context.main:
            _summary(dataset)


def _summary(dataset) -> None:
    manifest = dataset.manifest
    size = sum(shard["bytes"] for shard in manifest["shards"])
    sites = ", ".join(f"{label} ({info['units']} × {info['dtype']})" for label, info in dataset.sites.items())
    console.print(f"{manifest['data']['tokens']:,} tokens of {manifest['data']['documents']:,} documents · {sites}", highlight=False, soft_wrap=True)
    console.print(f"{len(manifest['shards'])} shards, {size / 1e6:,.1f} MB, {manifest['timings']['seconds']:.1f} s "
                  f"({manifest['timings']['bytes_per_second'] / 1e6:,.1f} MB/s)", highlight=False)
    console.print(styled("Dataset: ", (str(dataset.path), "bold")), highlight=False, soft_wrap=True)
