"""``--out`` for the commands that explain one model (lens, steer, attention): their tables go
into a run of the same model (checked by weight hash), beside what it holds, or into a new run;
either way the run's report is rewritten so the new views appear."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .common import console, styled


def save_tables(model: Any, out: Path, kind: str, config: Mapping[str, Any], tables: Mapping[str, Any], *, report: bool = True) -> Path:
    """Write ``tables`` into the run at ``out`` (same weights) or a new run there; with
    ``report``, (re)write ``out/report.html``. Prints where they went."""
    from actscope.errors import RunDirError
    from actscope.store import read_run, weight_hash, write_run

    weights = weight_hash(model.module)
    if not (out / "manifest.json").is_file():
        manifest = {"kind": kind, "model": {"name": model.name, "source": model.source, "family": model.family,
                                            "class": type(model.module).__name__, "weight_hash": weights}, kind: dict(config)}
        write_run(out, manifest=manifest, tables=dict(tables))
    else:
        data = read_run(out)
        recorded = data.manifest.get("model", {}).get("weight_hash")
        if recorded is not None and recorded != weights:
            raise RunDirError(f"the run at {out} was recorded with other weights than {model.name}; pass the same model, "
                              "or a new --out directory")
        manifest = {**data.manifest, kind: dict(config)}  # what made the tables, under the command's name
        write_run(out, manifest=manifest, tables={**data.tables, **tables}, arrays=data.arrays, state=data.state(), overwrite=True)
    console.print(styled("Run directory: ", (str(out), "bold")), highlight=False, soft_wrap=True)
    if report:
        from actscope.report import write_report

        console.print(styled("Report: ", (str(write_report(out)), "bold")), highlight=False, soft_wrap=True)
    return out
