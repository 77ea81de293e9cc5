"""Write a run directory atomically: build it in a hidden sibling, then rename it into place.

A run only ever appears by that rename, so a crash leaves at most a ``.<name>.tmp-*`` sibling,
which readers never look at and later writes clean up once it is a day old.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actscope.errors import RunDirError

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

MANIFEST = "manifest.json"
ARRAYS = "arrays.safetensors"
STATE = "state.pt"
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_STALE_SECONDS = 24 * 3600


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
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_contents(tmp, table_objs, array_objs, state, manifest_text)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target that write_run would refuse, before any expensive work is done."""
    if not target.exists():
        return
    if not target.is_dir():
        raise RunDirError(
            f"cannot write the run: {target} exists and is a file, not a directory; "
            "choose another --out"
        )
    if not any(target.iterdir()):
        return
    if not (target / MANIFEST).is_file():
        raise RunDirError(
            f"cannot write the run: {target} exists, is not empty and is not an actscope run "
            "(no manifest.json), so it will not be replaced even with --overwrite; "
            "choose another --out or empty that directory"
        )
    if not overwrite:
        raise RunDirError(
            f"cannot write the run: the directory {target} already exists and holds a run; "
            "pass --overwrite (overwrite=True in Python) to replace it, or choose another --out"
        )


def _checked_names(items: Mapping[str, Any], kind: str) -> list[tuple[str, Any]]:
    for name in items:
        if not isinstance(name, str) or not _NAME.match(name):
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
    full = {**manifest, "status": "complete", "format_version": FORMAT_VERSION,
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
    _fsync_dir(tmp)


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


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
    else:
        old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def _remove_stale_temps(target: Path) -> None:
    cutoff = time.time() - _STALE_SECONDS
    for leftover in target.parent.glob(f".{_glob_escape(target.name)}.tmp-*"):
        try:
            if leftover.is_dir() and leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue


def _glob_escape(text: str) -> str:
    """``text`` with glob metacharacters made literal."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _fsync_file(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    try:  # directories cannot be opened on every platform (Windows); durability is best effort
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
