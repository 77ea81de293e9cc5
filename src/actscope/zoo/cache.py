"""The zoo's model cache: where trained models live and how they are published atomically.

Every zoo trainer (:func:`~actscope.zoo.lm.train_tiny_lm`,
:func:`~actscope.zoo.backcopy.train_backcopy`, :func:`~actscope.zoo.moe_tasks.train_moe_tasks`,
:func:`~actscope.zoo.induction.train_induction`) goes through :func:`train_cached`: a valid cached
model is reused; otherwise the model is trained into a temporary sibling directory
(``.<name>.tmp-…``, named and cleaned up as every file actscope writes: :mod:`actscope.store.files`)
on one CPU thread and renamed into place only once complete, so a reader
sees the old directory, nothing, or the complete new model, never a mixture. ``actscope_zoo.json``
(:func:`write_meta`, written last) marks a directory complete.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from actscope.errors import InputError
from actscope.store.files import give_user_mode, remove_leftovers, remove_path, temp_name

ZOO_JSON = "actscope_zoo.json"
# One intra-op thread: the models are so small that a second thread gains little on an idle
# two-core machine, but when other processes share the cores the threads' barrier waits make
# each step many times slower. One thread also keeps the result independent of the machine.
_TRAIN_THREADS = 1
_PUBLISH_TRIES = 5


def cache_root() -> Path:
    """``$ACTSCOPE_CACHE`` (default ``~/.cache/actscope``), expanded."""
    return Path(os.environ.get("ACTSCOPE_CACHE", "~/.cache/actscope")).expanduser()


def zoo_dir(name: str) -> Path:
    """``<cache>/zoo/<name>``: where the default model of a trainer lives."""
    return cache_root() / "zoo" / name


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``actscope_zoo.json`` of a trained directory, or None if missing or unreadable."""
    try:
        with open(Path(path) / ZOO_JSON, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def meta_of_kind(path: str | os.PathLike, kind: str, what: str, trainer: str) -> dict[str, Any]:
    """The ``actscope_zoo.json`` of a directory trained by ``trainer`` (its ``kind``), or ``InputError``."""
    meta = read_meta(path)
    if meta is None or meta.get("kind") != kind:
        raise InputError(f"{path} is not {what} (no valid {ZOO_JSON}); train one with {trainer}().")
    return meta


def holds_model(path: Path, version: str, config: dict[str, Any],
                files: tuple[str, ...] = ("config.json", "model.safetensors")) -> bool:
    """``path`` is complete: its ``actscope_zoo.json`` has ``version`` and ``config``, and ``files`` exist."""
    meta = read_meta(path)
    return (meta is not None and meta.get("version") == version and meta.get("config") == config
            and all((path / name).is_file() for name in files))


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Write ``actscope_zoo.json``; call it last: a directory without it never counts as a model."""
    with open(directory / ZOO_JSON, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def training_meta(kind: str, version: str, config: dict[str, Any], loss_log: list, held_out: Any,
                  started: float) -> dict[str, Any]:
    """The ``actscope_zoo.json`` record of a task model (keys in the order the cache files use)."""
    import torch
    import transformers

    return {
        "version": version, "kind": kind, "config": config, "loss_log": loss_log, "held_out": held_out,
        "train_seconds": round(time.perf_counter() - started, 2),
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
    }


def save_quietly(model: Any, directory: Path) -> None:
    """``save_pretrained`` without its progress bar (the caller's setting is restored)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def train_cached(
    out_dir: str | os.PathLike | None,
    default: Path,
    train_into: Callable[[Path], Any],
    is_valid: Callable[[Path], bool],
    *,
    caller: str,
    what: str,
    force: bool = False,
    guard: bool = True,
    looks_like_model: Callable[[Path], bool] | None = None,
) -> Path:
    """Make ``out_dir`` (``default`` when None) hold a valid model, training it if needed; return it.

    ``is_valid(path)``: ``path`` holds the requested model (reused unless ``force``).
    ``train_into(tmp)``: train and save into the empty directory ``tmp``, ``actscope_zoo.json`` last.
    With ``guard``, a non-empty ``target`` for which ``looks_like_model`` (default: it has a
    readable ``actscope_zoo.json``) is false is refused with an ``InputError`` naming ``caller``
    and saying it is "not ``what``", and left alone.
    """
    import torch

    target = Path(out_dir).expanduser() if out_dir is not None else default
    if not force and is_valid(target):
        return target
    looks_like_model = looks_like_model or (lambda path: read_meta(path) is not None)
    if guard and target.exists() and not _is_empty_dir(target) and not looks_like_model(target):
        raise InputError(f"{caller}: {target} exists and is not {what}, so it is left alone; "
                         "pass a new or empty out_dir, or remove it.")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{caller}: cannot create {parent} ({exc}); set ACTSCOPE_CACHE or pass out_dir "
                         "to a writable directory.") from exc
    remove_leftovers(target)
    tmp = parent / temp_name(target)
    tmp.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(_TRAIN_THREADS)
    try:
        train_into(tmp)
        give_user_mode(tmp)  # mkdtemp makes it private; the published model gets the umask's modes
        _publish(tmp, target, is_valid, force, caller)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish(tmp: Path, target: Path, is_valid: Callable[[Path], bool], force: bool, caller: str) -> None:
    """Rename the finished ``tmp`` into ``target``; keep a valid copy another process published.

    An invalid ``target`` (or any, with ``force``) is first renamed aside, so a reader sees
    either the old directory, nothing, or the complete new one, never a mixture.
    """
    for _ in range(_PUBLISH_TRIES):
        try:
            os.rename(tmp, target)  # atomic; also replaces an empty directory
            return
        except OSError:
            if not (target.exists() or target.is_symlink()):
                raise
        if not force and is_valid(target):
            return  # another process finished first: keep its copy
        force = False  # what appears after our replacement is a concurrent, equally good copy
        stale = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(target, stale)
        except FileNotFoundError:
            pass
        remove_path(stale)
    raise InputError(f"{caller}: could not move the trained model into {target}: the path keeps being "
                     "recreated by another process; pass a different out_dir.")
