"""ProSparse: make an MLP's activations sparse while training (METHODS.md, "ProSparse").

Three parts, all on the MLP's activation modules (found through the family card, or by type for
a model without one), all undone when the block exits:

1. **ReLU-fication**: the activation function (SiLU, GELU, …) is replaced by ReLU, keeping every
   weight: for a gated MLP ``down(relu(gate(x)) · up(x))``, for a plain one ``down(relu(up(x)))``.
2. **Progressive L1**: ``λ · Σ_layers mean_tokens ‖a‖₁``, ``a`` the activation function's output
   (what ReLU makes zero; for a plain MLP that is the neuron itself, for a gated one the gate
   factor of it: *our choice*, following the paper's "activation outputs"), real tokens only
   when the model is called with an ``attention_mask``. λ follows :class:`SineSchedule`.
3. **FATReLU threshold shifting**: ``a = x if x > t else 0``; set ``threshold`` (the paper:
   ``t ≈ 0.01``) or change ``ps.threshold`` at any time, e.g. after training.

Usage::

    with actscope.train.prosparse(model, stages=[(200, 1e-3), (200, 5e-3)]) as ps:
        for batch in loader:
            loss = model(**batch).loss + ps.penalty()
            loss.backward(); opt.step(); opt.zero_grad()
            ps.step()
        ps.threshold = 0.01          # evaluate the shifted model inside the block

After the block the model is the SiLU/GELU model again (with the trained weights): run it as
ReLU with :func:`relufied` (or, for a Llama-style config, save it with ``hidden_act="relu"``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from ..errors import InputError
from ..hooks import Hooks, hooks
from .callbacks import Callback, masked_mean_per_token
from .steps import StepLog

# Activation modules of models without a family card (a model's own MLP), found by type.
ACTIVATION_TYPES = (torch.nn.GELU, torch.nn.SiLU, torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.Mish,
                    torch.nn.ELU, torch.nn.Softplus, torch.nn.Hardswish, torch.nn.ReLU6)


class SineSchedule:
    """λ rising in stages along half-period sine ramps (ProSparse).

    ``stages``: ``[(steps, λ_target), ...]``. During stage k (``steps`` long) λ goes from the
    previous stage's target (``start`` before the first) to ``λ_target`` as
    ``λ = λ_prev + η (λ_target − λ_prev)``, ``η = ½[sin(−π/2 + π·progress) + 1]``, progress the
    fraction of the stage done; after the last stage λ stays at the last target.
    """

    def __init__(self, stages: Sequence[tuple[int, float]], start: float = 0.0) -> None:
        checked = []
        for stage in stages:
            try:
                steps, target = stage
            except (TypeError, ValueError):
                raise InputError(f"a ProSparse stage is (steps, lambda), e.g. (200, 1e-3); got {stage!r}") from None
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or not math.isfinite(target) or target < 0:
                raise InputError(f"a ProSparse stage needs steps >= 1 (int) and a finite lambda >= 0; got ({steps!r}, {target!r})")
            checked.append((steps, float(target)))
        if not checked:
            raise InputError("ProSparse needs at least one stage (steps, lambda), e.g. stages=[(200, 1e-3)]")
        self.stages = tuple(checked)
        self.start = float(start)

    @property
    def total_steps(self) -> int:
        return sum(steps for steps, _ in self.stages)

    def __call__(self, step: int) -> float:
        previous, begin = self.start, 0
        for steps, target in self.stages:
            if step < begin + steps:
                eta = 0.5 * (math.sin(-math.pi / 2 + math.pi * (step - begin) / steps) + 1)
                return previous + eta * (target - previous)
            previous, begin = target, begin + steps
        return previous


def fat_relu(threshold: float) -> Any:
    """``x if x > threshold else 0`` (plain ReLU at 0)."""
    if threshold == 0:
        return torch.relu
    return lambda x: torch.where(x > threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))


def activation_modules(model: Any, blocks: Any = None, modules: Sequence[str] | None = None) -> list[str]:
    """Paths of the MLP activation modules to act on: ``modules`` as given, else the family
    card's (``blocks`` as in ``replace_activation``), else every activation module by type."""
    from ..interventions.functions import _activation_modules, _block_indices

    if modules is not None:
        missing = [m for m in modules if _module_or_none(model.module, m) is None]
        if missing or not modules:
            raise InputError(f"no module '{missing[0] if missing else ''}' in {model.name}; pass module paths as in model.named_modules()")
        return list(modules)
    if model.adapter is not None and model.n_layers:
        return _activation_modules(model, _block_indices(model, blocks))
    found = [name for name, m in model.module.named_modules() if isinstance(m, ACTIVATION_TYPES)]
    if not found:
        raise InputError(f"{model.name} has no family card and no activation module ({', '.join(t.__name__ for t in ACTIVATION_TYPES)}); "
                         "pass modules=['path.to.act', ...]")
    return found


def _module_or_none(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


class ProSparse(Callback):
    """See the module docstring. ``lam`` is the current λ; ``threshold`` the FATReLU threshold."""

    name = "prosparse"

    def __init__(self, model: Any, schedule: SineSchedule, *, threshold: float = 0.0, blocks: Any = None,
                 modules: Sequence[str] | None = None, log: StepLog | None = None) -> None:
        super().__init__(model, log=log)
        self.schedule = schedule
        self.threshold = _check_threshold(threshold)
        self.paths = activation_modules(self.model, blocks, modules)

    @property
    def lam(self) -> float:
        return self.schedule(self.steps)

    def _attach(self, registry: Hooks) -> None:
        for path in self.paths:
            registry.after(self.model.module.get_submodule(path), self._hook(path), prepend=True, name=f"prosparse {path}")

    def _hook(self, path: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> torch.Tensor:
            value = fat_relu(self.threshold)(args[0])  # ReLU-fied, the module's own output discarded
            self._count(f"module:{path}@output", value, module.training)  # the site string of what is counted
            lam = self.lam
            if lam > 0:
                value = self._penalised(value, lambda a, mask: lam * masked_mean_per_token(a.abs().sum(-1), mask))
            return value

        return hook

    def _record(self, step: int) -> None:
        self.log.record(step, "lambda", self.lam, self.name)


def prosparse(model: Any, stages: Sequence[tuple[int, float]] = ((1000, 1e-3),), *, start: float = 0.0,
              threshold: float = 0.0, blocks: Any = None, modules: Sequence[str] | None = None,
              log: StepLog | None = None) -> ProSparse:
    """A :class:`ProSparse` callback (use it as ``with prosparse(model, ...) as ps:``).

    ``stages``: ``[(steps, λ), ...]`` of the sine schedule (:class:`SineSchedule`), ``start`` the
    λ before the first stage; ``threshold``: FATReLU's t; ``blocks``: which blocks of a model with
    a family card (as in ``replace_activation``; default all); ``modules``: explicit activation
    module paths instead (any model). ``log``: a shared :class:`StepLog`.
    """
    return ProSparse(model, SineSchedule(stages, start), threshold=threshold, blocks=blocks, modules=modules, log=log)


@contextmanager
def relufied(model: Any, threshold: float = 0.0, *, blocks: Any = None, modules: Sequence[str] | None = None) -> Iterator[tuple[str, ...]]:
    """Run ``model`` with its MLP activations replaced by FATReLU(``threshold``) inside the block
    (inference after ProSparse training); yields the module paths."""
    from ..models import as_model

    model = as_model(model)
    function = fat_relu(_check_threshold(threshold))
    paths = activation_modules(model, blocks, modules)
    with hooks(model.module) as registry:
        for path in paths:
            registry.after(model.module.get_submodule(path), lambda mod, args, output: function(args[0]), prepend=True, name=f"relufied {path}")
        yield tuple(paths)


def _check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
        raise InputError(f"the FATReLU threshold must be a finite number >= 0 (the paper: 0.01), got {threshold!r}")
    return float(threshold)
