"""The Run object: what ``profile`` returns and what ``open_run`` gives back from disk."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch


@dataclass(frozen=True)
class Run:
    """A finished profiling run: its manifest, Parquet-shaped tables and arrays.

    Tables are ``pyarrow.Table`` objects (``neurons``, ``layers``, ``heads``, ``examples``);
    ``to_pandas(name)`` converts one. ``path`` is None for a run that was not saved.
    """

    manifest: Mapping[str, Any]
    tables: Mapping[str, Any]
    arrays: Mapping[str, torch.Tensor]
    path: Path | None = None

    @property
    def neurons(self) -> Any:
        return self.table("neurons")

    @property
    def layers(self) -> Any:
        return self.table("layers")

    @property
    def heads(self) -> Any:
        return self.table("heads")

    @property
    def examples(self) -> Any:
        return self.table("examples")

    def table(self, name: str) -> Any:
        from .errors import RunDirError

        if name not in self.tables:
            raise RunDirError(f"this run has no '{name}' table; it has: {', '.join(self.tables) or 'none'}")
        return self.tables[name]

    def to_pandas(self, name: str) -> Any:
        return self.table(name).to_pandas()

    def histogram(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(edges, counts) of the |activation| histogram of ``site``; counts has the zero,
        underflow and overflow bins first (see docs/run-directory.md)."""
        return self.arrays[f"hist.edges.{site}"], self.arrays[f"hist.counts.{site}"]

    def firing(self, site: str) -> torch.Tensor:
        """[criterion, units + 1]: how many tokens had n units firing (criterion 0: a > 0,
        then |a| > ε for each ε of ``manifest['config']['eps']``)."""
        return self.arrays[f"firing.{site}"]

    def layer_summary(self) -> list[dict[str, Any]]:
        return self.table("layers").to_pylist()

    def __repr__(self) -> str:
        model = self.manifest.get("model", {}).get("name", "?")
        tokens = self.manifest.get("data", {}).get("tokens", "?")
        return f"Run(model={model!r}, tokens={tokens}, tables={list(self.tables)}, path={str(self.path) if self.path else None})"

    def _repr_html_(self) -> str:
        from html import escape

        rows = "".join(
            f"<tr><td>{escape(str(r['site']))}</td><td>{r['units']}</td><td>{r['activation_ratio']:.3f}</td><td>{r['dead_units']}</td></tr>"
            for r in self.layer_summary()
        )
        head = escape(repr(self))
        return (
            f"<div><b>{head}</b><table><tr><th>site</th><th>units</th><th>activation ratio</th>"
            f"<th>dead units</th></tr>{rows}</table></div>"
        )


def open_run(path: str | os.PathLike) -> Run:
    """Read a run directory written by ``profile`` (or ``actscope profile --out``)."""
    from .store import read_run

    data = read_run(path)
    return Run(data.manifest, data.tables, data.arrays, data.path)
