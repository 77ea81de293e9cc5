"""``profile``: the one path — model → sites → hooks → accumulators → run directory."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import InputError
from .feeding import Limits, Progress, Source, feed, source_for
from .models import Model, as_model
from .run import Run
from .sites import Plan, plan_sites
from .trace import Observer

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


def profile(
    model: Model | torch.nn.Module | str | os.PathLike | None = None,
    data: Any = None,
    *,
    sites: str | Sequence[str] | Plan | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    config: ProfileConfig | None = None,
    progress: Progress | None = None,
    device: str | None = None,
    metrics: str | Sequence[str] | None = None,
    measure_config: Any = None,
    on_metric: Callable[[str], None] | None = None,
    **options: Any,
) -> Run:
    """Observe ``sites`` of ``model`` over ``data`` and return (and optionally save) a Run.

    ``model``: a Model, any nn.Module, a Hugging Face directory, or None for the embedded
    MiniLM. ``data``: a path (text, jsonl, csv, tsv, parquet, a saved HF dataset), a list of
    strings, None for the built-in corpus, or an iterable of ready model-input dicts.
    ``options`` are ProfileConfig fields (max_tokens, batch_size, max_length, k, eps, column).
    ``metrics``: measurements to run after profiling and save beside its tables (``"all"`` or
    names from :data:`actscope.measure.MEASUREMENTS`; text data only); ``measure_config`` a
    :class:`actscope.measure.MeasureConfig`; ``on_metric(name)`` is called as each one starts.
    """
    config = (config or ProfileConfig(**options)).checked()
    model = as_model(model, device)
    plan = sites if isinstance(sites, Plan) else plan_sites(model, sites)
    source = source_for(model, data, **vars(config.limits))
    chosen = _chosen_metrics(metrics, source)
    if chosen and measure_config is not None:
        measure_config.checked()
    if out is not None:
        from .store import check_target

        check_target(Path(out), overwrite)
    started, clock = _now(), time.perf_counter()
    observer = Observer(model, plan, k=config.k, eps=config.eps)
    documents, tokens = feed(observer, source, progress=progress)
    seconds = time.perf_counter() - clock
    manifest = _manifest(model, plan, source, config, documents, tokens, started, seconds)
    run = _assemble(model, plan, source, observer, config, manifest)
    if chosen:
        run = _with_measurements(run, model, source, chosen, measure_config, on_metric)
    if out is None:
        return run
    from .store import write_run

    state = {label: stat.state_dict() for label, stat in observer.stats.items()}
    path = write_run(out, manifest=dict(run.manifest), tables=run.tables, arrays=run.arrays, state=state, overwrite=overwrite)
    return Run(run.manifest, run.tables, run.arrays, path)


def _assemble(model: Model, plan: Plan, source: Source, observer: Observer, config: ProfileConfig, manifest: dict) -> Run:
    from .metrics import tables

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
    return Run(manifest, _to_arrow(built), arrays)


def _chosen_metrics(metrics: str | Sequence[str] | None, source: Source) -> list[str]:
    """Validate the measurement names before the (long) profiling pass starts."""
    if not metrics:
        return []
    from .measure import resolve_metrics

    chosen = [m.name for m in resolve_metrics(metrics)]
    if source.corpus is None:
        raise InputError("measurements need text data (a file or a list of strings), not ready model inputs; drop metrics= or pass text")
    return chosen


def _with_measurements(run: Run, model: Model, source: Source, chosen: list[str], config: Any, on_metric: Any) -> Run:
    """The run with each measurement's tables added and its outcome in ``manifest['measurements']``."""
    from .measure import measure

    results = measure(model, source.corpus.documents, chosen, config, progress=on_metric)
    tables = dict(run.tables)
    tables.update(_to_arrow({name: _numpy_columns(cols) for r in results for name, cols in r.tables.items()}))
    outcome = {r.name: {"summary": list(r.summary), "skipped": r.skipped, "tables": list(r.tables)} for r in results}
    return Run({**run.manifest, "measurements": outcome}, tables, run.arrays)


def _numpy_columns(columns: Any) -> dict[str, Any]:
    import numpy as np

    return {key: np.asarray(value) for key, value in columns.items()}


def _context_fn(source: Source, config: ProfileConfig):
    if source.corpus is None:
        return None
    from .data import context_text

    def context(doc: int, pos: int) -> tuple[str, str, str]:
        return context_text(source.tokenizer, source.corpus, doc, pos, max_length=config.max_length)

    return context


def _to_arrow(tables: dict[str, dict]) -> dict[str, Any]:
    import pyarrow as pa

    return {name: pa.table({k: list(v) if v.dtype == object else v for k, v in cols.items()}) for name, cols in tables.items() if cols}


def _manifest(model, plan, source, config, documents, tokens, started, seconds) -> dict:
    from dataclasses import asdict

    from .store import library_versions, weight_hash

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
    from .store import now_iso

    return now_iso()
