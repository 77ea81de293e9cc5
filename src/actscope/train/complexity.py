"""Feature shares of a representation, watched per training step: :func:`feature_variance_tracker`,
a training callback (:mod:`.callbacks`) that records into the ``training_steps`` table, every
``every`` steps, per feature of ``features`` on a fixed probe batch:

* ``variance_explained`` — the share of the site's variance the feature explains
  (:func:`actscope.metrics.complexity.variance_explained`);
* with ``probes=True`` also ``linear_probe`` and ``nonlinear_probe``, the held-out scores of
  :func:`actscope.metrics.complexity.probe_scores` (slower: two probes are fitted per feature).

``site`` is the feature's name (``"site:feature"`` when several sites are watched), so ``actscope
report`` draws one curve per feature. Measurements run in eval mode without grad, on hooks
attached only while they run: training is the same with or without the callback.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..errors import InputError
from ..hooks import Hooks
from ..metrics.complexity import feature_variance
from .callbacks import Callback
from .steps import StepLog


class FeatureVarianceTracker(Callback):
    """See the module docstring; build it with :func:`feature_variance_tracker`."""

    name = "feature_variance"

    def __init__(self, model: Any, probe: Any, features: Mapping[str, Any], sites: str | Sequence[str], *, every: int = 1,
                 probes: bool = False, log: StepLog | None = None) -> None:
        super().__init__(model, log=log)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"every must be a whole number of steps ≥ 1, got {every!r}")
        if not isinstance(probe, (torch.Tensor, list, dict)):
            raise InputError(f"the probe must be a tensor [n, ...] of inputs (or a list of input dicts), got {type(probe).__name__}")
        self.probe, self.features, self.sites, self.every, self.probes = probe, features, sites, every, probes
        feature_variance(self.model, features, probe, sites, probes=False)  # refuse bad features or sites now, not at the first recorded step

    def _attach(self, registry: Hooks) -> None:
        """Nothing to hook during training: each measurement hooks its sites while it runs."""

    def measure(self) -> dict[tuple[str, str], float]:
        """This moment's values, ``{(metric, site): value}`` (what a recorded step holds)."""
        result = feature_variance(self.model, self.features, self.probe, self.sites, probes=self.probes)
        several = len(set(result.site.tolist())) > 1
        values = {}
        for i, feature in enumerate(result.feature.tolist()):
            site = f"{result.site[i]}:{feature}" if several else feature
            values[("variance_explained", site)] = float(result.variance_explained[i])
            if self.probes:
                values[("linear_probe", site)] = float(result.linear_probe[i])
                values[("nonlinear_probe", site)] = float(result.nonlinear_probe[i])
        return values

    def _record(self, step: int) -> None:
        if step % self.every == 0:
            for (metric, site), value in self.measure().items():
                self.log.record(step, metric, value, site)


def feature_variance_tracker(model: Any, probe: Any, features: Mapping[str, Any], sites: str | Sequence[str], *, every: int = 1,
                             probes: bool = False, log: StepLog | None = None) -> FeatureVarianceTracker:
    """A :class:`FeatureVarianceTracker` over ``model``: the variance of ``sites`` explained by each
    of ``features`` (``{name: values [n]}``, one value per example of ``probe``) on the inputs
    ``probe``, recorded every ``every`` steps. Use as ``with feature_variance_tracker(...) as cb:``
    and call ``cb.step()`` after each optimiser step."""
    return FeatureVarianceTracker(model, probe, features, sites, every=every, probes=probes, log=log)


__all__ = ["FeatureVarianceTracker", "feature_variance_tracker"]
