"""``actscope attention``: every head's attention pattern over a prompt, for the report's viewer."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import MODEL_HELP, ModelOptions, console, friendly_errors, model_options


@model_options
def attention(
    model_dir: Optional[str] = typer.Argument(None, metavar="MODEL", help=MODEL_HELP + " (default: the embedded MiniLM)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text whose attention patterns to record."),
    sites: str = typer.Option("blocks.*.attn.pattern", "--sites", "-s", help="Attention-pattern sites, e.g. 'blocks.0-3.attn.pattern'."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Tokens of the prompt kept (a head's grid is tokens × tokens)."),
    show: int = typer.Option(10, "--show", help="Heads printed, strongest attention sinks first."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory: the patterns go into its report's attention viewer (a run of the same model, or a new one)."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Record every head's attention pattern over a prompt; --out puts them in the report."""
    with friendly_errors():
        from actscope.explain.attention import attention_patterns

        model = options.load(model_dir)
        model.module.eval()
        result = attention_patterns(model, prompt, sites, max_tokens=max_tokens)
        sinks = sorted(result.sinks().items(), key=lambda item: -item[1])
        table = Table(title=f"{len(sinks)} heads over {len(result.tokens)} tokens · strongest sinks first", title_justify="left")
        for column in ("site", "head", "attention on the first token", "most attended key (mean)"):
            table.add_column(column, justify="left" if column == "site" else "right")
        for (site, head), sink in sinks[:show]:
            pattern = result.pattern(site, head)
            key = int(pattern.mean(0).argmax())
            table.add_row(site, str(head), f"{sink:.3f}", f"{key} {repr(result.tokens[key])[1:-1]}")
        console.print(table)
        if out is not None:
            from .saving import save_tables

            save_tables(model, out, "attention", {"prompt": prompt, "sites": sites, "max_tokens": max_tokens},
                        {"attention": result.to_table(), "attention_tokens": result.tokens_table()})
