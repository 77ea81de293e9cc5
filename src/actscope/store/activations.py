"""Activation datasets: the raw activations of chosen sites for every real token, as
:func:`actscope.harvest` writes them and :func:`open_activations` reads them back.

A dataset is a folder::

    manifest.json                          format actscope-activations, status, model, data, sites, shards
    shard-RRRRR-IIIIII.safetensors         process RRRRR's shard IIIIII

Each shard is a safetensors file of at most the shard size holding, for its tokens, one
``[tokens, units]`` tensor per site (named by the site's label), ``doc`` (int64 document number)
and ``pos`` (int32 position in the document), and ``batches`` (int64 ``[segments, 3]``: for each
run of rows, the global batch index it came from, its first row within that batch and its number
of rows). Its header metadata records where the process's data position is after it
(``next_batch``, ``next_offset``), so an interrupted harvest resumes after its last complete
shard. Shards appear by one rename (:func:`~actscope.store.files.atomic_file`); the manifest says
``status: incomplete`` until every process is done.

Reading: tokens in document order (item 0 is the first token of the first document) come from
the ``batches`` segments sorted by (batch, row), which the data's batches formed in document order.
"""
from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from actscope.errors import InputError, RunDirError
from actscope.store.files import atomic_file, check_writable, remove_leftovers, remove_path

FORMAT = "actscope-activations"
FORMAT_VERSION = 1
SHARD_FORMAT = "actscope-activations-shard"
MANIFEST = "manifest.json"
DOC, POS, BATCHES = "doc", "pos", "batches"
_SHARD = re.compile(r"^shard-(\d{5})-(\d{6})\.safetensors$")
_OWN_TEMPORARY = re.compile(r"^\.(?:shard-\d{5}-\d{6}\.safetensors|manifest\.json)\.tmp-")
_SEGMENT_BYTES = 3 * 8
_OPEN_SHARDS = 64  # shard files kept mapped per dataset object


def shard_name(rank: int, index: int) -> str:
    return f"shard-{rank:05d}-{index:06d}.safetensors"


# -- the folder -------------------------------------------------------------------------
def own_manifest(folder: Path) -> dict | None:
    """The manifest of the activation dataset at ``folder`` (format checked), or None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ours = isinstance(manifest, dict) and manifest.get("format") == FORMAT and manifest.get("format_version") == FORMAT_VERSION
    return manifest if ours else None


def check_folder(folder: Path, *, overwrite: bool, resume: bool) -> dict | None:
    """Refuse what a harvest into ``folder`` must not touch (see :func:`prepare_folder`) before
    any work; return the manifest of the dataset there, if any."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"cannot harvest into {folder}: it is a file, not a folder; choose another --out")
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    existing = own_manifest(folder) if entries else None
    if entries and existing is None:
        raise RunDirError(f"cannot harvest into {folder}: it exists, is not empty and is not an actscope activation dataset "
                          f"(no {MANIFEST} written by actscope), so nothing in it is replaced even with --overwrite; "
                          "choose another --out or empty that folder")
    complete = existing is not None and existing.get("status") == "complete"
    if resume:
        if existing is None:
            raise InputError(f"there is no interrupted harvest to resume in {folder}; run without --resume")
        if complete:
            raise InputError(f"the harvest in {folder} is complete; nothing to resume (pass --overwrite instead of --resume to harvest again)")
        return existing
    if existing is not None:
        if not overwrite:
            state = "a finished activation dataset" if complete else "an interrupted harvest (pass --resume to continue it)"
            raise RunDirError(f"cannot harvest into {folder}: it holds {state}; pass --overwrite to replace it, or choose another --out")
        _refuse_foreign_files(folder, entries)
    check_writable(folder)
    return existing


def prepare_folder(folder: Path, manifest: dict, *, overwrite: bool, resume: bool) -> None:
    """Make ``folder`` ready for a harvest with ``manifest`` (its identity): a new or empty
    folder gets the incomplete manifest; an interrupted harvest is resumed (``resume``, same
    identity) or replaced (``overwrite``); a finished one only replaced; anything that is not an
    actscope dataset, or holds files actscope did not write, is refused."""
    from actscope.store.checkpoint import differences

    existing = check_folder(folder, overwrite=overwrite, resume=resume)
    if resume:
        differ = differences(existing.get("identity") or {}, manifest["identity"], "dataset")
        if differ:
            raise InputError(f"cannot resume the harvest in {folder}: this one differs from it in {'; '.join(differ)}. "
                             "Resume with the settings it was started with, or start over with --overwrite")
        return
    if existing is not None:
        for entry in sorted(folder.iterdir()):
            remove_path(entry)
    write_manifest(folder, manifest)


def _refuse_foreign_files(folder: Path, entries: list[Path]) -> None:
    foreign = [e.name + ("/" if e.is_dir() else "") for e in entries
               if not (e.is_file() and not e.is_symlink() and (e.name == MANIFEST or _SHARD.match(e.name) or _OWN_TEMPORARY.match(e.name)))]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunDirError(f"cannot replace the activation dataset at {folder}: it also holds files actscope did not write "
                          f"({shown}), which --overwrite would delete; move them out of that folder, or choose another --out")


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    with atomic_file(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps(full, indent=2, ensure_ascii=False), encoding="utf-8")


def own_shards(folder: Path, rank: int) -> list[dict]:
    """Process ``rank``'s complete shards in ``folder``, in order, as records (file, index,
    tokens, position after it, …); only the unbroken run from shard 0 counts."""
    indices = sorted(int(m[2]) for m in (_SHARD.match(p.name) for p in _listing(folder)) if m and int(m[1]) == rank)
    records = []
    for expected, index in enumerate(indices):
        if index != expected:
            break
        records.append(shard_record(folder / shard_name(rank, index)))
    return records


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def shard_record(path: Path) -> dict:
    """What the manifest lists about a shard, from its header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            sites = {key: {"units": handle.get_slice(key).get_shape()[1], "dtype": _dtype_name(handle.get_slice(key).get_dtype())}
                     for key in handle.keys() if key not in (DOC, POS, BATCHES)}
    except (OSError, SafetensorError) as error:
        raise RunDirError(f"the shard {path} cannot be read ({error}); delete it and resume the harvest") from None
    if meta.get("format") != SHARD_FORMAT:
        raise RunDirError(f"{path} is not a shard actscope wrote; remove it from the dataset folder")
    record = {"file": path.name, "bytes": path.stat().st_size, "sites": sites}
    record.update({key: int(meta[key]) for key in _RECORDED})
    return record


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _dtype_name(code: str) -> str:
    return _DTYPES.get(code, code.lower())


# -- writing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Position:
    """Where a process is in its data: the global index of the next batch, and how many of that
    batch's real tokens are already written."""

    batch: int = 0
    offset: int = 0


class ShardWriter:
    """Buffers one process's tokens up to a shard (``limit`` bytes, header included) and writes
    each full shard at once, on a thread of its own while the next shard fills a second buffer
    (the forward passes and the disk work at the same time): memory stays at two shards whatever
    the number of tokens. :meth:`close` writes the last one and waits for the disk."""

    def __init__(self, folder: Path, rank: int, index: int, limit: int) -> None:
        self.folder, self.rank, self.index, self.limit = folder, rank, index, limit
        self.buffers: dict[str, torch.Tensor] | None = None
        self.spare: dict[str, torch.Tensor] | None = None
        self.pending: Any = None  # the shard being written (a Future)
        self.pool: Any = None
        self.rows = 0
        self.segments: list[tuple[int, int, int]] = []
        self.position = Position()
        self.written: list[dict] = []
        self.reserve = self.row_bytes = 0

    def add(self, batch: int, following: int, start: int, values: Mapping[str, torch.Tensor], doc: torch.Tensor, pos: torch.Tensor) -> None:
        """Rows ``start…`` of batch ``batch`` (``values`` per site ``[n, units]``, their ``doc`` and
        ``pos``); ``following`` is this process's next batch index."""
        n = len(doc)
        if self.buffers is None:
            self._allocate(values)
        done = 0
        while done < n:
            take = min(self._room(), n - done)
            if take <= 0:
                self.flush()
                continue
            rows = slice(self.rows, self.rows + take)
            for label, tensor in values.items():
                self.buffers[label][rows].copy_(tensor[done:done + take])
            self.buffers[DOC][rows].copy_(doc[done:done + take])
            self.buffers[POS][rows].copy_(pos[done:done + take])
            self.segments.append((batch, start + done, take))
            self.rows += take
            done += take
            self.position = Position(batch, start + done) if done < n else Position(following, 0)
            if self._room() <= 0:
                self.flush()
        if n == 0:
            self.position = Position(following, 0)

    def _allocate(self, values: Mapping[str, torch.Tensor]) -> None:
        names = [*values, DOC, POS, BATCHES]
        self.row_bytes = sum(t.shape[1] * t.element_size() for t in values.values()) + 8 + 4
        self.reserve = _header_bound(names)
        capacity = (self.limit - self.reserve - _SEGMENT_BYTES) // self.row_bytes
        if capacity < 1:
            need = (self.reserve + _SEGMENT_BYTES + self.row_bytes) / 1e6
            raise InputError(f"--shard-mb {self.limit / 1e6:g} is too small: one token of these sites takes {self.row_bytes} bytes "
                             f"and a shard's header up to {self.reserve}; give at least --shard-mb {need:.3f}")
        self.shapes = {label: ((capacity, t.shape[1]), t.dtype) for label, t in values.items()}
        self.shapes[DOC], self.shapes[POS] = ((capacity,), torch.int64), ((capacity,), torch.int32)
        self.buffers = self._new_buffers()

    def _new_buffers(self) -> dict[str, torch.Tensor]:
        return {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in self.shapes.items()}

    def _room(self) -> int:
        """Rows this shard can still take in one more segment."""
        fits = (self.limit - self.reserve - (len(self.segments) + 1) * _SEGMENT_BYTES) // self.row_bytes
        return fits - self.rows

    def flush(self) -> None:
        """Hand the buffered rows to the writer thread as the next shard (nothing when there are
        none); new rows go into the other buffer meanwhile."""
        if not self.rows:
            return
        tensors = {label: buffer[: self.rows] for label, buffer in self.buffers.items()}
        tensors[BATCHES] = torch.tensor(self.segments, dtype=torch.int64)
        docs = tensors[DOC]
        meta = {"format": SHARD_FORMAT, "version": str(FORMAT_VERSION), "rank": self.rank, "index": self.index,
                "tokens": self.rows, "documents": int(torch.unique_consecutive(docs).numel()),
                "first_doc": int(docs[0]), "last_doc": int(docs[-1]),
                "next_batch": self.position.batch, "next_offset": self.position.offset}
        self.wait()  # the previous shard is on disk: its buffer is free again
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(1, thread_name_prefix="actscope-shards")
        target = self.folder / shard_name(self.rank, self.index)
        self.pending = self.pool.submit(_write_shard, target, tensors, {key: str(value) for key, value in meta.items()}, self.limit)
        self.buffers, self.spare = self.spare if self.spare is not None else self._new_buffers(), self.buffers
        self.index += 1
        self.rows = 0
        self.segments = []

    def wait(self) -> None:
        """Wait for the shard being written (its error, if any, is raised here)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.written.append(pending.result())

    def close(self) -> None:
        """Write the last shard, wait until every shard is on disk, and stop the writer thread."""
        try:
            self.flush()
            self.wait()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Stop without another shard (an interruption): the one being written is finished, so
        that every shard on disk is complete."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


def _write_shard(target: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], size: int) -> dict:
    """Write one shard atomically and return its record (leftovers are cleared once, when the
    harvest starts, not per shard: listing the folder each time would cost O(shards))."""
    from safetensors.torch import save_file

    with atomic_file(target, size_hint=size, tidy=False) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    sites = {name: {"units": int(t.shape[1]), "dtype": str(t.dtype).removeprefix("torch.")}
             for name, t in tensors.items() if name not in (DOC, POS, BATCHES)}
    return {"file": target.name, "bytes": target.stat().st_size, "sites": sites, **{key: int(metadata[key]) for key in _RECORDED}}


_RECORDED = ("rank", "index", "tokens", "documents", "first_doc", "last_doc", "next_batch", "next_offset")


def clear_leftovers(folder: Path, rank: int, index: int) -> None:
    """Remove the temporaries a crashed harvest left for the shards process ``rank`` writes next
    (the one it was writing, and the one after it, with shards written ahead)."""
    for ahead in (index, index + 1):
        remove_leftovers(folder / shard_name(rank, ahead))


def _header_bound(names: list[str]) -> int:
    """The most bytes a shard's length prefix and JSON header can take (shapes and offsets
    counted at 20 digits each, the metadata at its widest)."""
    big = 10 ** 19
    meta = {"format": SHARD_FORMAT, "version": str(FORMAT_VERSION), **{key: str(-big) for key in (
        "rank", "index", "tokens", "documents", "first_doc", "last_doc", "next_batch", "next_offset")}}
    entry = len('{"dtype":"BF16","shape":[,],"data_offsets":[,]},') + 4 * 20
    return 8 + 8 + len(json.dumps({"__metadata__": meta})) + sum(len(json.dumps(name)) + 1 + entry for name in names)


# -- reading ------------------------------------------------------------------------------
class Activations(Dataset):
    """A harvested activation dataset as a map-style ``torch.utils.data.Dataset``: item ``i`` is
    the ``i``-th real token in document order, a dict of each site's vector (by site label,
    ``[units]``, in the stored dtype) and its ``doc`` and ``pos``. :meth:`stream` gives the same
    tokens as an iterable dataset in shuffled chunks, for training probes or sparse autoencoders.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest = _complete_manifest(self.path)
        self.sites: dict[str, dict] = dict(self.manifest["sites"])
        self.files = [self.path / shard["file"] for shard in self.manifest["shards"]]
        self.shard_tokens = [int(shard["tokens"]) for shard in self.manifest["shards"]]
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._index()

    @property
    def units(self) -> dict[str, int]:
        """Units per site."""
        return {label: int(info["units"]) for label, info in self.sites.items()}

    def _index(self) -> None:
        """Every run of rows, sorted into document order: ``(batch, row)`` → (shard, row in shard)."""
        import numpy as np

        runs = []
        for shard in range(len(self.files)):
            segments = self._columns(shard)[BATCHES].numpy().reshape(-1, 3)
            first_rows = np.concatenate([[0], np.cumsum(segments[:, 2])[:-1]]).astype(np.int64)
            runs.append(np.column_stack([segments, np.full(len(segments), shard), first_rows]))
        table = np.concatenate(runs) if runs else np.zeros((0, 5), dtype=np.int64)
        table = table[np.lexsort((table[:, 1], table[:, 0]))]
        self._runs = table  # [runs, 5]: batch, row in batch, rows, shard, first row in shard
        self._starts = np.concatenate([[0], np.cumsum(table[:, 2])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, item: int) -> dict[str, Any]:
        import numpy as np

        size = len(self)
        if not isinstance(item, (int, np.integer)) or isinstance(item, bool):
            raise TypeError(f"an activation dataset is indexed by token number (an int), not {type(item).__name__}")
        index = int(item) + size if item < 0 else int(item)
        if not 0 <= index < size:
            raise IndexError(f"token {item} is out of range: the dataset has {size} tokens")
        run = int(np.searchsorted(self._starts, index, side="right")) - 1
        shard, row = int(self._runs[run, 3]), int(self._runs[run, 4] + index - self._starts[run])
        columns = self._columns(shard)
        item_ = {label: columns[label][row].clone() for label in self.sites}
        item_[DOC], item_[POS] = int(columns[DOC][row]), int(columns[POS][row])
        return item_

    def rows(self, shard: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows ``start:stop`` of shard ``shard``, as stored: each site ``[n, units]``, ``doc``, ``pos``."""
        columns = self._columns(shard)
        return {name: columns[name][start:stop].clone() for name in (*self.sites, DOC, POS)}

    def _columns(self, shard: int) -> dict[str, torch.Tensor]:
        """The shard's tensors, memory-mapped (read on demand, private to this process)."""
        columns = self._handles.get(shard)
        if columns is None:
            columns = self._handles[shard] = mapped_shard(self.files[shard])
            while len(self._handles) > _OPEN_SHARDS:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return columns

    def __getstate__(self) -> dict:  # DataLoader workers map their own files
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state

    def stream(self, *, shuffle: bool = True, seed: int = 0, chunk: int = 4096, batch_size: int | None = None) -> "ActivationStream":
        """The tokens as an iterable dataset: chunks of ``chunk`` consecutive tokens of a shard,
        in an order shuffled by ``seed`` (and the epoch, :meth:`ActivationStream.set_epoch`),
        rows shuffled within each chunk; one token per item, or dicts of ``batch_size`` rows."""
        return ActivationStream(self, shuffle=shuffle, seed=seed, chunk=chunk, batch_size=batch_size)

    def __repr__(self) -> str:
        return f"Activations({str(self.path)!r}, tokens={len(self)}, sites={list(self.sites)})"


class ActivationStream(IterableDataset):
    """An activation dataset read in shuffled chunks (see :meth:`Activations.stream`); with a
    DataLoader of several workers, each worker reads its own share of the chunks."""

    def __init__(self, dataset: Activations, *, shuffle: bool, seed: int, chunk: int, batch_size: int | None) -> None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise InputError(f"chunk must be a whole number of tokens of at least 1, got {chunk!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise InputError(f"batch_size must be a whole number of at least 1 or None, got {batch_size!r}")
        self.dataset, self.shuffle, self.seed, self.chunk, self.batch_size = dataset, shuffle, seed, chunk, batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle differently for each epoch (the same epoch, the same order)."""
        self.epoch = epoch

    def __len__(self) -> int:
        tokens = len(self.dataset)
        return tokens if self.batch_size is None else -(-tokens // self.batch_size)

    def _chunks(self) -> list[tuple[int, int, int]]:
        chunks = [(shard, start, min(start + self.chunk, rows))
                  for shard, rows in enumerate(self.dataset.shard_tokens) for start in range(0, rows, self.chunk)]
        if self.shuffle:
            order = torch.randperm(len(chunks), generator=self._generator(0)).tolist()
            chunks = [chunks[i] for i in order]
        worker = get_worker_info()
        return chunks if worker is None else chunks[worker.id::worker.num_workers]

    def _generator(self, salt: int) -> torch.Generator:
        mixed = (self.seed * 6364136223846793005 + self.epoch * 1442695040888963407 + salt) % (1 << 63)
        return torch.Generator().manual_seed(mixed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        names = (*self.dataset.sites, DOC, POS)
        pending: list[dict[str, torch.Tensor]] = []
        held = 0
        for shard, start, stop in self._chunks():
            columns = self.dataset._columns(shard)
            if self.shuffle:  # a copy, in a shuffled order
                order = torch.randperm(stop - start, generator=self._generator(1 + shard * 1_000_003 + start)) + start
                part = {name: columns[name].index_select(0, order) for name in names}
            else:
                part = {name: columns[name][start:stop].clone() for name in names}
            if self.batch_size is None:
                for row in range(stop - start):
                    item = {label: part[label][row] for label in self.dataset.sites}
                    item[DOC], item[POS] = int(part[DOC][row]), int(part[POS][row])
                    yield item
                continue
            pending.append(part)
            held += stop - start
            while held >= self.batch_size:
                joined = {name: torch.cat([p[name] for p in pending]) for name in names}
                yield {name: tensor[: self.batch_size] for name, tensor in joined.items()}
                rest = {name: tensor[self.batch_size:] for name, tensor in joined.items()}
                held -= self.batch_size
                pending = [rest] if held else []
        if pending and held:
            yield {name: torch.cat([p[name] for p in pending]) for name in names}


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
                 "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def mapped_shard(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of one copy-on-write memory map: pages are
    read when used, and nothing written to a view reaches the file."""
    import mmap
    import struct

    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(length)) if 8 + length <= size else None
            memory = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError, struct.error) as error:
        raise RunDirError(f"the shard {path} cannot be read ({error}); the dataset is damaged") from None
    if not isinstance(header, dict):
        raise RunDirError(f"the shard {path} has no valid safetensors header; the dataset is damaged")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype, shape = _TORCH_DTYPES.get(entry["dtype"]), entry["shape"]
        if dtype is None or not 0 <= begin <= end <= size - 8 - length:
            raise RunDirError(f"the shard {path} has an unreadable tensor {name!r}; the dataset is damaged")
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(memory, dtype=dtype, count=count, offset=8 + length + begin) if count else torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(shape)
    return tensors


def _complete_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise RunDirError(f"there is no activation dataset at {path}: no such folder; harvest one with actscope harvest … --out {path}")
    manifest = own_manifest(path)
    if manifest is None:
        raise RunDirError(f"{path} is not an actscope activation dataset (no {MANIFEST} written by actscope harvest)")
    if manifest.get("status") != "complete":
        raise RunDirError(f"the harvest in {path} was interrupted (status {manifest.get('status')!r}); finish it by running "
                          "the same actscope harvest command with --resume")
    missing = [shard["file"] for shard in manifest.get("shards", []) if not (path / shard["file"]).is_file()]
    if missing:
        raise RunDirError(f"the activation dataset at {path} is damaged: {len(missing)} shard(s) are missing ({', '.join(missing[:3])})")
    return manifest


def open_activations(path: str | os.PathLike) -> Activations:
    """The activation dataset :func:`actscope.harvest` wrote at ``path`` (see :class:`Activations`)."""
    return Activations(path)
