"""Module drift between checkpoints (FPF, "Does continual learning equally forget all
parameters?"): how much each module's weights and outputs change from one checkpoint to the
next, :func:`module_drift`.

Per module (by default every module that holds parameters of its own and that the forward
pass calls) and per checkpoint ``t`` against its reference (the previous checkpoint, or the
first with ``reference="first"``):

* **weight change**: ``‖θ_t − θ_ref‖₂ / ‖θ_ref‖₂`` over the module's own parameters (its
  submodules' are theirs), and the absolute distance ``‖θ_t − θ_ref‖₂``;
* **representation change**: linear CKA between the module's output at ``t`` and at the
  reference on the same data (streamed, :mod:`.compare`); drift is ``1 − CKA``. Modules whose
  output has more than ``max_units`` units (a vocabulary-sized head) are left out of it (NaN),
  since their CKA sums take ``8 · units²`` bytes.

``ModuleDrift.ranking()`` orders modules from most to least drifted; freezing all but the most
drifted ones for fine-tuning (the FPF idea) is :func:`actscope.train.freeze_for_finetuning`.
Checkpoints given as directories are loaded at most two at a time; nothing about any model is
changed (eval mode is used for the passes and each module's flag restored).
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..models import Model
from ..results import TableResult
from ..sites import plan_sites
from .compare import DEFAULT_BYTES, Engine, Measure
from .representations import check_pool, reached, reusable

REFERENCES = ("previous", "first")
DEFAULT_MAX_UNITS = 4096
DEFAULT_TOKENS = 4096


@dataclass(frozen=True, eq=False)
class ModuleDrift(TableResult):
    """Weight and representation change of every module, per checkpoint step.

    Arrays are ``[steps, modules]``: step ``s`` compares checkpoint ``s + 1`` with its
    reference (checkpoint ``s``, or checkpoint 0). ``cka`` is NaN where a module's output was
    not compared (too many units, or ``representation=False``).
    """

    table_name: ClassVar[str] = "drift"

    checkpoints: tuple[str, ...]
    modules: tuple[str, ...]
    parameters: np.ndarray  # [modules] parameter count
    weight_change: np.ndarray  # [steps, modules] relative
    weight_distance: np.ndarray  # [steps, modules] absolute
    cka: np.ndarray  # [steps, modules]
    reference: str
    samples: int

    @property
    def representation_drift(self) -> np.ndarray:
        """``1 − CKA`` per step and module."""
        return 1.0 - self.cka

    def ranking(self, by: str = "representation", step: int | None = None) -> list[str]:
        """Modules from most to least drifted: by ``representation`` (1 − CKA) or ``weight``
        (relative change), at one ``step`` or summed over all steps (``None``). Modules without
        a value come last; ties keep module order."""
        if by not in ("representation", "weight"):
            raise InputError(f"by must be 'representation' or 'weight', got {by!r}")
        values = self.representation_drift if by == "representation" else self.weight_change
        if step is not None:
            if not -len(values) <= step < len(values):
                raise InputError(f"step {step} does not exist: there are {len(values)} step(s) between {len(self.checkpoints)} checkpoints")
            score = values[step]
        else:
            score = values.sum(axis=0)
        score = np.where(np.isfinite(score), score, -np.inf)
        return [self.modules[i] for i in np.argsort(-score, kind="stable")]

    def to_table(self) -> dict[str, np.ndarray]:
        steps, count = self.weight_change.shape
        step = np.repeat(np.arange(steps), count)
        module = np.tile(np.arange(count), steps)
        reference = step if self.reference == "previous" else np.zeros_like(step)
        return {
            "step": step.astype(np.int64),
            "checkpoint": np.array([self.checkpoints[s + 1] for s in step], dtype=object),
            "reference": np.array([self.checkpoints[r] for r in reference], dtype=object),
            "module": np.array([self.modules[m] for m in module], dtype=object),
            "parameters": self.parameters[module].astype(np.int64),
            "weight_change": self.weight_change.reshape(-1),
            "weight_distance": self.weight_distance.reshape(-1),
            "cka": self.cka.reshape(-1),
            "representation_drift": self.representation_drift.reshape(-1),
        }


def module_drift(
    checkpoints: Iterable[Any],
    data: Any = None,
    modules: str | Sequence[str] | None = None,
    *,
    reference: str = "previous",
    representation: bool = True,
    pool: str = "tokens",
    unbiased: bool = False,
    max_units: int = DEFAULT_MAX_UNITS,
    max_bytes: int = DEFAULT_BYTES,
    batch_size: int = 8,
    max_length: int = 128,
    max_tokens: int | None = DEFAULT_TOKENS,
    column: str | None = None,
) -> ModuleDrift:
    """Weight and representation change per module across ``checkpoints`` (see the module
    docstring).

    ``checkpoints``: model directories, ``nn.Module``\\ s or actscope ``Model``\\ s of one
    architecture, in order (at least two). ``data``: what the representations are measured on
    (anything :mod:`actscope.feeding` takes; text needs the first checkpoint's tokenizer, which
    every checkpoint uses). ``modules``: module paths or a glob over them (``"encoder.*"``);
    default every module with parameters of its own that the forward calls.
    """
    if reference not in REFERENCES:
        raise InputError(f"reference must be 'previous' (each checkpoint against the one before) or 'first'; got {reference!r}")
    check_pool(pool)
    if isinstance(checkpoints, (str, os.PathLike, torch.nn.Module, Model)):
        raise InputError("checkpoints must be a list of at least two checkpoints (directories or models), got a single one")
    items = list(checkpoints)
    if len(items) < 2:
        raise InputError(f"module drift needs at least two checkpoints, got {len(items)}")
    data = reusable(data, column)
    limits = dict(batch_size=batch_size, max_length=max_length, max_tokens=max_tokens)
    first = _as_model(items[0], 0)
    chosen = _modules(first, modules)
    units = _units(first, chosen, data, limits) if representation else {}
    compared = [m for m in chosen if 0 < units.get(m, 0) <= max_units]
    weights = {m: _own(first.module, m) for m in chosen}
    shape = (len(items) - 1, len(chosen))
    change, distance, cka = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    tokenizer, names, samples = first.tokenizer, [first.name], 0
    previous, previous_weights = first, weights
    for step in range(1, len(items)):
        current = _as_model(items[step], step, tokenizer)
        names.append(current.name)
        ref_model = first if reference == "first" else previous
        ref_weights = weights if reference == "first" else previous_weights
        now = {m: _own(current.module, m, step) for m in chosen}
        for k, m in enumerate(chosen):
            change[step - 1, k], distance[step - 1, k] = _change(ref_weights[m], now[m], m, step)
        if compared:
            values, samples = _representation(ref_model, current, compared, data, pool, unbiased, max_bytes, limits)
            for k, m in enumerate(chosen):
                if m in values:
                    cka[step - 1, k] = values[m]
        previous, previous_weights = current, now
    return ModuleDrift(
        checkpoints=tuple(_unique_names(names)), modules=tuple(chosen),
        parameters=np.array([sum(t.numel() for t in weights[m]) for m in chosen], dtype=np.int64),
        weight_change=change, weight_distance=distance, cka=cka, reference=reference, samples=samples,
    )


def _as_model(checkpoint: Any, number: int, tokenizer: Any = None) -> Model:
    from ..models import load, wrap

    if isinstance(checkpoint, Model):
        model = checkpoint
    elif isinstance(checkpoint, torch.nn.Module):
        model = wrap(checkpoint, tokenizer, name=f"checkpoint {number}")
    elif isinstance(checkpoint, (str, os.PathLike)):
        model = load(checkpoint)
    else:
        raise InputError(f"checkpoint {number} is a {type(checkpoint).__name__}; pass model directories, nn.Modules or actscope Models")
    if model.tokenizer is None and tokenizer is not None:
        model.tokenizer = tokenizer
    return model


def _modules(model: Model, selection: str | Sequence[str] | None) -> list[str]:
    owners = [name for name, module in model.module.named_modules() if name and any(True for _ in module.parameters(recurse=False))]
    if selection is None:
        return owners
    patterns = [selection] if isinstance(selection, str) else list(selection)
    known = {name for name, _ in model.module.named_modules() if name}
    chosen = []
    for pattern in patterns:
        found = [name for name in owners if fnmatch.fnmatchcase(name, pattern)] if any(c in pattern for c in "*?[") else (
            [pattern] if pattern in known else [])
        if not found:
            close = [name for name in owners if pattern.split(".")[-1] in name][:5]
            raise InputError(f"no module of {model.name} matches {pattern!r}" + (f"; modules with parameters include {', '.join(close)}" if close else
                             f"; modules with parameters: {', '.join(owners[:8])}…"))
        chosen.extend(name for name in found if name not in chosen)
    return chosen


def _units(model: Model, modules: list[str], data: Any, limits: dict) -> dict[str, int]:
    plan = plan_sites(model, [f"module:{m}@output" for m in modules])
    found = reached(model, plan, data, **limits)
    return {m: found[site.label] for m, site in zip(modules, plan.sites) if site.label in found}


def _own(module: torch.nn.Module, name: str, step: int = 0) -> list[torch.Tensor]:
    try:
        owner = module.get_submodule(name)
    except AttributeError:
        raise InputError(f"checkpoint {step} has no module {name!r}; every checkpoint must have the same architecture") from None
    return [p.detach().to("cpu", torch.float64, copy=True) for p in owner.parameters(recurse=False)]


def _change(before: list[torch.Tensor], after: list[torch.Tensor], name: str, step: int) -> tuple[float, float]:
    if [t.shape for t in before] != [t.shape for t in after]:
        raise InputError(f"{name} has parameters of shapes {[tuple(t.shape) for t in after]} in checkpoint {step} but "
                         f"{[tuple(t.shape) for t in before]} in its reference; every checkpoint must have the same architecture")
    moved = float(np.sqrt(sum(float((b - a).square().sum()) for a, b in zip(before, after))))
    scale = float(np.sqrt(sum(float(a.square().sum()) for a in before)))
    return (moved / scale if scale > 0 else float("nan")), moved


def _representation(reference: Model, current: Model, modules: list[str], data: Any, pool: str, unbiased: bool,
                    max_bytes: int, limits: dict) -> tuple[dict[str, float], int]:
    sites = [f"module:{m}@output" for m in modules]
    plan_a, plan_b = plan_sites(reference, sites), plan_sites(current, sites)
    engine = Engine(reference, plan_a, current, plan_b, data, pool, limits)
    engine.flat_is_nan = True  # a module whose output does not vary has no drift to report
    found = engine.run([(i, i) for i in range(len(sites))], Measure(unbiased=unbiased), max_samples=1, max_bytes=max_bytes,
                       precision="float64", seed=0, progress=None)
    return {modules[i]: value for (i, _), value in found.values.items()}, found.samples


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        unique.append(name if count == 0 else f"{name} ({count + 1})")
    return unique


__all__ = ["ModuleDrift", "module_drift"]
