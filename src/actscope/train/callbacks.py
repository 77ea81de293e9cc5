"""The callback protocol every training-time tool follows, in any training loop.

A callback is a context manager over a model: entering it registers its hooks (through the one
hook registry, :mod:`actscope.hooks`), leaving it removes them, on every exit path, so the
model's modules, parameters and forward are exactly what they were. Inside, a plain loop does::

    with tool(model, ...) as cb:
        for batch in loader:
            loss = model(**batch).loss + cb.penalty()   # the tool's regulariser (0 when it has none)
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            cb.step()                                   # advance schedules, record the step's scalars

``penalty()`` returns the sum of the regularisation terms of every forward pass since the last
call, as a tensor in the autograd graph (in Lightning: return ``loss + cb.penalty()`` from
``training_step`` and call ``cb.step()`` in ``on_train_batch_end``; not tested here, Lightning is
not installed). For a loop that computes its own loss (Hugging Face ``Trainer``),
:func:`actscope.train.hf.trainer_callback` switches a callback to
*injecting* its penalty instead: each hooked tensor passes through an identity whose backward adds
``∂penalty/∂a``, the gradient ``loss + penalty`` would have had, so nobody has to touch the loss.
Both paths give the same gradients (tested).

Per-step scalars (activation ratio, penalty, λ, …) go into a :class:`~actscope.train.steps.StepLog`
(``cb.log``; pass one log to several callbacks to share it): ``activation_ratio`` per site (from
training-mode forward passes only), ``penalty`` with the callback's name as its site, and whatever
``step(name=value)`` is given, with site ``""``.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Iterator

import torch

from ..errors import InputError
from ..hooks import Hooks, hooks
from .steps import StepLog

Penalty = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]  # (activation, token mask) -> scalar


class _AddGrad(torch.autograd.Function):
    """Identity forward; backward adds a fixed extra gradient (the penalty's, computed in the hook)."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(extra)
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (extra,) = ctx.saved_tensors
        return grad + extra.to(grad.dtype), None


class Callback:
    """Base of the training callbacks. Subclasses implement ``_attach(registry)`` and may
    override ``_record(step)``; they call :meth:`_penalised` on a hooked tensor to regularise it."""

    name = "callback"

    def __init__(self, model: Any, *, log: StepLog | None = None) -> None:
        from ..models import as_model

        self.model = as_model(model)
        self.log = log if log is not None else StepLog()
        self.steps = 0  # completed step() calls
        self._stack: ExitStack | None = None
        self._terms: list[torch.Tensor] = []  # penalty terms since the last penalty() call
        self._values: list[torch.Tensor] = []  # their values (detached), since the last step()
        self._inject = False
        self._inject_scale = 1.0
        self._mask: torch.Tensor | None = None  # [batch, pos] of the current forward call, or None
        self._counts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # site -> (firing, pairs) since the last step

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._stack is not None

    def start(self) -> "Callback":
        if self._stack is not None:
            raise InputError(f"this {self.name} callback is already attached; close() it before starting it again")
        stack = ExitStack()
        try:
            registry = stack.enter_context(hooks(self.model.module))
            registry.before(self.model.module, self._read_mask, with_kwargs=True, name=f"{self.name}: read the attention mask")
            self._attach(registry)
            stack.callback(self._detached)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def close(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> "Callback":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _detached(self) -> None:
        self._terms.clear()
        self._values.clear()
        self._counts.clear()
        self._mask = None

    def _attach(self, registry: Hooks) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    # -- the loop's calls ------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """Sum of the penalty terms since the last call (a 0-d tensor in the graph; 0 if none)."""
        if self._inject:
            raise InputError(f"this {self.name} callback injects its penalty's gradient (it runs under a Trainer callback); "
                             "do not also add penalty() to the loss")
        terms, self._terms = self._terms, []
        if not terms:
            return torch.zeros((), device=_device(self.model.module))
        return torch.stack([t.reshape(()) for t in terms]).sum()

    def step(self, **scalars: float | torch.Tensor) -> None:
        """Close a training step: record its scalars (and ``scalars``, e.g. ``loss=loss``, as
        model-wide metrics), then advance the step count (and schedules)."""
        if self._stack is None:
            raise InputError(f"{self.name}.step() was called while the callback is not attached; call it inside its `with` block")
        for metric, value in scalars.items():
            self.log.record(self.steps, metric, value)
        if self._values:
            self.log.record(self.steps, "penalty", torch.stack([v.reshape(()) for v in self._values]).sum(), self.name)
        for site, (fired, pairs) in self._counts.items():
            self.log.record(self.steps, "activation_ratio", fired / pairs.clamp_min(1), site)
        self._record(self.steps)
        self._counts.clear()
        self._terms.clear()
        self._values.clear()
        self.steps += 1

    def _record(self, step: int) -> None:
        """Record this step's scalars into ``self.log`` (subclasses)."""

    # -- helpers for subclasses ------------------------------------------------------------
    def _read_mask(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def token_mask(self, value: torch.Tensor) -> torch.Tensor | None:
        """``[batch, pos]`` bool mask of real tokens for a ``[batch, pos, units]`` tensor of this
        forward call, or None (no attention mask, or another shape)."""
        mask = self._mask
        if mask is None or value.dim() != 3 or tuple(mask.shape) != tuple(value.shape[:2]):
            return None
        return mask.to(device=value.device).bool()

    def _count(self, site: str, value: torch.Tensor, training: bool, threshold: float = 0.0) -> None:
        """Add this call's firing counts (``a > threshold``, real tokens) to the step's
        ``activation_ratio`` of ``site``; evaluation passes (module not training) are not counted."""
        if not training:
            return
        fired, pairs = firing_fraction(value, self.token_mask(value), threshold)
        before = self._counts.get(site)
        self._counts[site] = (fired, pairs) if before is None else (before[0] + fired, before[1] + pairs)

    def _penalised(self, value: torch.Tensor, penalty: Penalty) -> torch.Tensor:
        """``value`` with ``penalty(value, mask)`` added to the training objective: kept for
        ``penalty()``, or, when injecting, as an extra gradient on ``value``. Outside training
        (no grad, or a tensor without grad) nothing is added."""
        if not torch.is_grad_enabled() or not value.requires_grad:
            return value
        mask = self.token_mask(value)
        if not self._inject:
            term = penalty(value, mask)
            self._terms.append(term)
            self._values.append(term.detach())
            return value
        leaf = value.detach().requires_grad_(True)
        term = penalty(leaf, mask)
        (grad,) = torch.autograd.grad(term, leaf)
        self._values.append(term.detach())
        return _AddGrad.apply(value, grad * self._inject_scale)


def masked_mean_per_token(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``per_token`` (``[batch, pos]`` or any shape) over real tokens (all when ``mask`` is None)."""
    if mask is None:
        return per_token.mean()
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1)


def firing_fraction(value: torch.Tensor, mask: torch.Tensor | None, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(units firing ``a > threshold`` summed over real tokens, real tokens × units), as device tensors."""
    fired = (value.detach() > threshold)
    if mask is not None:
        fired = fired & mask.unsqueeze(-1)
        pairs = mask.sum() * value.shape[-1]
    else:
        pairs = torch.tensor(fired.numel(), device=value.device)
    return fired.sum(), pairs


def _device(module: torch.nn.Module) -> torch.device:
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def iter_callbacks(callbacks: Any) -> Iterator[Callback]:
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise InputError(f"expected actscope.train callbacks (prosparse, topk_activations, ...), got {type(cb).__name__}")
        yield cb
