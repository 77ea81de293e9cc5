"""``actscope generate``: greedy generation, dense and (with --calibration) sparse, side by side."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import MODEL_HELP, ModelOptions, console, friendly_errors, model_options, styled


@model_options
def generate(
    model_dir: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP + ": a causal LM with its tokenizer."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", "-c", help="A file written by `actscope sparsify`."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="Tokens to generate."),
    options: ModelOptions = ModelOptions(),
) -> None:
    """Print the greedy continuation and tokens/s, dense and sparse side by side."""
    with friendly_errors():
        from actscope.errors import DataError, InputError
        from actscope.sparse import Calibration, sparsify

        if max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        model = options.load(model_dir)
        model.module.eval()
        if model.tokenizer is None:
            raise DataError(f"{model_dir} has no tokenizer; generate needs one to read --prompt and print the text")
        model.require_generator("generate")
        rows = [("dense", *_run(model, prompt, max_new_tokens))]
        if calibration is not None:
            loaded = Calibration.load(calibration, model)
            with sparsify(model, loaded, check_weights=False) as handle:
                rows.append((f"sparse ({loaded.method})", *_run(model, prompt, max_new_tokens)))
            rows[-1] = (*rows[-1], float(handle.realised().decode_sparsity.mean()))
        _print(rows)


def _run(model, prompt: str, max_new_tokens: int) -> tuple[str, int, float]:
    """(continuation text, new tokens, tokens/s) of one greedy generation."""
    import torch

    inputs = model.tokenizer(prompt, return_tensors="pt").to(model.device)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    with torch.no_grad():
        model.module.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=pad)  # warm-up, not timed
        start = time.perf_counter()
        out = model.module.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    seconds = time.perf_counter() - start
    new = model.continuation(out, inputs["input_ids"].shape[1])[0]
    return model.tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), new.numel() / max(seconds, 1e-9)


def _print(rows: list[tuple]) -> None:
    table = Table(title="greedy generation", title_justify="left")
    for name in ("mode", "tokens", "tokens/s", "decode sparsity"):
        table.add_column(name, justify="left" if name == "mode" else "right")
    for row in rows:
        mode, _, tokens, rate = row[:4]
        table.add_row(mode, str(tokens), f"{rate:.1f}", f"{row[4]:.1%}" if len(row) > 4 else "—")
    console.print(table)
    if len(rows) > 1:
        console.print(f"sparse / dense speed: {rows[1][3] / max(rows[0][3], 1e-9):.2f}×")
    for row in rows:  # the texts in full, one line each, so they can be compared and copied
        console.print(styled((f"{row[0]}:", "bold"), " ", row[1]), soft_wrap=True, highlight=False)
