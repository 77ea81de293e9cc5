"""``actscope steer``: add a steering vector while a causal LM generates; unsteered and steered
continuations side by side, and a sweep of scales with an effect metric."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .common import MODEL_HELP, ModelOptions, console, friendly_errors, model_options, styled
from .sae import SAE_HELP, attach_saes


@model_options
def steer(
    model_dir: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP + ": a causal LM with its tokenizer."),
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Text to continue (repeat for several)."),
    positive: Optional[Path] = typer.Option(None, "--positive", help="Prompts (a text file, one per line, or .jsonl/.csv) whose activations the vector points towards."),
    negative: Optional[Path] = typer.Option(None, "--negative", help="Prompts whose activations the vector points away from."),
    site: Optional[str] = typer.Option(None, "--site", "-s", help="Where to add it, e.g. 'blocks.3.resid.post' (a range steers at several layers)."),
    unit: Optional[str] = typer.Option(None, "--unit", help="Steer one unit instead: 'blocks.3.mlp.post[17]', or an SAE feature: 'blocks.3.resid.post.sae[5]' with --sae."),
    sae: Optional[List[str]] = typer.Option(None, "--sae", help=SAE_HELP + " Steer along a feature's decoder direction with --unit SITE.sae[J]."),
    scale: float = typer.Option(4.0, "--scale", help="Multiplier of the vector."),
    tokens: str = typer.Option("mean", "--tokens", help="mean: every token of every prompt; last: each prompt's last token."),
    positions: str = typer.Option("all", "--positions", help="all, prompt, new (generated tokens only), or prompt positions such as '0,-1'."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="Scales to compare, e.g. '0,2,4,8'."),
    target: Optional[List[str]] = typer.Option(None, "--target", help="A one-token word whose log-probability measures the effect (repeat for several; mind the leading space)."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", "-n", help="Tokens to generate."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory: the sweep goes into its report (a run of the same model, or a new one)."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Steer generation with a contrastive (or unit) direction; print unsteered and steered text."""
    with friendly_errors():
        from actscope.errors import InputError
        from actscope.explain.steering import check_positions, steer as steer_prompt, steering_sweep, steering_vector

        if max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if unit is None and (positive is None or negative is None or site is None):
            raise InputError("give --positive, --negative and --site (a contrastive vector), or --unit 'blocks.3.mlp.post[17]'")
        check_positions(positions)
        scales = _scales(sweep)
        model = options.load(model_dir)
        model.module.eval()
        attach_saes(model, sae)
        vector = (steering_vector(model, unit=unit) if unit is not None else
                  steering_vector(model, site, str(positive), str(negative), tokens=tokens))
        console.print(f"steering vector: {', '.join(vector.sites)} · {vector.source} · norm {vector.norm():.3g}", highlight=False)
        _side_by_side([steer_prompt(model, vector, p, scale=scale, positions=positions, max_new_tokens=max_new_tokens) for p in prompt])
        if not scales and out is None:
            return
        result = steering_sweep(model, vector, prompt, scales or [0.0, scale], positions=positions, max_new_tokens=max_new_tokens,
                                targets=target)
        if scales:
            _print_sweep(result)
        if out is not None:
            from .saving import save_tables

            save_tables(model, out, "steer", {"site": ",".join(vector.sites), "source": vector.source, "positions": positions,
                                              "targets": list(target or []), "scales": sorted(set(result.scale.tolist()))},
                        {"steering": result.to_table()})


def _scales(text: Optional[str]) -> list[float]:
    from actscope.errors import InputError

    if text is None:
        return []
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--sweep must be numbers separated by commas, e.g. '0,2,4,8'; got {text!r}") from None


def _side_by_side(results: list) -> None:
    table = Table(title=f"greedy continuations · scale {results[0].scale:g}", title_justify="left", show_lines=True)
    for column in ("prompt", "unsteered", "steered"):
        table.add_column(column, overflow="fold", ratio=1)
    for result in results:
        table.add_row(result.prompt, result.unsteered.text, result.steered.text)
    console.print(table)


def _print_sweep(result) -> None:
    table = Table(title="scale sweep", title_justify="left")
    for column in ("scale", "mean log p(targets)", "continuation of the first prompt"):
        table.add_column(column, justify="right" if column != "continuation of the first prompt" else "left", overflow="fold")
    first = result.prompt[0]
    for scale, (logprob, _) in result.summary().items():
        text = next(t for s, p, t in zip(result.scale, result.prompt, result.text) if s == scale and p == first)
        table.add_row(f"{scale:g}", "—" if logprob != logprob else f"{logprob:.3f}", text)
    console.print(table)
    console.print(styled(("effect", "bold"), ": mean over prompts and generated steps of log Σ p(target tokens)"
                         if result.targets else ": pass --target ' word' to measure one"))
