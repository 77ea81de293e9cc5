"""``profile``: the one path — model → sites → hooks → accumulators → run directory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import InputError
from .feeding import Progress, Source, source_for
from .metrics.observed import ProfileConfig, observe_run, to_arrow
from .models import Model, as_model
from .run import Run
from .sites import Plan, plan_sites


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
    plan = plan_sites(model, sites)
    source = source_for(model, data, **vars(config.limits))
    chosen = _chosen_metrics(metrics, source)
    if chosen and measure_config is not None:
        measure_config.checked()
    if out is not None:
        from .store import check_target

        check_target(Path(out), overwrite)
    run, state = observe_run(model, plan, source, config, progress)
    if chosen:
        run = _with_measurements(run, model, source, chosen, measure_config, on_metric)
    if out is None:
        return run
    from .store import write_run

    path = write_run(out, manifest=dict(run.manifest), tables=run.tables, arrays=run.arrays, state=state, overwrite=overwrite)
    return Run(run.manifest, run.tables, run.arrays, path)


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
    tables.update(to_arrow({name: _numpy_columns(cols) for r in results for name, cols in r.tables.items()}))
    outcome = {r.name: {"summary": list(r.summary), "skipped": r.skipped, "tables": list(r.tables)} for r in results}
    return Run({**run.manifest, "measurements": outcome}, tables, run.arrays)


def _numpy_columns(columns: Any) -> dict[str, Any]:
    import numpy as np

    return {key: np.asarray(value) for key, value in columns.items()}



