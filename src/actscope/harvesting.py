"""``harvest``: the raw activations of chosen sites for every real token, written to disk as an
activation dataset (sharded safetensors files of bounded size and a manifest, see
:mod:`actscope.store.activations`) for training probes or sparse autoencoders; read it back with
:func:`actscope.open_activations`.

Memory stays at one shard whatever the number of tokens: tokens are buffered up to a shard and
flushed. Under torchrun each process harvests its share of the batches
(:func:`actscope.distributed.shard`) into its own shards of the same dataset and rank 0 writes the
manifest. An interrupted harvest resumes after each process's last complete shard (its header
records the data position after it).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .distributed import Context, agree, batch_rows, gather, rank_device, session, shard
from .errors import DataError, InputError, SiteError
from .feeding import Limits, Source, source_for, unpack
from .models import Model, ModelLike, as_model
from .sites import Plan, Site, plan_sites
from .store.activations import (
    Activations, Position, ShardWriter, clear_leftovers, open_activations, own_shards, prepare_folder, write_manifest,
)
from .trace import Tracer, flatten, split_token_id

DEFAULT_SHARD_MB = 256.0
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def harvest(
    model: ModelLike = None,
    data: Any = None,
    *,
    sites: str | Sequence[str] | Plan,
    out: str | os.PathLike,
    store_dtype: str | torch.dtype | None = None,
    shard_mb: float = DEFAULT_SHARD_MB,
    max_tokens: int | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    column: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
    device: str | None = None,
) -> Activations:
    """Write the activations of ``sites`` for every real token of ``data`` to the dataset ``out``
    and return it opened (:class:`~actscope.store.activations.Activations`).

    ``model`` and ``data`` as for :func:`actscope.profile` (batches formed the same way, padding
    left out). ``store_dtype``: the dtype written (default: each site's own, so the values are
    exactly what the model computed). ``shard_mb``: the most megabytes (10⁶ bytes) a shard file
    takes. ``resume=True`` continues an interrupted harvest of the same model, data, sites and
    options; ``overwrite=True`` replaces a dataset actscope wrote (nothing else).
    """
    limits = Limits(batch_size, max_length, max_tokens, column).checked()
    limit = _shard_bytes(shard_mb)
    dtype = _store_dtype(store_dtype)
    if sites is None:
        raise InputError("harvest needs sites=: the sites whose activations are written, e.g. 'blocks.3.mlp.post'")
    model = as_model(model, rank_device(device))
    plan = plan_sites(model, sites)
    _check_plan(plan)
    source = source_for(model, data, **vars(limits))
    if resume and source.corpus is None:
        raise InputError("resuming a harvest needs text data (a file or a list of strings), whose fingerprint identifies it")
    folder = Path(out)
    with session(model.device) as context:
        manifest = _manifest(model, plan, source, limits, dtype, limit, context)
        problem = None
        try:
            if context.main:
                prepare_folder(folder, manifest, overwrite=overwrite, resume=resume)
        except InputError as error:
            problem = error
        agree(problem, context)
        written, problem = [], None
        try:  # this process's complete shards, and where its data position is after them
            written = own_shards(folder, context.rank) if resume else []
            clear_leftovers(folder, context.rank, len(written))
        except InputError as error:
            problem = error
        agree(problem, context)
        writer = ShardWriter(folder, context.rank, len(written), limit)
        start = Position(written[-1]["next_batch"], written[-1]["next_offset"]) if written else Position()
        clock = time.perf_counter()
        try:
            _harvest(model, plan, source, context, start, writer, dtype, progress)
        except BaseException:
            writer.abandon()  # an interruption: the shard being written is finished, the rest dropped
            raise
        writer.close()
        records = gather(written + writer.written, context)
        problem = None
        try:
            if context.main:
                _finish(folder, manifest, [r for rank in records for r in rank], time.perf_counter() - clock)
        except InputError as error:
            problem = error
        agree(problem, context)  # every process returns once the manifest is there
    return open_activations(folder)


def _shard_bytes(shard_mb: Any) -> int:
    if isinstance(shard_mb, bool) or not isinstance(shard_mb, (int, float)) or not shard_mb > 0:
        raise InputError(f"--shard-mb must be a positive number of megabytes, got {shard_mb!r}; e.g. {DEFAULT_SHARD_MB:g}")
    return int(shard_mb * 1e6)


def _store_dtype(store_dtype: Any) -> torch.dtype | None:
    if store_dtype is None or isinstance(store_dtype, torch.dtype):
        return store_dtype
    if store_dtype not in _DTYPES:
        raise InputError(f"--store-dtype {store_dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[store_dtype]


def _check_plan(plan: Plan) -> None:
    """Every site must give one vector per real token of each call (the same tokens for all)."""
    for site in plan.sites:
        if site.hook.layout == "pattern":
            raise SiteError(f"{site.label} is an attention pattern ([batch, head, query, key]), which has no fixed vector per "
                            "token; harvest attn.z, attn.v or attn.out instead, or profile the pattern")
        if site.hook.layout == "tokens":
            raise SiteError(f"{site.label} holds only the tokens routed to its expert, not every token; harvest "
                            "blocks.N.mlp.* or the router (blocks.N.moe.router) instead")


class _Reader(Tracer):
    """Keeps each site's real-token rows of the current call (copied to the CPU)."""

    def __init__(self, model: Model, plan: Plan, dtype: torch.dtype | None) -> None:
        super().__init__(model, plan)
        self.dtype = dtype
        self.readings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_site(self, site: Site, value: Any, module: torch.nn.Module) -> None:
        if site.label in self.readings:
            raise SiteError(f"{site.label} ran twice in one forward call ({site.path} is called more than once); "
                            "harvest needs one tensor per site per call: choose another site")
        reading = flatten(site, value, self._batch_info(), module)
        values = reading.values.to("cpu", self.dtype or reading.values.dtype)
        if values.untyped_storage().data_ptr() == value.untyped_storage().data_ptr():
            values = values.clone()  # still the model's own tensor, which later layers may change in place
        self.readings[site.label] = (values, reading.tok)

    def take(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This call's rows per site and their token ids (the same tokens for every site)."""
        missing = [site.label for site in self.plan.sites if site.label not in self.readings]
        if missing:
            raise SiteError(f"{', '.join(missing)} did not run in the model's forward call; choose sites the forward reaches")
        first, (_, tok) = next(iter(self.readings.items()))
        for label, (_, other) in self.readings.items():
            if not torch.equal(other, tok):
                raise SiteError(f"{first} and {label} cover different tokens ({len(tok)} and {len(other)} rows); "
                                "harvest sites with one vector per token together, and others separately")
        values = {site.label: self.readings[site.label][0] for site in self.plan.sites}
        self.readings = {}
        return values, tok


def _harvest(model: Model, plan: Plan, source: Source, context: Context, start: Position, writer: ShardWriter,
             dtype: torch.dtype | None, progress: Callable[[int, int], None] | None) -> None:
    reader = _Reader(model, plan, dtype)
    device = model.device
    examples_done = 0
    with torch.no_grad(), reader.attached():
        for index, first, batch in shard(source.batches, context, start.batch, rows=batch_rows):
            call = unpack(batch, device, model)
            examples = call.examples if call.examples is not None else torch.arange(first, first + batch_rows(batch))
            reader.next_examples = examples
            model(**call.inputs)
            values, tok = reader.take()
            skip = start.offset if index == start.batch else 0  # resumed inside this batch
            doc, pos = split_token_id(tok[skip:])
            writer.add(index, index + context.world, skip, {label: v[skip:] for label, v in values.items()}, doc, pos.to(torch.int32))
            examples_done = int(examples.max()) + 1 if len(examples) else examples_done
            if progress is not None:
                progress(examples_done, (len(tok) - skip) * context.world)


def _manifest(model: Model, plan: Plan, source: Source, limits: Limits, dtype: torch.dtype | None, limit: int,
              context: Context) -> dict:
    from dataclasses import asdict

    from .store import library_versions, now_iso, weight_hash

    corpus = source.corpus
    config = {**asdict(limits), "store_dtype": str(dtype).removeprefix("torch.") if dtype else None, "shard_bytes": limit}
    weights = weight_hash(model.module)
    identity = {"kind": "harvest", "model": weights, "data": corpus.fingerprint if corpus is not None else None,
                "sites": [site.label for site in plan.sites], "config": config, "processes": context.world}
    return {
        "status": "incomplete",
        "kind": "harvest",
        "model": {"name": model.name, "source": model.source, "family": model.family, "class": type(model.module).__name__,
                  "layers": model.n_layers, "weight_hash": weights},
        "data": {"name": corpus.name if corpus is not None else "model inputs", "source": corpus.source if corpus is not None else None,
                 "fingerprint": corpus.fingerprint if corpus is not None else None},
        "plan": plan.to_json(),
        "config": {**config, "device": str(model.device)},
        "processes": context.world,
        "identity": identity,
        "versions": library_versions(),
        "timings": {"started": now_iso()},
    }


def _finish(folder: Any, manifest: dict, records: list[dict], seconds: float) -> None:
    """The complete manifest: the shards (by rank, then index), tokens, documents, sites."""
    records = sorted(records, key=lambda r: (r["rank"], r["index"]))
    tokens = sum(r["tokens"] for r in records)
    if tokens == 0:
        raise DataError("no real token was harvested; the data produced no input, or only padding (is it empty?)")
    documents = sum(r["documents"] for r in records) - sum(
        1 for a, b in zip(records, records[1:]) if a["rank"] == b["rank"] and a["last_doc"] == b["first_doc"])
    size = sum(r["bytes"] for r in records)
    timings = {**manifest["timings"], "seconds": round(seconds, 3), "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
               "bytes": size, "bytes_per_second": round(size / max(seconds, 1e-9))}
    shards = [{key: r[key] for key in ("file", "rank", "index", "tokens", "bytes", "next_batch", "next_offset")} for r in records]
    write_manifest(folder, {**manifest, "status": "complete", "data": {**manifest["data"], "documents": documents, "tokens": tokens},
                            "sites": records[0]["sites"], "shards": shards, "timings": timings})
