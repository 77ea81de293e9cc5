"""``actscope env``: what actscope runs on (versions, threads, devices, the default model)."""
from __future__ import annotations

from rich.table import Table

from .common import console, friendly_errors


def env() -> None:
    """Print library versions, devices and where the embedded default model lives."""
    with friendly_errors():
        import torch

        from ..errors import ModelLoadError
        from ..models.adapters import supported_model_types
        from ..models.loading import default_model_dir
        from ..store import library_versions

        table = Table(show_header=False, box=None)
        for name, version in library_versions().items():
            table.add_row(name, version)
        table.add_row("torch threads", str(torch.get_num_threads()))
        table.add_row("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available")
        try:
            table.add_row("default model", str(default_model_dir()))
        except ModelLoadError as error:
            table.add_row("default model", f"missing ({error})")
        table.add_row("model families", ", ".join(supported_model_types()))
        console.print(table)
