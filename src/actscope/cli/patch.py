"""``actscope patch``: activation (or attribution) patching of a clean/corrupted prompt pair."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from .common import MODEL_HELP, ModelOptions, console, friendly_errors, model_options, styled
from .sae import SAE_HELP, attach_saes

DEFAULT_SITES = {"head": "blocks.*.attn.z", "unit": "blocks.*.mlp.post", "site": "blocks.*.attn.z,blocks.*.mlp.post",
                 "position": "blocks.*.resid.pre"}


@model_options
def patch(
    model_dir: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP + ", with its tokenizer."),
    clean: str = typer.Option(..., "--clean", help="The clean prompt (the answer is right here)."),
    corrupted: str = typer.Option(..., "--corrupted", help="The corrupted prompt, the same number of tokens long."),
    answer: str = typer.Option(..., "--answer", help="The token the clean prompt should predict next."),
    wrong: str = typer.Option(..., "--wrong", help="The competing token; the metric is logit(answer) - logit(wrong)."),
    per: str = typer.Option("head", "--per", help="Patch each head, unit, site or position."),
    sites: Optional[str] = typer.Option(None, "--sites", "-s", help="Sites to patch (default by --per: attn.z heads, mlp.post units, both sites, resid.pre positions)."),
    sae: Optional[List[str]] = typer.Option(None, "--sae", help=SAE_HELP + " Patch them with --sites SITE.sae --per unit."),
    attribution: bool = typer.Option(False, "--attribution", help="Estimate every effect from one gradient instead of one forward each."),
    top: int = typer.Option(20, "--top", help="Rows to print (largest |recovered| first)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to write the full table into."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run at --out."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Patch clean activations into the corrupted run and print the recovered fraction per component."""
    with friendly_errors():
        from actscope.errors import InputError
        from actscope.explain.attribution import attribution_patching
        from actscope.explain.patching import PER, activation_patching, logit_difference

        if per not in PER:
            raise InputError(f"--per must be one of {', '.join(PER)}, got '{per}'")
        if top < 1:
            raise InputError(f"--top must be at least 1, got {top}")
        if out is not None:
            from actscope.store.writer import check_target

            check_target(out, overwrite)
        model = options.load(model_dir)
        if model.tokenizer is None:
            raise InputError(f"{model_dir} has no tokenizer, so text prompts cannot be encoded; use the Python API with token ids")
        attach_saes(model, sae)
        ids = {name: _token_id(model.tokenizer, text, name) for name, text in (("--answer", answer), ("--wrong", wrong))}
        chosen = sites or DEFAULT_SITES[per]
        metric = logit_difference(ids["--answer"], ids["--wrong"])
        if attribution:
            result = attribution_patching(model, clean, corrupted, metric, sites=chosen, per=per)
        else:
            result = activation_patching(model, clean, corrupted, metric, sites=chosen, per=per)
        _print(result, model.name, top)
        if out is not None:
            _write(out, overwrite, result, model, dict(clean=clean, corrupted=corrupted, answer=answer, wrong=wrong, per=per, sites=chosen))
            console.print(styled("Run directory: ", (str(out), "bold")))


def _token_id(tokenizer: Any, text: str, option: str) -> int:
    """The id of one token: a vocabulary entry as written, else text that encodes to one id."""
    from actscope.errors import InputError

    vocab = tokenizer.get_vocab()
    if text in vocab:
        return int(vocab[text])
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(encoded) != 1:
        raise InputError(f"{option} '{text}' is {len(encoded)} tokens for this tokenizer; give a single token "
                         "(e.g. with its leading-space marker, as the vocabulary writes it)")
    return int(encoded[0])


def _print(result: Any, name: str, top: int) -> None:
    method = "attribution patching (estimates)" if result.method == "attribution" else "activation patching"
    title = (f"{name} · {method} per {result.per[0] if len(result) else '?'} · metric clean {result.metric_clean:.4f}, "
             f"corrupted {result.metric_corrupt:.4f} · {result.forward_passes} forward + {result.backward_passes} backward passes")
    table = Table(title=title, title_justify="left")
    columns = ("site", "head", "unit", "position", "metric", "recovered")
    for column in columns:
        table.add_column(column, justify="left" if column == "site" else "right", no_wrap=column == "site")
    shown = result.top(top)
    for row in range(len(shown)):
        table.add_row(
            str(shown.site[row]),
            *(str(v) if v >= 0 else "" for v in (shown.head[row], shown.unit[row], shown.position[row])),
            f"{shown.metric[row]:.4f}",
            f"{shown.recovered[row]:.3f}",
        )
    console.print(table)
    if len(result) > top:
        console.print(f"{top} of {len(result)} components shown (largest |recovered|); --top N shows more, --out keeps all.")


def _write(out: Path, overwrite: bool, result: Any, model: Any, settings: dict) -> None:
    from actscope.store.manifest import library_versions, now_iso
    from actscope.store.writer import write_run

    manifest = {
        "kind": "patching", "created": now_iso(), "versions": library_versions(),
        "model": {"name": model.name, "source": model.source},
        "patching": {**settings, "method": result.method, "metric": "logit_difference",
                     "metric_clean": result.metric_clean, "metric_corrupt": result.metric_corrupt,
                     "forward_passes": result.forward_passes, "backward_passes": result.backward_passes},
    }
    write_run(out, manifest=manifest, tables={result.table_name: result.to_table()}, overwrite=overwrite)
