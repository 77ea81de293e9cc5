"""Lazy → rich learning, watched per training step: :func:`lazy_rich`, a training callback
(:mod:`.callbacks`) that records into the ``training_steps`` table, every ``every`` steps:

* ``weight_norm``, ``weight_distance`` (from the parameters at ``start()``), ``relative_weight_change``
  (site ``""``; :func:`actscope.metrics.richness.weight_change`);
* ``ntk_alignment``: centred kernel-target alignment of the empirical NTK on a fixed probe batch
  with its targets (:func:`actscope.metrics.richness.ntk_alignment`);
* ``feature_cka`` per site of ``sites``: linear CKA (:func:`actscope.metrics.cka`) between the
  site's activations on the probe now and at ``start()``: 1 while the features have not moved
  (lazy), falling as they are learned (rich).

Measurements run in eval mode and outside the autograd graph of the loop (each module's training
flag restored); they read the model, never change it, so training is the same with or without the
callback (tested). It adds no hooks during training steps: the feature pass hooks the sites only
while it runs.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import InputError
from ..hooks import Hooks
from ..metrics.representations import evaluating
from ..metrics.richness import flat_parameters, ntk_alignment, weight_change
from ..trace import Tracer, flatten
from .callbacks import Callback
from .steps import StepLog


class _Features(Tracer):
    def __init__(self, model: Any, sites: Any) -> None:
        super().__init__(model, sites, announce=False)
        self.values: dict[str, torch.Tensor] = {}

    def on_site(self, site: Any, value: Any, module: torch.nn.Module) -> None:
        self.values[site.label] = flatten(site, value, self._batch_info(), module).values.to("cpu", torch.float64)


class LazyRich(Callback):
    """See the module docstring; build it with :func:`lazy_rich`."""

    name = "lazy_rich"

    def __init__(self, model: Any, probe: torch.Tensor, targets: torch.Tensor, *, sites: str | Sequence[str] | None = None,
                 every: int = 1, ntk: bool = True, log: StepLog | None = None) -> None:
        super().__init__(model, log=log)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"every must be a whole number of steps ≥ 1, got {every!r}")
        if not isinstance(probe, torch.Tensor) or probe.dim() < 1 or probe.shape[0] < 2:
            raise InputError("the probe must be a tensor [n, ...] of at least two examples (a fixed batch the metrics are measured on)")
        if not isinstance(targets, torch.Tensor) or targets.shape[0] != probe.shape[0]:
            raise InputError(f"targets must be a tensor with one row per probe example ({probe.shape[0]})")
        self.probe, self.targets, self.every, self.ntk = probe, targets, every, ntk
        self.sites = sites
        self._initial: torch.Tensor | None = None
        self._features0: dict[str, torch.Tensor] = {}

    def _attach(self, registry: Hooks) -> None:
        self._initial = flat_parameters(self.model.module)
        self._features0 = self._features() if self.sites is not None else {}

    def _features(self) -> dict[str, torch.Tensor]:
        tracer = _Features(self.model, self.sites)
        with tracer.attached(), torch.no_grad(), evaluating(self.model.module):
            self.model(self.probe.to(self.model.device))
        return tracer.values

    def _record(self, step: int) -> None:
        if step % self.every == 0:
            self._measure(step)

    def measure(self) -> dict[str, float]:
        """This moment's values, ``{metric or metric@site: value}`` (what a recorded step holds)."""
        from ..metrics.similarity import cka

        module = self.model.module
        values = weight_change(self._initial, flat_parameters(module)) if self._initial is not None else {}
        if self.ntk:
            with evaluating(module):
                values["ntk_alignment"] = ntk_alignment(module, self.probe.to(self.model.device), self.targets)
        if self.sites is not None:
            for label, now in self._features().items():
                values[f"feature_cka@{label}"] = cka(self._features0[label], now)
        return values

    def _measure(self, step: int) -> None:
        for key, value in self.measure().items():
            metric, _, site = key.partition("@")
            self.log.record(step, metric, value, site)


def lazy_rich(model: Any, probe: torch.Tensor, targets: torch.Tensor, *, sites: str | Sequence[str] | None = None,
              every: int = 1, ntk: bool = True, log: StepLog | None = None) -> LazyRich:
    """A :class:`LazyRich` callback over ``model``: weight change, NTK alignment on ``probe`` with
    ``targets`` (integer labels ``[n]`` or a matrix ``[n, k]``) and the CKA of ``sites``' features
    to their values at ``start()``, recorded every ``every`` steps. Use as ``with lazy_rich(...) as cb:``
    and call ``cb.step()`` after each optimiser step."""
    return LazyRich(model, probe, targets, sites=sites, every=every, ntk=ntk, log=log)


__all__ = ["LazyRich", "lazy_rich"]
