"""What every command shares: the consoles, the options every model-loading command takes, and
the error → exit-code mapping.

The consoles read no markup and no emoji codes: every string they print is literal, so a path,
a site name, SQL or data-set text with brackets (``runs/q[/i]``, ``[/bold]x``) or colons prints
as written. Styling is explicit (:func:`styled`), never parsed out of text.
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.text import Text

console = Console(markup=False, emoji=False)
errors = Console(stderr=True, markup=False, emoji=False)

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1

TRUST_REMOTE_CODE_HELP = "Run the Python code a model directory ships (its config's auto_map); only for code you trust."
MODEL_HELP = "A model directory, or a Hugging Face hub id (org/name) found in the local Hugging Face cache"

# The options of every command that loads a model, defined once: :func:`model_options` adds them
# to a command.
DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:N or auto (a GPU when there is one); default: where the model loads.")
DTYPE = typer.Option(None, "--dtype", help="auto (the checkpoint's dtype), float32, bfloat16, float16 or float64; default: transformers' (the checkpoint's).")
DEVICE_MAP = typer.Option(None, "--device-map", help="Split the model over devices (needs accelerate): auto, balanced, sequential, or a JSON object of module → device, e.g. '{\"\": 0}'. Not with --device.")
REVISION = typer.Option(None, "--revision", help="Branch, tag or commit of a hub id (default: main).")
DOWNLOAD = typer.Option(False, "--download", help="Allow fetching a hub id from the Hugging Face hub into the local cache (its config, weights and tokenizer only); without it nothing reaches the network.")
TRUST_REMOTE_CODE = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)
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


def quiet_libraries(download: bool = False) -> None:
    """Keep third-party progress bars and advice out of the CLI's output, and keep the Hugging
    Face libraries offline (HF_HUB_OFFLINE=1 unless the user set it) unless ``--download`` was
    passed. Called first, before huggingface_hub is imported: it reads the variable once."""
    if not download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not sys.warnoptions:
        import warnings

        warnings.filterwarnings("ignore", module="transformers")


@dataclass(frozen=True)
class ModelOptions:
    """The shared model-loading options as one command line gave them."""

    device: str | None = None
    dtype: str | None = None
    device_map: str | None = None
    revision: str | None = None
    download: bool = False
    trust_remote_code: bool = False

    def load(self, model: str | None, **override: Any):
        """:func:`load_model` with these options (``override``: e.g. a process's own device)."""
        return load_model(model, **{**asdict(self), **override})


OPTION_DEFAULTS = {"device": DEVICE, "dtype": DTYPE, "device_map": DEVICE_MAP, "revision": REVISION, "download": DOWNLOAD,
                   "trust_remote_code": TRUST_REMOTE_CODE}
OPTION_TYPES = {"device": Optional[str], "dtype": Optional[str], "device_map": Optional[str], "revision": Optional[str],
                "download": bool, "trust_remote_code": bool}


def model_options(command: Callable) -> Callable:
    """Give ``command`` the options of every model-loading command (``--device``, ``--dtype``,
    ``--device-map``, ``--revision``, ``--download``, ``--trust-remote-code``): it declares one
    parameter ``options: ModelOptions`` instead, and :func:`quiet_libraries` runs first."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "options"]
    shared = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=OPTION_TYPES[name])
              for name, default in OPTION_DEFAULTS.items()]

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        options = ModelOptions(**{name: kwargs.pop(name) for name in OPTION_DEFAULTS})
        quiet_libraries(options.download)
        return command(*args, options=options, **kwargs)

    run.__signature__ = signature.replace(parameters=own + shared)
    run.__annotations__ = {**{p.name: p.annotation for p in own + shared}, "return": signature.return_annotation}
    return run


def load_model(
    model: str | None,
    *,
    device: str | None,
    dtype: str | None,
    device_map: str | None,
    revision: str | None,
    download: bool,
    trust_remote_code: bool,
):
    """actscope.load with the shared options as the command line gives them."""
    import actscope

    return actscope.load(model, device=device, dtype=dtype, device_map=parse_device_map(device_map), revision=revision,
                         download=download, trust_remote_code=trust_remote_code)


def parse_device_map(text: str | None) -> str | dict | None:
    """--device-map: a strategy name as it is, or a JSON object (load checks its entries)."""
    import json

    from ..errors import InputError

    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except ValueError as error:
        raise InputError(f"--device-map '{text}' is not valid JSON ({error}); give auto, or an object such as '{{\"\": 0}}'") from None
