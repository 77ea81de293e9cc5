"""Fine-tune only the modules that drift most, freeze the rest (FPF, "Forgetting Prioritized
Finetuning"): :func:`freeze_for_finetuning` picks the ``top`` modules of a
:class:`~actscope.metrics.drift.ModuleDrift` ranking and sets ``requires_grad=False`` on every
other parameter; :func:`freeze_except` does the same for modules you name.

Both return a :class:`Frozen` handle that remembers every parameter's ``requires_grad`` flag
from before (by parameter name, shared parameters once). ``Frozen.restore()`` — or leaving a
``with`` block — sets each flag back to what it was, so the model is trainable exactly as
before; the weights a fine-tuning changed stay changed (that is the fine-tuning). Nothing else
is touched: no hooks, no parameter is replaced, the optimizer is yours (build it from
``frozen.parameters()`` or from all parameters: frozen ones get no gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import InputError
from ..models import ModelLike, as_model


@dataclass
class Frozen:
    """Which modules stay trainable, and every parameter's ``requires_grad`` from before."""

    module: torch.nn.Module
    trainable: tuple[str, ...]
    before: dict[str, bool]
    restored: bool = False

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters left trainable (for the optimizer)."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def restore(self) -> None:
        """Put every parameter's ``requires_grad`` back to its value before freezing."""
        for name, parameter in self.module.named_parameters():
            if name in self.before:
                parameter.requires_grad_(self.before[name])
        self.restored = True

    def __enter__(self) -> "Frozen":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def freeze_except(model: ModelLike, modules: Sequence[str]) -> Frozen:
    """Freeze every parameter except those of ``modules`` (module paths; a module's
    submodules go with it). Parameters that were already frozen stay frozen."""
    module = as_model(model).module
    names = [modules] if isinstance(modules, str) else list(modules)
    known = {name for name, _ in module.named_modules()}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InputError(f"no module named {unknown[0]!r} in {type(module).__name__}; e.g. "
                         f"{', '.join(n for n in list(known)[1:6])}")
    before = {name: p.requires_grad for name, p in module.named_parameters()}
    keep = {id(p) for name in names for p in module.get_submodule(name).parameters()}
    for parameter in module.parameters():
        if id(parameter) not in keep:
            parameter.requires_grad_(False)
    return Frozen(module, tuple(names), before)


def freeze_for_finetuning(model: ModelLike, drift: Any, top: int | float = 0.25, *, by: str = "representation",
                          step: int | None = None, also: Sequence[str] = ()) -> Frozen:
    """Keep the ``top`` most-drifted modules of ``drift`` trainable (a count, or a fraction of
    the ranked modules, at least one) plus ``also`` (e.g. a new task head), freeze the rest.
    ``by`` and ``step`` choose the ranking (:meth:`ModuleDrift.ranking`)."""
    ranking = drift.ranking(by=by, step=step)
    if isinstance(top, bool) or not isinstance(top, (int, float)) or top <= 0:
        raise InputError(f"top is how many modules to fine-tune (a count, or a fraction of the {len(ranking)} modules); got {top!r}")
    count = int(top) if isinstance(top, int) or top >= 1 else max(1, round(top * len(ranking)))
    if count > len(ranking):
        raise InputError(f"top={top} asks for more modules than the {len(ranking)} that drift ranks")
    return freeze_except(model, [*ranking[:count], *[name for name in also if name not in ranking[:count]]])


__all__ = ["Frozen", "freeze_except", "freeze_for_finetuning"]
