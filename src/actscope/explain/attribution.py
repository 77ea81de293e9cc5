"""Attribution patching: a first-order estimate of every activation-patching effect at once.

For a component ``c`` of a site (the whole site, one head, one unit, one position), the effect
of patching its clean value into the corrupted run is estimated by the linear term of the
Taylor expansion around the corrupted run::

    Δm(c) ≈ Σ_{elements e of c} (clean_e − corrupt_e) · ∂m/∂act_e |corrupted

Passes: one clean forward (records the clean activations), one corrupted forward and one
backward (records the corrupted activations and the gradient of the metric with respect to
every site at once). The gradient is taken with ``torch.autograd.grad`` with respect to zero
tensors added at each site, so the model's parameters (and their ``.grad``) are never touched.
:func:`compare_effects` reports how well the estimates agree with exact patching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..models import Model, ModelLike, as_model
from ..results import TableResult
from .patching import (
    PER, Component, ComponentEffects, Metric, as_inputs, check_pair, components, effects_table,
    output_logits, plan_editable, record, scalar,
)

DEFAULT_SITES = "blocks.*.attn.z,blocks.*.mlp.post"
DEFAULT_PER = ("site", "head", "unit")


class GradientProbe:
    """Identity-valued intervention ``x + δ`` with a zero leaf ``δ``: ``∂m/∂δ = ∂m/∂x``.
    Keeps the corrupted activation ``x`` it saw."""

    def __init__(self) -> None:
        self.delta: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.value = x.detach().clone()
        self.delta = torch.zeros_like(x, requires_grad=True)
        return x + self.delta


def attribution_patching(
    model: ModelLike,
    clean: Any,
    corrupted: Any,
    metric: Metric,
    sites: str | Sequence[str] = DEFAULT_SITES,
    per: str | Sequence[str] = DEFAULT_PER,
) -> ComponentEffects:
    """Estimate the patching effect of every component of ``sites`` from one gradient.

    ``per``: one kind (``"site"``, ``"head"``, ``"unit"``, ``"position"``; an error where it does
    not apply) or several (each applied to the sites it fits: heads for attn.z / attn.v, units
    for the others). The result's ``metric`` column is ``metric_corrupt + estimate``; passes
    are counted in ``forward_passes`` (2) and ``backward_passes`` (1).
    """
    kinds = (per,) if isinstance(per, str) else tuple(per)
    unknown = [k for k in kinds if k not in PER]
    if unknown or not kinds:
        raise InputError(f"per must be one or more of {', '.join(PER)}, got {per!r}")
    model = as_model(model)
    clean, corrupted = as_inputs(model, clean, "clean"), as_inputs(model, corrupted, "corrupted")
    check_pair(clean, corrupted)
    planned = plan_editable(model, sites)
    cache, m_clean = record(model, clean, planned, metric)
    m_corrupt, probes = _corrupted_gradients(model, corrupted, planned, metric)
    rows: list[tuple[Component, float]] = []
    for site in planned:
        probe = probes[site.label]
        if probe.value.shape != cache[site.label].shape:
            raise InputError(f"{site.label}: clean activation {tuple(cache[site.label].shape)} vs corrupted "
                             f"{tuple(probe.value.shape)}; clean and corrupted inputs need the same shape")
        product = (cache[site.label] - probe.value) * probe.delta.grad  # [..] like the site's tensor
        for kind in kinds:
            if isinstance(per, str) or _applies(site, product, kind):
                estimates = component_sums(product, kind)
                for component, estimate in zip(components(site, product, kind), estimates.tolist()):
                    rows.append((component, m_corrupt + estimate))
    return effects_table("attribution", rows, m_clean, m_corrupt, forward_passes=2, backward_passes=1)


def _corrupted_gradients(model: Model, inputs: dict, sites: list, metric: Metric) -> tuple[float, dict[str, GradientProbe]]:
    from ..interventions import edit

    probes = {site.label: GradientProbe() for site in sites}
    with torch.enable_grad(), edit(model, probes):
        value = scalar(metric(output_logits(model(**inputs)), inputs))
    deltas = [probe.delta for probe in probes.values()]
    if any(d is None for d in deltas):
        missing = [label for label, p in probes.items() if p.delta is None]
        raise InputError(f"sites {', '.join(missing)} were not reached by the forward pass; choose sites the model runs through")
    if not value.requires_grad:
        raise InputError("the metric does not depend on the model output through autograd; compute it with torch ops on the logits")
    grads = torch.autograd.grad(value, deltas, allow_unused=True)
    for probe, grad in zip(probes.values(), grads):
        probe.delta.grad = torch.zeros_like(probe.delta) if grad is None else grad  # unused site: no effect
    return float(value.detach()), probes


def _applies(site: Any, product: torch.Tensor, kind: str) -> bool:
    if kind == "head":
        return site.hook.layout == "heads"
    if kind == "unit":
        return site.hook.layout != "heads"
    if kind == "position":
        return product.dim() >= 3
    return True


def component_sums(product: torch.Tensor, kind: str) -> torch.Tensor:
    """Sum ``product`` over every axis but the component's: heads ``[..., head, d_head]`` on
    axis −2, units on the last axis, positions on axis 1; a whole site to one number."""
    keep = {"site": None, "head": product.dim() - 2, "unit": product.dim() - 1, "position": 1}[kind]
    if keep is None:
        return product.sum().reshape(1).double()
    axes = tuple(d for d in range(product.dim()) if d != keep)
    return product.double().sum(dim=axes) if axes else product.double()


# -- agreement with exact patching -------------------------------------------------------
@dataclass(frozen=True)
class EffectAgreement(TableResult):
    """Pearson and Spearman correlation of two tables' effects over their shared components."""

    table_name: ClassVar[str] = "agreement"

    per: str
    n: int
    pearson: float
    spearman: float
    effect_a: np.ndarray  # [n] on the shared components, in a's order
    effect_b: np.ndarray  # [n]

    def to_table(self) -> dict[str, np.ndarray]:
        return {"per": np.asarray([self.per], dtype=object), "n": np.asarray([self.n]),
                "pearson": np.asarray([self.pearson]), "spearman": np.asarray([self.spearman])}


def compare_effects(a: ComponentEffects, b: ComponentEffects, per: str | None = None) -> EffectAgreement:
    """Correlate the effects of two tables (e.g. attribution vs exact patching) on the
    components both contain (matched by kind, site, head, unit and position).

    Spearman is Pearson's correlation of the ranks (ties get their average rank).
    """
    if per is not None:
        a, b = a.only(per), b.only(per)
    index_b = {key: i for i, key in enumerate(b.keys())}
    pairs = [(i, index_b[key]) for i, key in enumerate(a.keys()) if key in index_b]
    if len(pairs) < 2:
        raise InputError(f"the two tables share {len(pairs)} component(s); correlation needs at least 2 "
                         "(patch the same sites with the same per= in both)")
    ia, ib = (np.asarray(side) for side in zip(*pairs))
    x, y = a.effect[ia], b.effect[ib]
    return EffectAgreement(per or "all", len(pairs), _pearson(x, y), _pearson(_ranks(x), _ranks(y)), x, y)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, method="average")


__all__ = ["EffectAgreement", "attribution_patching", "compare_effects", "component_sums"]
