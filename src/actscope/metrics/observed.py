"""One observation pass, tabulated: a model's sites observed over its data and turned into a
:class:`~actscope.run.Run` (manifest, tables, arrays) with nothing written. :func:`observe_run` is
what :func:`actscope.profile` does before it adds measurements and writes the run directory, and
what a measurement reading a run (activation sparsity) runs when it is handed a model instead.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..distributed import SINGLE, Context, all_gather, batch_rows, broadcast, from_state, gather, merge_states, shard
from ..errors import DataError, InputError
from ..feeding import Limits, Progress, Source, unpack
from ..models import Model
from ..run import Run
from ..sites import Plan
from ..store.checkpoint import Checkpoints
from ..trace import Observer

DEFAULT_K = 8


@dataclass(frozen=True)
class ProfileConfig:
    """Everything that shapes a run, recorded in its manifest."""

    max_tokens: int | None = None
    batch_size: int = 8
    max_length: int = 128
    k: int = DEFAULT_K
    eps: tuple[float, ...] = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
    column: str | None = None
    pages: bool = True  # unit pages: activation windows, quantile samples, histograms, co-firing
    spatial: str = "positions"  # feature maps and patches: every position a row, or per image its max/mean

    @property
    def page_config(self) -> Any:
        from ..stats.pages import PageConfig

        return PageConfig() if self.pages else None

    @property
    def limits(self) -> Limits:
        return Limits(self.batch_size, self.max_length, self.max_tokens, self.column)

    def checked(self) -> "ProfileConfig":
        self.limits.checked()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"--top-k must be at least 1, got {self.k}")
        if not isinstance(self.pages, bool):
            raise InputError(f"pages must be True or False (--unit-pages / --no-unit-pages), got {self.pages!r}")
        from ..trace import checked_spatial

        checked_spatial(self.spatial)
        return self


def observe_run(model: Model, plan: Plan, source: Source, config: ProfileConfig, progress: Progress | None = None, *,
                context: Context = SINGLE, checkpoints: Checkpoints | None = None, every: int | None = None,
                resumed: Mapping[str, Any] | None = None, weights: str | None = None) -> tuple[Run, dict | None]:
    """Observe ``plan`` over ``source``; return the run (not saved) and the accumulators' state.

    Under torchrun (``context``) this process observes its share of the batches
    (:func:`actscope.distributed.shard`) and the accumulators are merged on rank 0, which
    assembles the run; every process returns that run, and rank 0 alone the merged state (None
    elsewhere). With ``checkpoints`` and ``every`` (tokens), this process's accumulators and data
    position are saved after every ``every`` tokens it observed; ``resumed`` (a checkpoint's
    content) continues from one. ``weights``: the model's weight hash when already known.
    """
    started, clock = _now(), time.perf_counter()
    observer = Observer(model, plan, k=config.k, eps=config.eps, pages=config.page_config, spatial=config.spatial)
    done = _Done.restored(observer, resumed)
    _observe(observer, source, context, done, progress, _Saver(checkpoints, every, done, clock))
    merging = time.perf_counter()
    documents, tokens = (sum(parts) for parts in zip(*all_gather((done.documents, done.tokens), context)))
    if tokens == 0:
        error = DataError("no real token was observed; the data produced no input, or only padding (is it empty?)")
        error.quiet = not context.main
        raise error
    if done.tokens:
        _check_all_ran(plan, observer)
    states = {label: stat.state_dict() for label, stat in observer.stats.items()}
    stats = merge_states(gather(states, context) or []) if context.distributed else observer.stats
    seconds = done.seconds + time.perf_counter() - clock
    run = state = None
    if context.main:
        timings = {"merge_seconds": round(time.perf_counter() - merging, 3)} if context.distributed else {}
        state = {label: stat.state_dict() for label, stat in stats.items()} if context.distributed else states
        manifest = _manifest(model, plan, source, config, documents, tokens, started, seconds, weights, context, timings)
        run = _assemble(plan, source, stats, config, manifest)
    return broadcast(run, context), state


def _check_all_ran(plan: Plan, observer: Observer) -> None:
    """A module site whose module never ran (a tied embedding reached through another module, a
    branch these inputs do not take, an expert no token was routed to) has no rows in the run: say
    so, naming it, rather than leave it missing without a word (the other sites' rows are kept)."""
    silent = [site.label for site in plan.sites if site.name.startswith("module:") and site.label not in observer.stats]
    if silent:
        logging.getLogger("actscope").warning(
            "%s: the module never ran in %s's forward passes, so the run has no rows for it (a weight shared with a "
            "module that does run, or a branch these inputs do not take); `actscope sites` gives a shape to the "
            "modules that run", ", ".join(silent), observer.model.name)


@dataclass
class _Done:
    """How far this process is: the next batch index to consider, what it observed so far."""

    position: int = 0
    documents: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @classmethod
    def restored(cls, observer: Observer, resumed: Mapping[str, Any] | None) -> "_Done":
        if not resumed:
            return cls()
        observer.stats.update({label: from_state(state) for label, state in resumed["state"].items()})
        return cls(int(resumed["position"]), int(resumed["documents"]), int(resumed["tokens"]), float(resumed["seconds"]))


@dataclass
class _Saver:
    """Writes this process's checkpoint after every ``every`` tokens it observed."""

    checkpoints: Checkpoints | None
    every: int | None
    done: _Done
    clock: float
    since: int = 0

    def after(self, observer: Observer, tokens: int) -> None:
        if self.checkpoints is None or not self.every:
            return
        self.since += tokens
        if self.since < self.every:
            return
        self.since = 0
        done = self.done
        self.checkpoints.save({
            "kind": "profile", "position": done.position, "documents": done.documents, "tokens": done.tokens,
            "seconds": done.seconds + time.perf_counter() - self.clock, "every": self.every,
            "state": {label: stat.state_dict() for label, stat in observer.stats.items()},
        })


def _observe(observer: Observer, source: Source, context: Context, done: _Done, progress: Progress | None, saver: _Saver) -> None:
    """Feed this process's batches (from ``done.position`` on) through the observer's hooks,
    telling it each call's global example numbers."""
    model = observer.model
    device = model.device
    if progress is not None and done.tokens:
        progress(done.documents, done.tokens)  # a resumed run starts where it was
    with torch.no_grad(), observer.attached():
        for index, first, batch in shard(source.batches, context, done.position, rows=batch_rows):
            call = unpack(batch, device, model)
            examples = call.examples if call.examples is not None else torch.arange(first, first + batch_rows(batch))
            observer.next_examples = examples
            model(**call.inputs)
            done.documents += len(call.examples) if call.examples is not None else 1
            done.tokens += call.tokens
            done.position = index + 1
            if progress is not None:
                progress(_examples_done(done, examples, context), call.tokens * context.world)
            saver.after(observer, call.tokens)


def _examples_done(done: _Done, examples: torch.Tensor, context: Context) -> int:
    """For a progress bar: this process's examples, or, with several processes, how far into
    the data this one is (they advance together)."""
    if not context.distributed:
        return done.documents
    return int(examples.max()) + 1 if len(examples) else done.documents


def _assemble(plan: Plan, source: Source, stats: Mapping[str, Any], config: ProfileConfig, manifest: dict) -> Run:
    from . import tables

    context = _context_fn(source, config)
    built = {
        "neurons": tables.neurons_table(plan, stats, config.eps),
        "layers": tables.layers_table(plan, stats, config.eps),
        "examples": tables.examples_table(plan, stats, context),
    }
    heads = tables.heads_table(plan, stats)
    if heads is not None:
        built["heads"] = heads
    built.update(_page_tables(plan, stats, context, _pieces_fn(source, config), built["examples"]))
    arrays = tables.site_arrays(plan, stats)
    return Run(manifest, to_arrow(built), arrays)


def _page_tables(plan: Plan, stats: Mapping[str, Any], context: Any, pieces: Any, examples: dict) -> dict[str, dict]:
    """The unit pages' tables (metrics/unit_pages.py); the examples table gains its windows."""
    from . import unit_pages

    if not unit_pages.page_sites(plan, stats):
        return {}
    examples.update(unit_pages.window_columns(plan, stats, examples))
    samples = unit_pages.samples_table(plan, stats, context)
    return {"samples": samples, "unit_hist": unit_pages.unit_hist_table(plan, stats),
            "cofiring": unit_pages.cofiring_table(plan, stats), "tokens": unit_pages.tokens_table(examples, samples, pieces)}


def _pieces_fn(source: Source, config: ProfileConfig):
    if source.corpus is None:
        return None
    from ..data import token_pieces

    return lambda doc: token_pieces(source.tokenizer, source.corpus, doc, max_length=config.max_length)


def _context_fn(source: Source, config: ProfileConfig):
    if source.corpus is None:
        return None
    from ..data import context_text

    def context(doc: int, pos: int) -> tuple[str, str, str]:
        return context_text(source.tokenizer, source.corpus, doc, pos, max_length=config.max_length)

    return context


def to_arrow(tables: dict[str, dict]) -> dict[str, Any]:
    import pyarrow as pa

    def column(values: Any) -> Any:  # numpy columns; a pyarrow array (list columns) as it is
        return values if isinstance(values, pa.Array) else list(values) if values.dtype == object else values

    return {name: pa.table({k: column(v) for k, v in cols.items()}) for name, cols in tables.items() if cols}


def _manifest(model, plan, source, config, documents, tokens, started, seconds, weights=None, context=SINGLE, timings=None) -> dict:
    from dataclasses import asdict

    from ..store import library_versions, weight_hash

    corpus = source.corpus if source.corpus is not None else source.images
    return {
        "kind": "profile",
        "model": {
            "name": model.name,
            "source": model.source,
            "family": model.family,
            "class": type(model.module).__name__,
            "layers": model.n_layers,
            "weight_hash": weights or weight_hash(model.module),
        },
        "data": {
            "name": getattr(corpus, "name", None) or getattr(corpus, "source", None) if corpus is not None else "model inputs",
            "source": corpus.source if corpus is not None else None,
            "fingerprint": corpus.fingerprint if corpus is not None else None,
            "documents": documents,
            "tokens": tokens,
        },
        "plan": plan.to_json(),
        "config": {**asdict(config), "eps": list(config.eps), "device": str(model.device)},
        "versions": library_versions(),
        "processes": context.world,
        "timings": {"started": started, "seconds": round(seconds, 3), "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
                    **(timings or {})},
    }


def _now() -> str:
    from ..store import now_iso

    return now_iso()
