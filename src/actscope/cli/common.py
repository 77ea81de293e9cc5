"""What every command shares: the consoles and the error → exit-code mapping."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console

console = Console()
errors = Console(stderr=True)

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Bad input → a one-line message and exit 2; a bug → a short note and exit 1."""
    from ..errors import InputError

    try:
        yield
    except InputError as error:
        errors.print(f"[bold red]error:[/] {error}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        errors.print("interrupted; nothing was written")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as error:  # noqa: BLE001 - the last line of defence for people
        if os.environ.get("ACTSCOPE_DEBUG"):
            raise
        errors.print(
            f"[bold red]internal error:[/] {type(error).__name__}: {error}\n"
            "This is a bug in actscope; re-run with ACTSCOPE_DEBUG=1 for the traceback and report it.",
            markup=True,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_INTERNAL) from None


def quiet_libraries() -> None:
    """Keep third-party progress bars and advice out of the CLI's output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not sys.warnoptions:
        import warnings

        warnings.filterwarnings("ignore", module="transformers")
