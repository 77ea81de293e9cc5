"""Checkpoints of a long run: the accumulators' state and the position in the data, one file per
process, so that an interrupted run (a crash, ``kill -9``, Ctrl-C) continues where it was and ends
with exactly the run an uninterrupted one would have written.

They live in a hidden sibling of the run directory, ``.NAME.checkpoint/rank-00000.pt`` for the run
``NAME`` (named like actscope's other temporaries, ``.NAME.tmp-…``, but never taken for one: a
later write of the run leaves it alone), each file written atomically
(:func:`~actscope.store.files.atomic_file`) and read with ``weights_only=True``. Every file
carries the run's *identity* (model weight hash, data fingerprint, sites, config, number of
processes); a resume whose identity differs is refused, naming what differs.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from actscope.errors import InputError, RunDirError
from actscope.store.files import atomic_file, remove_leftovers

FORMAT = "actscope-checkpoint"
FORMAT_VERSION = 1
_RANK_FILE = re.compile(r"^rank-(\d{5})\.pt$")
_OWN_TEMPORARY = re.compile(r"^\.rank-\d{5}\.pt\.")

# How each part of an identity is named in a refusal (config fields by their CLI flags).
_PARTS = {"model": "the model's weights (weight hash)", "data": "the data (fingerprint)", "sites": "the sites",
          "processes": "the number of processes", "kind": "the kind of job"}
_FLAGS = {"max_tokens": "--max-tokens", "batch_size": "--batch-size", "max_length": "--max-length", "k": "--top-k",
          "eps": "eps", "column": "--column", "store_dtype": "--store-dtype", "shard_bytes": "--shard-mb"}


def checkpoint_folder(out: str | os.PathLike) -> Path:
    """Where the checkpoints of the run at ``out`` live: ``.NAME.checkpoint`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.checkpoint"


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoint files of one run: this process's (``rank``) to write and read."""

    folder: Path
    rank: int
    identity: Mapping[str, Any]

    @property
    def file(self) -> Path:
        return self.folder / f"rank-{self.rank:05d}.pt"

    def exists(self) -> bool:
        """Whether any process's checkpoint of this run is there."""
        return bool(rank_files(self.folder))

    def save(self, payload: Mapping[str, Any]) -> None:
        """Write this process's checkpoint (``payload``: position, counts, ``state``) atomically."""
        import torch

        content = {"format": FORMAT, "format_version": FORMAT_VERSION, "rank": self.rank,
                   "identity": dict(self.identity), **payload}
        with atomic_file(self.file) as tmp:
            with open(tmp, "wb") as handle:
                torch.save(content, handle)

    def load(self) -> dict | None:
        """This process's checkpoint (its identity checked against ours), or None if it has none."""
        import torch

        if not self.file.is_file():
            return None
        try:
            content = torch.load(self.file, weights_only=True, map_location="cpu")
        except Exception as error:  # noqa: BLE001 - a damaged file is the user's to remove
            raise RunDirError(f"the checkpoint {self.file} cannot be read ({error}); delete {self.folder} "
                              "and start the run again without --resume") from None
        if not isinstance(content, dict) or content.get("format") != FORMAT or content.get("format_version") != FORMAT_VERSION:
            raise RunDirError(f"{self.file} is not a checkpoint this version of actscope wrote; delete {self.folder} "
                              "and start the run again without --resume")
        differ = differences(content.get("identity") or {}, self.identity)
        if differ:
            raise InputError(f"cannot resume from the checkpoint in {self.folder}: this run differs from it in "
                             f"{'; '.join(differ)}. Resume with the settings it was written with, or start over "
                             "without --resume (add --overwrite to replace the checkpoint)")
        return content

    def remove(self) -> None:
        """Delete the checkpoint files (only those actscope wrote) and the folder once empty."""
        remove_checkpoint(self.folder)


def rank_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if _RANK_FILE.match(p.name))
    except OSError:
        return []


def remove_checkpoint(folder: Path) -> None:
    """Remove actscope's checkpoint files from ``folder`` (and it, once empty); nothing else."""
    for path in rank_files(folder):
        path.unlink(missing_ok=True)
        remove_leftovers(path)
    try:
        for path in folder.iterdir():
            if _OWN_TEMPORARY.match(path.name):
                path.unlink(missing_ok=True)
        folder.rmdir()
    except OSError:
        pass


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], was: str = "checkpoint") -> list[str]:
    """What differs between two identities, each part named for people (``was``: what holds
    the saved one)."""
    found = []
    for key in sorted(set(saved) | set(current), key=lambda k: (k == "config", k)):
        before, now = saved.get(key), current.get(key)
        if before == now:
            continue
        if key == "config" and isinstance(before, Mapping) and isinstance(now, Mapping):
            for field in sorted(set(before) | set(now)):
                if before.get(field) != now.get(field):
                    found.append(f"{_FLAGS.get(field, field)} ({was}: {_shown(before.get(field))}, now: {_shown(now.get(field))})")
            continue
        found.append(f"{_PARTS.get(key, key)} ({was}: {_shown(before)}, now: {_shown(now)})")
    return found


def _shown(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"  # a sha256
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    return "none" if value is None else str(value)
