"""What every command shares: the consoles, the options every model-loading command takes, and
the error → exit-code mapping.

The consoles read no markup and no emoji codes: every string they print is literal, so a path,
a site name, SQL or data-set text with brackets (``runs/q[/i]``, ``[/bold]x``) or colons prints
as written. Styling is explicit (:func:`styled`), never parsed out of text.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Iterator

import typer
from rich.console import Console
from rich.text import Text

console = Console(markup=False, emoji=False)
errors = Console(stderr=True, markup=False, emoji=False)

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1

TRUST_REMOTE_CODE_HELP = "Run the Python code a model directory ships (its config's auto_map); only for code you trust."
ACTSCOPE_PACKAGE = str(Path(__file__).resolve().parents[1])


def styled(*parts: str | tuple[str, str]) -> Text:
    """Literal text with explicit styles: ``styled(("error:", "bold red"), " ", message)``."""
    return Text.assemble(*parts)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Bad input (and a model whose own forward fails) → a message and exit 2; a bug → a short
    note and exit 1."""
    from ..errors import InputError

    try:
        yield
    except InputError as error:
        _fail(str(error), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        errors.print("interrupted; nothing was written")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as error:  # noqa: BLE001 - the last line of defence for people
        if os.environ.get("ACTSCOPE_DEBUG"):
            raise
        if raised_by_the_model(error.__traceback__):
            _fail(f"the model's own forward pass failed: {type(error).__name__}: {error}\n"
                  "This comes from the model (its config or code), not from actscope: check the model's config "
                  "(e.g. head counts and sizes), or lower --batch-size / --max-length if it ran out of memory.",
                  EXIT_BAD_INPUT)
        _fail(f"{type(error).__name__}: {error}\n"
              "This is a bug in actscope; re-run with ACTSCOPE_DEBUG=1 for the traceback and report it.",
              EXIT_INTERNAL, "internal error:")


def _fail(message: str, code: int, label: str = "error:") -> None:
    errors.print(styled((label, "bold red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


def raised_by_the_model(trace: TracebackType | None) -> bool:
    """Whether an exception was raised in code that actscope reached by calling a module
    (``nn.Module.__call__``) and not in actscope's own code below that call: the model's forward
    failed. An exception raised inside one of actscope's hooks has an actscope frame innermost."""
    frames = []
    while trace is not None:
        frames.append(trace.tb_frame.f_code)
        trace = trace.tb_next
    ours = [i for i, code in enumerate(frames) if code.co_filename.startswith(ACTSCOPE_PACKAGE)]
    if not ours:
        return False
    below = frames[ours[-1] + 1:]
    return any(code.co_name in ("_call_impl", "_wrapped_call_impl") and "torch" in code.co_filename for code in below)


def quiet_libraries() -> None:
    """Keep third-party progress bars and advice out of the CLI's output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not sys.warnoptions:
        import warnings

        warnings.filterwarnings("ignore", module="transformers")
