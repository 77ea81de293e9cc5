"""Callbacks that shape a site's activations during training: any edit held through training,
top-k activations, and the delta-activation (temporal sparsity) loss.

* :func:`held_edit` — ``actscope.edit`` for the length of training (clamping or ablating units or
  heads at every step, METHODS.md "Clamping through training"); gradients flow through the edit.
* :func:`topk_activations` — keep the ``k`` largest entries of each token's site vector, zero the
  rest, in every forward pass (Lazy Neuron's top-k activation, trained with).
* :func:`delta_activation_loss` — ``λ · ‖Δ‖₁ / numel(Δ)`` with ``Δ = a_t − a_{t−1}`` over
  consecutive real tokens of each sequence (METHODS.md "Temporal (delta) sparsity"), computed by
  ``actscope.metrics.temporal.delta_l1_loss``; ``actscope.metrics.temporal_sparsity`` measures it after.

Each records per step, from training forward passes: ``activation_ratio`` (``a > 0``) of every site
(top-k and delta), and ``temporal_sparsity`` (fraction of consecutive real-token pairs with
``|Δ| ≤ eps``) for the delta loss.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import InputError
from ..hooks import Hooks
from ..interventions import edit, topk
from ..sites import plan_sites
from .callbacks import Callback
from .steps import StepLog

DEFAULT_SITES = "blocks.*.mlp.post"


class HeldEdit(Callback):
    """``edit(model, edits)`` held while attached; ``edits`` maps site selections to interventions."""

    name = "held_edit"

    def __init__(self, model: Any, edits: Mapping[str, Any], *, log: StepLog | None = None) -> None:
        super().__init__(model, log=log)
        if not edits:
            raise InputError("held_edit needs at least one {site: intervention}, e.g. {'blocks.0.attn.z[head=1]': zero()}")
        self.edits = dict(edits)
        self.sites = [site.label for key in self.edits for site in plan_sites(self.model, key).sites]  # checked now

    def _attach(self, registry: Hooks) -> None:
        registry.enter(edit(self.model, self.edits))


class _SiteCallback(Callback):
    """A callback whose work is a function of each site's tensor, applied through ``edit``."""

    def __init__(self, model: Any, sites: str | Sequence[str], *, log: StepLog | None = None) -> None:
        super().__init__(model, log=log)
        self.sites = [site.label for site in plan_sites(self.model, sites).sites]
        if not self.sites:
            raise InputError(f"{self.name}: the selection {sites!r} names no site")

    def _attach(self, registry: Hooks) -> None:
        registry.enter(edit(self.model, {label: self._function(label) for label in self.sites}))

    def _function(self, label: str) -> Callable[[torch.Tensor], torch.Tensor]:  # pragma: no cover - subclasses
        raise NotImplementedError


class TopKActivations(_SiteCallback):
    name = "topk"

    def __init__(self, model: Any, k: int, sites: str | Sequence[str] = DEFAULT_SITES, *, log: StepLog | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"topk_activations needs k >= 1 (an int: units kept per token), got {k!r}")
        self.k = k
        super().__init__(model, sites, log=log)

    def _function(self, label: str) -> Callable[[torch.Tensor], torch.Tensor]:
        keep = topk(self.k)

        def apply(x: torch.Tensor) -> torch.Tensor:
            kept = keep(x)
            self._count(label, kept, self.model.module.training)
            return kept

        return apply


class DeltaActivationLoss(_SiteCallback):
    name = "delta"

    def __init__(self, model: Any, lam: float, sites: str | Sequence[str] = DEFAULT_SITES, *, eps: float = 0.0,
                 log: StepLog | None = None) -> None:
        for what, value in (("lam", lam), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"delta_activation_loss: {what} must be a finite number >= 0, got {value!r}")
        self.lam, self.eps = float(lam), float(eps)
        self._pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(model, sites, log=log)

    def _function(self, label: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def apply(x: torch.Tensor) -> torch.Tensor:
            if x.dim() != 3:
                raise InputError(f"delta_activation_loss: {label} is not a [batch, position, units] tensor (shape {tuple(x.shape)}); "
                                 "choose a per-token site such as blocks.*.mlp.post")
            self._count(label, x, self.model.module.training)
            if self.model.module.training:
                self._count_pairs(label, x)
            if self.lam > 0:
                x = self._penalised(x, self._penalty)
            return x

        return apply

    def _pair_mask(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return torch.ones(x.shape[0], x.shape[1] - 1, dtype=torch.bool, device=x.device)
        return mask[:, 1:] & mask[:, :-1]  # [batch, pos - 1]

    def _penalty(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        from ..metrics.temporal import delta_l1_loss  # the one definition of the loss

        return delta_l1_loss(x, mask, self.lam)

    def _count_pairs(self, label: str, x: torch.Tensor) -> None:
        pairs = self._pair_mask(x, self.token_mask(x))
        still = ((x[:, 1:] - x[:, :-1]).detach().abs() <= self.eps) & pairs.unsqueeze(-1)
        count = (still.sum(), pairs.sum() * x.shape[-1])
        before = self._pairs.get(label)
        self._pairs[label] = count if before is None else (before[0] + count[0], before[1] + count[1])

    def _record(self, step: int) -> None:
        for label, (still, pairs) in self._pairs.items():
            self.log.record(step, "temporal_sparsity", still / pairs.clamp_min(1), label)
        self._pairs.clear()

    def _detached(self) -> None:
        super()._detached()
        self._pairs.clear()


def held_edit(model: Any, edits: Mapping[str, Any], *, log: StepLog | None = None) -> HeldEdit:
    """Hold ``{site selection: intervention}`` (``actscope.interventions``: ``zero()``,
    ``set_value(v)``, ``clamp(...)``, ``mean(...)``, …) at every training step while attached."""
    return HeldEdit(model, edits, log=log)


def topk_activations(model: Any, k: int, sites: str | Sequence[str] = DEFAULT_SITES, *, log: StepLog | None = None) -> TopKActivations:
    """Keep the ``k`` largest activations of each token at ``sites`` (default every MLP's neurons)."""
    return TopKActivations(model, k, sites, log=log)


def delta_activation_loss(model: Any, lam: float, sites: str | Sequence[str] = DEFAULT_SITES, *, eps: float = 0.0,
                          log: StepLog | None = None) -> DeltaActivationLoss:
    """Add ``lam · ‖a_t − a_{t−1}‖₁ / numel`` over consecutive real tokens at ``sites`` to the
    objective (``penalty()``); records ``temporal_sparsity`` (``|Δ| ≤ eps``) per step."""
    return DeltaActivationLoss(model, lam, sites, eps=eps, log=log)
