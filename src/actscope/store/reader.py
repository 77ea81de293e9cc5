"""Read a run directory written by :func:`actscope.store.write_run`."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actscope.errors import RunDirError
from actscope.store.writer import ARRAYS, FORMAT, FORMAT_VERSION, MANIFEST, NAME, STATE

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    import torch


@dataclass(frozen=True, repr=False)
class RunData:
    """A finished run: its manifest, its Parquet tables and its arrays."""

    path: Path
    manifest: dict
    tables: dict[str, "pa.Table"]
    arrays: dict[str, "torch.Tensor"]

    def table(self, name: str) -> "pa.Table":
        """The table ``name``; a RunDirError lists the available ones if there is none."""
        return _lookup(self.tables, name, "table", self.path)

    def array(self, name: str) -> "torch.Tensor":
        """The array ``name``; a RunDirError lists the available ones if there is none."""
        return _lookup(self.arrays, name, "array", self.path)

    def to_pandas(self, name: str) -> "pd.DataFrame":
        """The table ``name`` as a pandas DataFrame (needs pandas installed)."""
        table = self.table(name)
        try:
            return table.to_pandas()
        except ImportError as err:
            raise RunDirError(
                f"cannot convert table {name!r} of {self.path} to pandas: {err}; "
                "install pandas (pip install pandas) or use the pyarrow table from .table()"
            ) from err

    def state(self) -> dict | None:
        """The saved accumulator state (loaded from ``state.pt`` on each call), or None."""
        import torch

        file = self.path / STATE
        if not file.is_file():
            return None
        try:
            return torch.load(file, weights_only=True, map_location="cpu")
        except Exception as err:
            raise _damaged(self.path, f"state.pt cannot be loaded ({err})") from err

    def __repr__(self) -> str:
        return (f"RunData(path={str(self.path)!r}, tables={list(self.tables)}, "
                f"arrays={list(self.arrays)}, status={self.manifest.get('status')!r})")


def read_run(path: str | os.PathLike) -> RunData:
    """Open the complete run directory at ``path``; RunDirError says what is wrong and the fix."""
    root = Path(path)
    manifest = _read_manifest(root)
    tables = {name: _read_table(root, name) for name in manifest.get("tables", [])}
    return RunData(path=root, manifest=manifest, tables=tables,
                   arrays=_read_arrays(root, manifest.get("arrays", [])))


def _read_manifest(root: Path) -> dict:
    if not root.exists():
        raise RunDirError(
            f"no run directory at {root}; run `actscope profile ... --out {root}` first"
        )
    if not root.is_dir():
        raise RunDirError(f"{root} is a file, not a run directory; pass the directory "
                          "given to `actscope profile --out`")
    if not (root / MANIFEST).is_file():
        raise RunDirError(f"{root} is not an actscope run (no manifest.json); pass a directory "
                          "written by `actscope profile --out`")
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(root, f"manifest.json cannot be read ({err})") from err
    if not isinstance(manifest, dict):
        raise _damaged(root, "manifest.json does not hold a JSON object")
    _check_format(root, manifest)
    if manifest.get("status") != "complete":
        raise RunDirError(
            f"the run at {root} did not finish (status: {manifest.get('status')!r}); "
            f"re-run `actscope profile ... --out {root} --overwrite`"
        )
    _check_contents(root, manifest)
    return manifest


def _check_format(root: Path, manifest: dict) -> None:
    # Runs written before the format name was recorded carry only format_version 1.
    name, version = manifest.get("format", FORMAT), manifest.get("format_version")
    if name != FORMAT:
        raise RunDirError(f"{root} is not an actscope run (its {MANIFEST} says format {name!r}); "
                          "pass a directory written by `actscope profile --out`")
    if version != FORMAT_VERSION:
        raise RunDirError(
            f"the run at {root} has format version {version!r}, and this actscope {_version()} reads "
            f"version {FORMAT_VERSION}; open it with the actscope that wrote it, or re-run the profile"
        )


def _check_contents(root: Path, manifest: dict) -> None:
    """Table and array lists of plain names: a manifest never points outside its run."""
    for key, plain in (("tables", NAME.match), ("arrays", bool)):
        names = manifest.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) and plain(n) for n in names):
            raise _damaged(root, f"its {key} list {names!r:.200} holds something other than plain names "
                                 "(letters, digits, '_', '.', '-'; no paths)")


def _version() -> str:
    from actscope.store.manifest import library_versions

    return library_versions()["actscope"]


def _read_table(root: Path, name: str) -> "pa.Table":
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = root / f"{name}.parquet"
    if not file.is_file():
        raise _damaged(root, f"table {name!r} is listed in manifest.json but {file.name} "
                             "is missing")
    try:
        return pq.read_table(file, memory_map=True)
    except (OSError, pa.ArrowException) as err:
        raise _damaged(root, f"table {name!r} ({file.name}) cannot be read ({err})") from err


def _read_arrays(root: Path, names: list[str]) -> dict[str, "torch.Tensor"]:
    if not names:
        return {}
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = root / ARRAYS
    try:
        arrays = load_file(file)
    except (OSError, SafetensorError) as err:
        raise _damaged(root, f"{ARRAYS} cannot be read ({err})") from err
    missing = [name for name in names if name not in arrays]
    if missing:
        raise _damaged(root, f"arrays {missing} are listed in manifest.json but not in {ARRAYS}")
    return {name: arrays[name] for name in names}


def _lookup(items: dict[str, Any], name: str, kind: str, root: Path) -> Any:
    if name not in items:
        available = ", ".join(repr(key) for key in items) or "none"
        raise RunDirError(f"the run at {root} has no {kind} {name!r}; available {kind}s: "
                          f"{available}")
    return items[name]


def _damaged(root: Path, what: str) -> RunDirError:
    return RunDirError(f"the run at {root} is damaged: {what}; "
                       f"re-run `actscope profile ... --out {root} --overwrite`")
