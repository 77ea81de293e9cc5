"""One observation pass, tabulated: a model's sites observed over its data and turned into a
:class:`~actscope.run.Run` (manifest, tables, arrays) with nothing written. :func:`observe_run` is
what :func:`actscope.profile` does before it adds measurements and writes the run directory, and
what a measurement reading a run (activation sparsity) runs when it is handed a model instead.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..feeding import Limits, Progress, Source, feed
from ..models import Model
from ..run import Run
from ..sites import Plan
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

    @property
    def limits(self) -> Limits:
        return Limits(self.batch_size, self.max_length, self.max_tokens, self.column)

    def checked(self) -> "ProfileConfig":
        self.limits.checked()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"--top-k must be at least 1, got {self.k}")
        return self


def observe_run(model: Model, plan: Plan, source: Source, config: ProfileConfig, progress: Progress | None = None) -> tuple[Run, dict]:
    """Observe ``plan`` over ``source``; return the run (not saved) and the accumulators' state."""
    started, clock = _now(), time.perf_counter()
    observer = Observer(model, plan, k=config.k, eps=config.eps)
    documents, tokens = feed(observer, source, progress=progress)
    seconds = time.perf_counter() - clock
    manifest = _manifest(model, plan, source, config, documents, tokens, started, seconds)
    state = {label: stat.state_dict() for label, stat in observer.stats.items()}
    return _assemble(plan, source, observer, config, manifest), state


def _assemble(plan: Plan, source: Source, observer: Observer, config: ProfileConfig, manifest: dict) -> Run:
    from . import tables

    context = _context_fn(source, config)
    built = {
        "neurons": tables.neurons_table(plan, observer.stats, config.eps),
        "layers": tables.layers_table(plan, observer.stats, config.eps),
        "examples": tables.examples_table(plan, observer.stats, context),
    }
    heads = tables.heads_table(plan, observer.stats)
    if heads is not None:
        built["heads"] = heads
    arrays = tables.site_arrays(plan, observer.stats)
    return Run(manifest, to_arrow(built), arrays)


def _context_fn(source: Source, config: ProfileConfig):
    if source.corpus is None:
        return None
    from ..data import context_text

    def context(doc: int, pos: int) -> tuple[str, str, str]:
        return context_text(source.tokenizer, source.corpus, doc, pos, max_length=config.max_length)

    return context


def to_arrow(tables: dict[str, dict]) -> dict[str, Any]:
    import pyarrow as pa

    return {name: pa.table({k: list(v) if v.dtype == object else v for k, v in cols.items()}) for name, cols in tables.items() if cols}


def _manifest(model, plan, source, config, documents, tokens, started, seconds) -> dict:
    from dataclasses import asdict

    from ..store import library_versions, weight_hash

    corpus = source.corpus
    return {
        "kind": "profile",
        "model": {
            "name": model.name,
            "source": model.source,
            "family": model.family,
            "class": type(model.module).__name__,
            "layers": model.n_layers,
            "weight_hash": weight_hash(model.module),
        },
        "data": {
            "name": corpus.name if corpus is not None else "model inputs",
            "source": corpus.source if corpus is not None else None,
            "fingerprint": corpus.fingerprint if corpus is not None else None,
            "documents": documents,
            "tokens": tokens,
        },
        "plan": plan.to_json(),
        "config": {**asdict(config), "eps": list(config.eps), "device": str(model.device)},
        "versions": library_versions(),
        "timings": {"started": started, "seconds": round(seconds, 3), "tokens_per_second": round(tokens / max(seconds, 1e-9), 1)},
    }


def _now() -> str:
    from ..store import now_iso

    return now_iso()
