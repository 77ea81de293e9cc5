"""``actscope decode``: the tokens each MLP neuron promotes and suppresses through the unembedding."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from .common import MODEL_HELP, ModelOptions, console, friendly_errors, model_options, styled
from .sae import SAE_HELP, attach_saes


@model_options
def decode(
    model_dir: Optional[str] = typer.Argument(None, metavar="MODEL", help=MODEL_HELP + " (default: the embedded MiniLM)."),
    site: str = typer.Option("blocks.*.mlp.post", "--site", "-s", help="Neuron sites and units, e.g. 'blocks.3.mlp.post[17]' or 'blocks.*.mlp.post'."),
    top: int = typer.Option(10, "--top", help="Promoted and suppressed tokens per unit."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory: a run of the same model gets decode and decode_agreement tables; a new directory gets a decode table."),
    show: int = typer.Option(20, "--show", help="Units printed (every unit is written with --out)."),
    sae: Optional[List[str]] = typer.Option(None, "--sae", help=SAE_HELP + " Decode them with --site SITE.sae."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Decode neurons into the vocabulary: W_out[:, i] through the final norm and the unembedding."""
    with friendly_errors():
        from actscope.explain.decode import decode as decode_units

        model = options.load(model_dir)
        attach_saes(model, sae)
        decoded = decode_units(model, site, top=top)
        agreement = _write(model, decoded, out, site, top) if out is not None else None
        _print(decoded, agreement, show)
        if out is not None:
            console.print(styled("Run directory: ", (str(out), "bold")))


def _write(model: Any, decoded: Any, out: Path, site: str, top: int) -> Any:
    """Add the tables to a run of the same model (with the agreement), or write a new run."""
    from actscope.errors import RunDirError
    from actscope.explain.decode import decode_agreement
    from actscope.store import read_run, weight_hash, write_run

    if not (out / "manifest.json").is_file():
        manifest = {"kind": "decode", "model": {"name": model.name, "source": model.source, "weight_hash": weight_hash(model.module)},
                    "config": {"site": site, "top": top}}
        write_run(out, manifest=manifest, tables={"decode": decoded.to_table()})
        return None
    data = read_run(out)
    recorded = data.manifest.get("model", {}).get("weight_hash")
    if recorded is not None and recorded != weight_hash(model.module):
        raise RunDirError(f"the run at {out} was recorded with other weights than {model.name}; pass the same model, or a new --out directory")
    tables = dict(data.tables) | {"decode": decoded.to_table()}
    agreement = decode_agreement(decoded, data) if "examples" in data.tables else None
    if agreement is not None:
        tables["decode_agreement"] = agreement.to_table()
    had_report = (out / "report.html").is_file()
    write_run(out, manifest=dict(data.manifest), tables=tables, arrays=data.arrays, state=data.state(), overwrite=True)
    if had_report:  # rewritten, so the unit cards show the decoded tokens
        from actscope.report import write_report

        console.print(styled("Report: ", (str(write_report(out)), "bold")), highlight=False, soft_wrap=True)
    return agreement


def _print(decoded: Any, agreement: Any, show: int) -> None:
    keys = list(dict.fromkeys(zip(decoded.site.tolist(), decoded.unit.tolist())))
    scores = {} if agreement is None else {(s, int(u)): a for s, u, a in zip(agreement.site, agreement.unit, agreement.agreement)}
    table = Table(title=f"decoded neurons · {len(keys)} units", title_justify="left")
    for column in ("site", "unit", "promoted (score)", "suppressed (score)") + (("agreement",) if scores else ()):
        table.add_column(column, no_wrap=column in ("site", "unit"), overflow="fold")
    for site, unit in keys[:show]:
        row = [site, str(unit), _tokens(decoded, site, unit, "promoted"), _tokens(decoded, site, unit, "suppressed")]
        table.add_row(*row, *([f"{scores.get((site, unit), float('nan')):.2f}"] if scores else []))
    console.print(table)
    if len(keys) > show:
        console.print(f"… {len(keys) - show} more units (raise --show, or write them all with --out)")


def _tokens(decoded: Any, site: str, unit: int, direction: str) -> str:
    keep = (decoded.site == site) & (decoded.unit == unit) & (decoded.direction == direction)
    return ", ".join(f"{repr(t)[1:-1]} ({s:+.2f})" for t, s in zip(decoded.token[keep], decoded.score[keep]))
