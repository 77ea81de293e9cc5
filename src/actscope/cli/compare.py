"""``actscope compare``: the site × site similarity (linear CKA by default, streamed) of two
models on the same data, printed and written into a run with a heat map in its report."""
from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import MODEL_HELP, ModelOptions, console, errors, friendly_errors, model_options, styled


@model_options
def compare(
    model_a: str = typer.Argument(..., metavar="MODEL_A", help=MODEL_HELP + "."),
    model_b: Optional[str] = typer.Argument(None, metavar="MODEL_B", help="The second model (same forms); omit it to compare --sites with --sites-b of MODEL_A."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Text, .jsonl, .csv, .tsv, .parquet or a saved HF dataset (default: built-in corpus)."),
    column: Optional[str] = typer.Option(None, "--column", help="Text column of a table-shaped data file."),
    sites: str = typer.Option("blocks.*.resid.post", "--sites", "-s", help="Sites of MODEL_A (the rows), e.g. 'blocks.*.mlp.post'."),
    sites_b: Optional[str] = typer.Option(None, "--sites-b", help="Sites of MODEL_B (the columns); default: the same selection as --sites."),
    pairs: str = typer.Option("all", "--pairs", help="all (every row with every column) or matching (site i with site i)."),
    measure: str = typer.Option("cka", "--measure", help="cka or rsa."),
    kernel: str = typer.Option("linear", "--kernel", help="CKA kernel: linear (streamed) or rbf (on --max-samples sampled rows)."),
    unbiased: bool = typer.Option(False, "--unbiased", help="CKA with the unbiased HSIC estimator (for few samples)."),
    sigma: float = typer.Option(1.0, "--sigma", help="RBF bandwidth as a multiple of the median distance."),
    metric: str = typer.Option("correlation", "--metric", help="RSA dissimilarity: correlation, euclidean or cosine."),
    rank: str = typer.Option("spearman", "--rank", help="RSA: how the two dissimilarity matrices are compared: spearman, pearson or kendall."),
    pool: str = typer.Option("tokens", "--pool", help="Rows: tokens (the models must tokenize alike), or one per document: mean or last."),
    max_samples: int = typer.Option(2048, "--max-samples", help="RBF CKA and RSA: rows sampled (reservoir) for the n × n matrices."),
    max_memory: int = typer.Option(2048, "--max-memory", metavar="MIB", help="Linear CKA: MiB of float64 sums per pass; more pairs than fit take more passes over the data."),
    precision: str = typer.Option("float64", "--precision", help="Linear CKA products per batch: float64, or float32 (faster, ~1e-6 relative)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the row sample (RBF CKA, RSA)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop after this many real tokens."),
    batch_size: int = typer.Option(8, "--batch-size", help="Documents per forward pass."),
    max_length: int = typer.Option(128, "--max-length", help="Truncate documents to this many tokens."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to write (similarity.parquet, similarity_sites.parquet, report.html)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run at --out."),
    report: bool = typer.Option(True, "--report/--no-report", help="With --out, write RUN_DIR/report.html with the heat map."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Compare representations: CKA or RSA of every site of MODEL_A with every site of MODEL_B."""
    with friendly_errors():
        from actscope.data import load_corpus
        from actscope.errors import InputError
        from actscope.metrics.compare import compare_representations

        if max_memory < 1:
            raise InputError(f"--max-memory must be at least 1 (MiB), got {max_memory}")
        if out is not None:
            from actscope.store.writer import check_target

            check_target(out, overwrite)  # refuse before the forward passes
        first = options.load(model_a)
        second = options.load(model_b) if model_b is not None else None
        from actscope.store import now_iso

        corpus = load_corpus(data, column=column)
        started, clock = now_iso(), time.perf_counter()
        result = compare_representations(
            first, second, corpus, sites, sites_b, pairs=pairs, measure=measure, kernel=kernel, unbiased=unbiased, sigma=sigma,
            metric=metric, compare=rank, pool=pool, max_samples=max_samples, max_bytes=max_memory << 20, precision=precision,
            seed=seed, batch_size=batch_size, max_length=max_length, max_tokens=max_tokens, progress=_progress(),
        )
        seconds = time.perf_counter() - clock
        _print(result)
        if out is not None:
            run = _write(out, overwrite, first, second or first, result, corpus, (started, seconds))
            console.print(styled("Run directory: ", (str(out), "bold")), highlight=False, soft_wrap=True)
            if report:
                from actscope.report import write_report

                console.print(styled("Report: ", (str(write_report(run)), "bold")), highlight=False, soft_wrap=True)


def _progress():
    shown = {"pass": -1}

    def update(number: int, rows: int) -> None:
        if number != shown["pass"]:
            shown["pass"] = number
            errors.print(f"pass {number + 1} over the data …", highlight=False)

    return update


def _print(result) -> None:
    table = Table(title=f"{result.measure} · {result.model_a} (rows) vs {result.model_b} (columns) · {result.samples} "
                        f"{'tokens' if result.pool == 'tokens' else 'documents'} · {result.passes} pass(es)", title_justify="left")
    columns = _short(list(result.sites_b))
    table.add_column("site", no_wrap=True)
    for name in columns:
        table.add_column(name, justify="right")
    for i, site in enumerate(result.sites_a):
        table.add_row(site, *[("" if math.isnan(v) else f"{v:.3f}") for v in result.values[i]])
    console.print(table)
    if columns[0].startswith("#"):
        console.print("columns: " + ", ".join(f"{c} = {s}" for c, s in zip(columns, result.sites_b)), highlight=False, soft_wrap=True)
    elif columns != list(result.sites_b):
        kind = result.sites_b[0].split(".", 2)[2]
        console.print(f"columns: blocks.N.{kind}", highlight=False)


def _short(names: list[str]) -> list[str]:
    """``blocks.3.resid.post`` → ``3`` when every column is a block of one kind; otherwise
    ``#0``, ``#1``, … (listed below the table) when the names would not fit."""
    found = [re.fullmatch(r"blocks\.(\d+)\.(.+)", n) for n in names]
    if all(found) and len({m.group(2) for m in found}) == 1:
        return [m.group(1) for m in found]
    return [f"#{i}" for i in range(len(names))] if len(names) > 1 else names


def _write(out: Path, overwrite: bool, first, second, result, corpus, timing: tuple[str, float]):
    import actscope
    from actscope.store import library_versions, now_iso, weight_hash
    from actscope.store.writer import write_run

    def described(model) -> dict:
        return {"name": model.name, "source": model.source, "family": model.family, "weight_hash": weight_hash(model.module)}

    models = [described(first), described(second)]
    manifest = {
        "kind": "compare",
        "created": now_iso(),
        "model": {"name": f"{first.name} vs {second.name}", "family": first.family, "weight_hash": models[0]["weight_hash"]},
        "models": models,
        "data": {"name": corpus.name, "source": corpus.source, "fingerprint": corpus.fingerprint, "documents": len(corpus),
                 **({"tokens": result.samples} if result.pool == "tokens" else {"rows": result.samples})},
        "plan": [{"site": s} for s in dict.fromkeys([*result.sites_a, *result.sites_b])],
        "config": {"measure": result.measure, "pool": result.pool, "streamed": result.streamed, "passes": result.passes,
                   "sites_a": list(result.sites_a), "sites_b": list(result.sites_b)},
        "timings": {"started": timing[0], "seconds": round(timing[1], 3)},
        "versions": library_versions(),
    }
    tables = {result.table_name: result.to_table(), "similarity_sites": result.sites_table()}
    write_run(out, manifest=manifest, tables=tables, overwrite=overwrite)
    return actscope.open_run(out)
