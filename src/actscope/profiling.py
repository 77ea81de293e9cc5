"""``profile``: the one path — model → sites → hooks → accumulators → run directory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .distributed import SINGLE, Context, agree, rank_device, session
from .errors import InputError
from .feeding import Progress, Source, source_for
from .metrics.observed import ProfileConfig, observe_run, to_arrow
from .models import Model, as_model
from .run import Run
from .sites import Plan, plan_sites
from .store.checkpoint import Checkpoints, checkpoint_folder, rank_files, remove_checkpoint


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
    checkpoint_every: int | None = None,
    resume: bool = False,
    sae: Any = None,
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

    ``checkpoint_every``: save the accumulators and the position in the data after every that
    many tokens (per process) beside ``out`` (``.NAME.checkpoint``); ``resume=True`` continues
    an interrupted run from there (same model, data, sites, config and number of processes, or
    it is refused) and ends with exactly the run an uninterrupted one writes. Both need ``out``
    and text data.

    Under torchrun (``torchrun --nproc_per_node N script.py``) each process observes its share of
    the batches and the accumulators are merged: the run equals one process's. Every process
    returns it; rank 0 alone runs the measurements (on all the data) and writes ``out``.

    ``sae``: sparse autoencoders or transcoders to profile (a SAELens folder, a loaded
    :class:`actscope.sae.SAE`, ``"DIR@SITE"``, or a list): their features become sites
    (``blocks.3.resid.post.sae``, see :func:`actscope.sae.attach`) observed like any other (with
    ``sites=None``, only they), and the run gets an ``sae`` table of reconstruction quality
    (:func:`actscope.sae.reconstruction`) and the features' decoded tokens (``decode``).
    """
    config = (config or ProfileConfig(**options)).checked()
    _check_checkpointing(checkpoint_every, resume, out)
    model = as_model(model, rank_device(device))
    plan, features = plan_with_saes(model, sites, sae)
    source = source_for(model, data, **vars(config.limits))
    chosen = _chosen_metrics(metrics, source)
    if chosen and measure_config is not None:
        measure_config.checked()
    if (checkpoint_every or resume) and source.corpus is None:
        raise InputError("checkpoints need text data (a file or a list of strings), whose fingerprint identifies it; "
                         "model-input dicts cannot be checked on resume, so drop checkpoint_every and resume")
    with session(model.device) as context:
        weights, checkpoints, resumed = _prepare(model, plan, source, config, out, overwrite, checkpoint_every, resume, context)
        every = checkpoint_every or (resumed or {}).get("every")
        run, state = observe_run(model, plan, source, config, progress, context=context, checkpoints=checkpoints,
                                 every=every, resumed=resumed, weights=weights)
    if not context.main:
        return run
    if source.images is not None:
        run = _with_images(run, model, plan, source.images, config)
    if features:
        run = _with_sae_quality(run, model, source, data, features, config)
    if chosen:
        run = _with_measurements(run, model, source, chosen, measure_config, on_metric, context)
    if out is None:
        return run
    from .store import write_run

    path = write_run(out, manifest=dict(run.manifest), tables=run.tables, arrays=run.arrays, state=state, overwrite=overwrite)
    if checkpoints is not None:
        checkpoints.remove()
    return Run(run.manifest, run.tables, run.arrays, path)


def _with_images(run: Run, model: Model, plan: Plan, images: Any, config: ProfileConfig) -> Run:
    """The run with an ``images`` table: each top example's box and PNG thumbnail
    (:func:`actscope.explain.image_examples.image_examples`)."""
    from .explain.image_examples import image_examples

    examples = {name: run.tables["examples"].column(name).to_numpy(zero_copy_only=False) for name in ("site", "unit", "rank", "doc", "pos")}
    table = image_examples(model, plan, examples, images, spatial=config.spatial)
    data = {**run.manifest["data"], "images": list(images.pixels.shape[1:]), "classes": list(images.classes)}
    return Run({**run.manifest, "data": data}, {**run.tables, **to_arrow({"images": table})}, run.arrays)


def plan_with_saes(model: Model, sites: Any, sae: Any) -> tuple[Plan, list[str]]:
    """The plan of ``profile(sites=..., sae=...)`` and the feature sites: each SAE (a loaded one,
    a path or ``"DIR@SITE"``) attached to ``model``, its features added to ``sites`` (with
    ``sites=None``, the features alone). Pass loaded SAEs to plan and then profile with the same."""
    if sae is None:
        return plan_sites(model, sites), []
    from .sae import attach
    from .sae.files import load_spec

    items = list(sae) if isinstance(sae, (list, tuple)) else [sae]
    loaded = [load_spec(item) if isinstance(item, (str, os.PathLike)) else item for item in items]
    features = list(dict.fromkeys(attach(model, item) for item in loaded))
    chosen = list(plan_sites(model, sites).sites) if sites is not None else []
    taken = {site.label for site in chosen}
    return Plan(tuple(chosen + [s for s in plan_sites(model, features).sites if s.label not in taken])), features


def _with_sae_quality(run: Run, model: Model, source: Source, data: Any, features: list[str], config: ProfileConfig) -> Run:
    """The run with an ``sae`` table (reconstruction quality on the profiled data, and the loss on
    the reconstruction over its first 128 documents) and the features' decoded tokens (``decode``)."""
    from .measure import MeasureConfig, objective_for
    from .sae import reconstruction

    data = source.corpus if source.corpus is not None else data
    if source.corpus is None and not isinstance(data, (list, tuple)):
        return Run({**run.manifest, "sae": {"skipped": "reconstruction quality needs text data or a list of model inputs"}}, run.tables, run.arrays)
    limits = vars(config.limits)
    profiled = int(run.manifest.get("data", {}).get("documents") or MeasureConfig.max_documents)
    texts = list(source.corpus.documents[:min(profiled, MeasureConfig.max_documents)]) if source.corpus is not None else None
    objective = objective_for(model, texts, MeasureConfig(batch_size=config.batch_size, max_length=config.max_length)) if texts else None
    try:
        quality, skipped = reconstruction(model, features, data, objective=objective, **limits), None
    except InputError as error:  # the objective does not apply (e.g. a masked LM without a mask token)
        if objective is None:
            raise
        quality, skipped, objective = reconstruction(model, features, data, **limits), str(error), None
    tables = dict(run.tables) | to_arrow({"sae": quality.to_table()})
    decoded = _decoded_features(model, features)
    if decoded is not None:
        tables |= to_arrow({"decode": decoded})
    sae = {"sites": features, "objective": getattr(objective, "name", None), "loss_documents": len(texts or []) if objective else 0,
           **({"loss_skipped": skipped} if skipped else {})}
    return Run({**run.manifest, "sae": sae}, tables, run.arrays)


def _decoded_features(model: Model, features: list[str]) -> dict | None:
    """Each feature's promoted and suppressed tokens, where its decoder rows reach the unembedding."""
    from .explain.decode import decode

    try:
        return decode(model, features).to_table()
    except InputError:
        return None  # no unembedding, or a site whose features do not reach the stream


def _check_checkpointing(every: Any, resume: bool, out: Any) -> None:
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise InputError(f"--checkpoint-every must be a whole number of tokens of at least 1, got {every!r}")
    if (every is not None or resume) and out is None:
        flag = "--resume" if resume else "--checkpoint-every"
        raise InputError(f"{flag} needs --out (out= in Python): the checkpoint is kept beside the run directory")


def _prepare(model: Model, plan: Plan, source: Source, config: ProfileConfig, out: Any, overwrite: bool,
             every: int | None, resume: bool, context: Context) -> tuple[str, Checkpoints | None, dict | None]:
    """The weight hash, this process's checkpoints and what it resumes from, after the checks
    every process passes together (a bad ``out``, a missing or mismatched checkpoint, one that a
    new run would leave behind). Starting over with ``overwrite`` removes an old checkpoint."""
    from dataclasses import asdict

    from .store import check_target, weight_hash

    weights = checkpoints = resumed = problem = None
    stale = False
    try:
        if out is not None and context.main:
            check_target(Path(out), overwrite)  # before hashing the weights: a bad --out fails at once
        if every is not None or resume:
            weights = weight_hash(model.module)
            identity = {"kind": "profile", "model": weights, "data": source.corpus.fingerprint,
                        "sites": [site.label for site in plan.sites], "config": {**asdict(config), "eps": list(config.eps)},
                        "processes": context.world}
            saes = {site.label: site.hook.read.sae.fingerprint() for site in plan.sites if getattr(site.hook.read, "sae", None)}
            if saes:  # an SAE's features resume only with the same SAE
                identity["sae"] = saes
            checkpoints = Checkpoints(checkpoint_folder(out), context.rank, identity)
        stale = out is not None and not resume and _refuse_stale_checkpoint(out, overwrite)
        if resume:
            resumed = _resumed(checkpoints, out)
    except InputError as error:
        problem = error
    agree(problem, context)
    if stale and context.main:
        remove_checkpoint(checkpoint_folder(out))  # starting over: the old checkpoint goes
    agree(None, context)  # nobody writes a checkpoint before it is gone
    return weights or weight_hash(model.module), checkpoints, resumed


def _refuse_stale_checkpoint(out: Any, overwrite: bool) -> bool:
    """Whether ``out`` has a checkpoint a new run replaces (``overwrite``); refused otherwise."""
    folder = checkpoint_folder(out)
    if not rank_files(folder):
        return False
    if not overwrite:
        raise InputError(f"{out} has the checkpoint of an interrupted run ({folder}); pass --resume (resume=True) "
                         "to continue it, or --overwrite to start over and replace it")
    return True


def _resumed(checkpoints: Checkpoints, out: Any) -> dict | None:
    # No collective in here: a process that fails a check must not leave the others waiting.
    if not checkpoints.exists():
        raise InputError(f"there is no checkpoint to resume {out} from (looked for {checkpoints.folder}); run it without "
                         "--resume, with --checkpoint-every TOKENS to keep one")
    return checkpoints.load()


def _chosen_metrics(metrics: str | Sequence[str] | None, source: Source) -> list[str]:
    """Validate the measurement names before the (long) profiling pass starts."""
    if not metrics:
        return []
    from .measure import checked_texts, resolve_metrics

    chosen = [m.name for m in resolve_metrics(metrics)]
    if source.images is not None:
        raise InputError(f"the measurements ({', '.join(chosen)}) run on text documents only, and the data are images; "
                         "profile the images without --metrics (metrics=), or measure the model on text data")
    if source.corpus is None:
        raise InputError("measurements need text data (a file or a list of strings), not ready model inputs; drop metrics= or pass text")
    checked_texts(source.corpus.documents)  # too few documents: refused now, not after the profiling pass
    return chosen


def _with_measurements(run: Run, model: Model, source: Source, chosen: list[str], config: Any, on_metric: Any,
                       context: Context = SINGLE) -> Run:
    """The run with each measurement's tables added and its outcome in ``manifest['measurements']``.
    Measurements do not run distributed: with several processes, rank 0 runs them on all the
    data (so they equal one process's) and each outcome says ``processes: rank 0 only``."""
    from .measure import measure

    results = measure(model, source.corpus.documents, chosen, config, progress=on_metric)
    tables = dict(run.tables)
    tables.update(to_arrow({name: _numpy_columns(cols) for r in results for name, cols in r.tables.items()}))
    where = {"processes": f"rank 0 only (of {context.world}; measurements do not run distributed)"} if context.distributed else {}
    outcome = {r.name: {"summary": list(r.summary), "skipped": r.skipped, "tables": list(r.tables), **where} for r in results}
    return Run({**run.manifest, "measurements": outcome}, tables, run.arrays)


def _numpy_columns(columns: Any) -> dict[str, Any]:
    import numpy as np

    return {key: np.asarray(value) for key, value in columns.items()}



