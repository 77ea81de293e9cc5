"""Write a run directory atomically: build it in a hidden sibling, then rename it into place.

A run only ever appears by that rename (:func:`actscope.store.files.atomic_directory`), so a
crash leaves at most a ``.<name>.tmp-*`` sibling, which readers never look at and later writes
remove once its process is gone. Only a directory that holds an actscope run (its manifest's
format name and version checked) and nothing else is ever replaced.
"""
from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actscope.errors import RunDirError
from actscope.store.files import atomic_directory, check_writable

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

MANIFEST = "manifest.json"
ARRAYS = "arrays.safetensors"
STATE = "state.pt"
REPORT = "report.html"  # the run's own report (actscope.report writes it)
REPORT_MARKER = '<meta name="generator" content="actscope-report">'  # at the start of every report
_MARKER_WINDOW = 4096
# Pages of actscope 0.1.0 had no marker but always began so (`actscope report` on an older run
# must still rewrite its report.html); a user's own file does not start with a script hash.
_UNMARKED_START = (b'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta http-equiv='
                   b'"Content-Security-Policy" content="default-src \'none\'; script-src \'sha256-')
_UNMARKED_TITLE = "<title>actscope report · ".encode("utf-8")
FORMAT = "actscope-run"
FORMAT_VERSION = 1
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_OWN_TEMPORARY = re.compile(r"^\..+\.tmp-")  # a crashed write of one of the run's own files


def write_run(
    path: str | os.PathLike,
    *,
    manifest: dict,
    tables: Mapping[str, Any],
    arrays: Mapping[str, "torch.Tensor"] | None = None,
    state: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete run directory at ``path`` and return it.

    ``tables`` maps a name to a ``pyarrow.Table`` or a dict of 1-D columns (lists or arrays);
    each becomes ``<name>.parquet``. ``arrays`` go into one ``arrays.safetensors``; ``state``
    (tensors, numbers, strings, lists, dicts) into ``state.pt``. ``manifest.json`` is written
    last with ``status``, ``format_version``, ``tables`` and ``arrays`` set.
    """
    target = Path(path)
    check_target(target, overwrite)
    table_objs = {name: _to_arrow(name, table) for name, table in _checked_names(tables, "table")}
    array_objs = dict(_checked_array_names(arrays or {}))
    manifest_text = _manifest_text(target, manifest, list(table_objs), list(array_objs))
    size = sum(t.nbytes for t in table_objs.values()) + sum(_nbytes(a) for a in array_objs.values())
    with atomic_directory(target, size_hint=size) as tmp:
        _write_contents(tmp, table_objs, array_objs, state, manifest_text)
    return target


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target that write_run would refuse, before any expensive work is done: a file,
    a folder that is not an actscope run, a run without ``overwrite``, a run holding files
    actscope did not write (``overwrite`` would delete them), or a place that cannot be written."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise RunDirError(
            f"cannot write the run: {target} exists and is a file, not a directory; "
            "choose another --out"
        )
    try:
        entries = sorted(target.iterdir()) if target.is_dir() else []
    except OSError as error:
        raise RunDirError(f"cannot write the run: {target} cannot be read ({error.strerror or error}); choose another --out") from None
    if entries:
        manifest = own_manifest(target)
        if manifest is None:
            raise RunDirError(
                f"cannot write the run: {target} exists, is not empty and is not an actscope run "
                f"(no {MANIFEST} written by actscope), so it will not be replaced even with --overwrite; "
                "choose another --out or empty that directory"
            )
        if not overwrite:
            raise RunDirError(
                f"cannot write the run: the directory {target} already exists and holds a run; "
                "pass --overwrite (overwrite=True in Python) to replace it, or choose another --out"
            )
        _refuse_foreign_files(target, entries, manifest)
    check_writable(target)


def own_manifest(root: Path) -> dict | None:
    """The manifest of the actscope run at ``root`` (format name and version checked), or None."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ours = isinstance(manifest, dict) and manifest.get("format") == FORMAT and manifest.get("format_version") == FORMAT_VERSION
    return manifest if ours else None


def run_files(manifest: dict) -> set[str]:
    """The names of the files an actscope run with ``manifest`` consists of."""
    tables = manifest.get("tables") if isinstance(manifest.get("tables"), list) else []
    return {MANIFEST, ARRAYS, STATE, REPORT} | {f"{name}.parquet" for name in tables if isinstance(name, str)}


def is_actscope_report(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file that starts like a page actscope's report wrote (its
    marker in the first few KB, or the start of an unmarked 0.1.0 page); a link or a fifo is
    never one, and a fifo is never opened."""
    path = Path(path)
    try:
        if path.is_symlink() or not stat.S_ISREG(path.stat().st_mode):
            return False
        with open(path, "rb") as handle:
            head = handle.read(_MARKER_WINDOW)
    except OSError:
        return False
    return REPORT_MARKER.encode("ascii") in head or (head.startswith(_UNMARKED_START) and _UNMARKED_TITLE in head)


def _refuse_foreign_files(target: Path, entries: list[Path], manifest: dict) -> None:
    own = run_files(manifest)
    foreign = [e.name + ("/" if e.is_dir() else "") for e in entries
               if not _is_own_file(e, own) and not _OWN_TEMPORARY.match(e.name)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunDirError(
            f"cannot replace the run at {target}: it also holds files actscope did not write ({shown}), "
            "which --overwrite would delete; move them out of that directory, or choose another --out"
        )


def _is_own_file(entry: Path, own: set[str]) -> bool:
    if entry.name == REPORT:  # a user's own report.html is theirs, whatever its name
        return is_actscope_report(entry)
    return entry.name in own and entry.is_file() and not entry.is_symlink()


def _checked_names(items: Mapping[str, Any], kind: str) -> list[tuple[str, Any]]:
    for name in items:
        if not isinstance(name, str) or not NAME.match(name):
            raise RunDirError(
                f"invalid {kind} name {name!r}: it must be a plain string of letters, digits, "
                "'_', '.' or '-' (not starting with '.' or '-'); rename it"
            )
    return list(items.items())


def _checked_array_names(items: Mapping[str, Any]) -> list[tuple[str, Any]]:
    # Array names are safetensors keys, not file names: any non-empty string (site labels
    # such as "blocks.3.mlp.post[17,42]" or "module:fc1@output" included).
    for name in items:
        if not isinstance(name, str) or not name:
            raise RunDirError(f"invalid array name {name!r}: it must be a non-empty string")
    return list(items.items())


def _to_arrow(name: str, table: Any) -> "pa.Table":
    import pyarrow as pa

    if isinstance(table, pa.Table):
        return table
    if not isinstance(table, Mapping):
        raise RunDirError(
            f"table {name!r} is a {type(table).__name__}; pass a pyarrow.Table or a dict "
            "mapping column names to 1-D lists or arrays"
        )
    columns = {col: _to_column(name, col, values) for col, values in table.items()}
    try:
        return pa.table(columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise RunDirError(f"table {name!r} cannot be built: {err}; give every column "
                          "the same length and one type") from err


def _to_column(table: str, col: Any, values: Any) -> Any:
    import numpy as np

    if not isinstance(col, str):
        raise RunDirError(
            f"table {table!r} has a column named {col!r} ({type(col).__name__}); "
            "column names must be plain strings"
        )
    if hasattr(values, "detach"):
        values = _tensor_to_numpy(values)
    if isinstance(values, np.ndarray) and values.ndim != 1:
        raise RunDirError(
            f"column {col!r} of table {table!r} has shape {values.shape}; table columns must "
            "be 1-D (one row per unit); put larger arrays in `arrays` instead"
        )
    return values


def _tensor_to_numpy(tensor: "torch.Tensor") -> Any:
    tensor = tensor.detach().to("cpu")
    if tensor.dtype.is_floating_point and tensor.element_size() < 4:
        tensor = tensor.float()  # numpy has no bfloat16; float32 holds every value exactly
    return tensor.numpy()


def _manifest_text(target: Path, manifest: dict, tables: list[str], arrays: list[str]) -> str:
    full = {**manifest, "status": "complete", "format": FORMAT, "format_version": FORMAT_VERSION,
            "tables": tables, "arrays": arrays}
    try:
        return json.dumps(full, indent=2, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise RunDirError(
            f"the manifest for {target} cannot be written as JSON: {err}; "
            "use only str, int, float, bool, None, lists and dicts with string keys"
        ) from err


def _write_contents(
    tmp: Path, tables: dict, arrays: dict, state: dict | None, manifest: str
) -> None:
    import pyarrow.parquet as pq

    for name, table in tables.items():
        pq.write_table(table, tmp / f"{name}.parquet")
        _fsync_file(tmp / f"{name}.parquet")
    if arrays:
        _write_arrays(tmp / ARRAYS, arrays)
    if state is not None:
        _write_state(tmp / STATE, state)
    with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
        f.write(manifest)
        f.flush()
        os.fsync(f.fileno())


def _write_arrays(file: Path, arrays: dict) -> None:
    import torch
    from safetensors.torch import save_file

    prepared: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in arrays.items():
        tensor = torch.as_tensor(value).detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory; copy the second and later sharers.
        prepared[name] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    save_file(prepared, file)
    _fsync_file(file)


def _write_state(file: Path, state: dict) -> None:
    import pickle

    import torch

    with open(file, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    try:  # fail now, not when the run is resumed: readers load with weights_only=True
        torch.load(file, weights_only=True, map_location="cpu", mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise RunDirError(
            f"the accumulator state cannot be saved safely: {err}; "
            "keep state to tensors, numbers, strings, lists, tuples and dicts"
        ) from err


def _fsync_file(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _nbytes(value: Any) -> int:
    return int(value.numel() * value.element_size()) if hasattr(value, "element_size") else 0
