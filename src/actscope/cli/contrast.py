"""``actscope contrast``: rank units, heads and experts by how much more a behaviour prompt set
drives them than a control set (effect size and permutation p-value), optionally into a run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import MODEL_HELP, ModelOptions, console, friendly_errors, model_options, styled


@model_options
def contrast(
    model_dir: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP + ", with its tokenizer."),
    behaviour: Path = typer.Option(..., "--behaviour", "-b", help="Behaviour-eliciting prompts: a text file (one per line), .jsonl, .csv, …"),
    control: Path = typer.Option(..., "--control", "-c", help="Control prompts, same formats."),
    sites: str = typer.Option("blocks.*.mlp.post", "--sites", "-s", help="Units (e.g. blocks.*.mlp.post), heads (blocks.*.attn.z), experts (blocks.*.moe.router)."),
    top: int = typer.Option(20, "--top", help="Rows to print."),
    permutations: int = typer.Option(1000, "--permutations", help="Label permutations for the p-values."),
    seed: int = typer.Option(0, "--seed", help="Seed of the permutations."),
    two_sided: bool = typer.Option(False, "--two-sided", help="Rank by |effect size| and test both directions."),
    rank_by: str = typer.Option("effect_size", "--rank-by", help="effect_size (Cohen's d) or difference (of the means)."),
    column: Optional[str] = typer.Option(None, "--column", help="Text column of table-shaped prompt files."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to write the full ranking into (contrast.parquet)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run at --out."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per forward pass."),
    max_length: int = typer.Option(128, "--max-length", help="Truncate prompts to this many tokens."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Contrast sets (fTRI): which units, heads and experts respond more to the behaviour prompts."""
    with friendly_errors():
        from actscope.data import load_corpus
        from actscope.errors import InputError
        from actscope.explain.contrast import contrast as run_contrast

        if top < 1:
            raise InputError(f"--top must be at least 1, got {top}")
        if out is not None:
            from actscope.store.writer import check_target

            check_target(out, overwrite)  # refuse before the forward passes
        model = options.load(model_dir)
        behaviour_set, control_set = load_corpus(behaviour, column=column), load_corpus(control, column=column)
        result = run_contrast(
            model, behaviour_set, control_set, sites, n_permutations=permutations, seed=seed,
            alternative="two-sided" if two_sided else "greater", rank_by=rank_by, batch_size=batch_size, max_length=max_length,
        )
        _print(result, model.name, top)
        if out is not None:
            _write(out, overwrite, model, result, behaviour_set, control_set, sites)
            console.print(styled("Run directory: ", (str(out), "bold")))


def _print(result, name: str, top: int) -> None:
    table = Table(
        title=f"{name} · {result.n_behaviour} behaviour vs {result.n_control} control prompts · "
              f"{result.n_permutations} permutations ({result.alternative})",
        title_justify="left",
    )
    for heading in ("rank", "site", "kind", "index", "behaviour", "control", "effect size (d)", "p-value"):
        table.add_column(heading, justify="left" if heading in ("site", "kind") else "right", no_wrap=heading == "site")
    rows = result.to_table()
    for i in range(min(top, len(rows["rank"]))):
        table.add_row(
            str(rows["rank"][i]), str(rows["site"][i]), str(rows["kind"][i]), str(rows["index"][i]),
            f"{rows['behaviour_mean'][i]:.4g}", f"{rows['control_mean'][i]:.4g}",
            f"{rows['effect_size'][i]:.3f}", f"{rows['p_value'][i]:.4f}",
        )
    console.print(table)


def _write(out: Path, overwrite: bool, model, result, behaviour_set, control_set, sites: str) -> None:
    from actscope.store import library_versions, now_iso, weight_hash
    from actscope.store.writer import write_run

    manifest = {
        "kind": "contrast",
        "created": now_iso(),
        "model": {"name": model.name, "source": model.source, "family": model.family, "weight_hash": weight_hash(model.module)},
        "data": {
            "behaviour": {"source": behaviour_set.source, "fingerprint": behaviour_set.fingerprint, "prompts": result.n_behaviour},
            "control": {"source": control_set.source, "fingerprint": control_set.fingerprint, "prompts": result.n_control},
        },
        "config": {
            "sites": sites, "n_permutations": result.n_permutations, "seed": result.seed,
            "alternative": result.alternative, "rank_by": result.rank_by,
        },
        "versions": library_versions(),
    }
    write_run(out, manifest=manifest, tables={result.table_name: result.to_table()}, overwrite=overwrite)
