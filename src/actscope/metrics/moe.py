"""MoE routing: per (layer, expert) routing frequency, routing weight and neuron activation
ratio, for Mixtral, Qwen2-MoE and OLMoE (issue item 10).

Routing is recomputed from the router logits (site ``blocks.{i}.moe.router``, ``[tokens,
experts]``, padding dropped) with the rule of the installed transformers 5.x, which is the same
for the three families (``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``, ``OlmoeTopKRouter``):

    probs = softmax(logits, in float32)              # softmax first, over all experts
    weights, experts = topk(probs, k)                # k = config.num_experts_per_tok
    weights /= weights.sum()                         # Mixtral always; Qwen2-MoE and OLMoE
                                                     # only when config.norm_topk_prob

Per (layer, expert), over the real tokens of the data:

* ``frequency``: fraction of tokens whose top k holds the expert (the frequencies of a layer
  sum to k).
* ``mean_weight``: mean of the weight the model multiplies the expert's output by, over the
  tokens routed to it (after the renormalisation above).
* ``mean_prob``: mean softmax probability of the expert over all tokens (the router's soft
  preference, routed or not).
* ``activation_ratio``: fraction of (token, unit) pairs with ``a > 0`` among the tokens
  routed to the expert, ``a`` being the expert's neuron ``act(gate) · up`` (site
  ``blocks.{i}.moe.experts.{e}.post``, which reads the model's own routing); the
  ``activation_ratio_abs_gt_<eps>`` column uses ``|a| > eps``. ``expert_tokens`` counts the
  tokens that site saw; it equals ``routed`` unless float ties make the recomputed top k differ.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from ..errors import InputError
from ..sites import Site
from ..trace import Tracer, flatten
from ..feeding import feed
from ..models import Model, ModelLike, as_model
from ..results import TableResult
from .tables import eps_column

DEFAULT_EPS = 1e-3

def route(logits: torch.Tensor, k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs [n, E], weights [n, k], experts [n, k])`` from router logits ``[n, E]``."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


@dataclass
class _LayerRouting:
    """Sums over one layer's real tokens."""

    experts: int
    tokens: int = 0
    routed: torch.Tensor | None = None  # [E] tokens routed to each expert
    weight_sum: torch.Tensor | None = None  # [E] sum of applied weights over routed tokens
    prob_sum: torch.Tensor | None = None  # [E] sum of softmax probabilities over all tokens

    def __post_init__(self) -> None:
        self.routed = torch.zeros(self.experts, dtype=torch.int64)
        self.weight_sum = torch.zeros(self.experts, dtype=torch.float64)
        self.prob_sum = torch.zeros(self.experts, dtype=torch.float64)

    def update(self, logits: torch.Tensor, k: int, renormalise: bool) -> None:
        probs, weights, experts = route(logits, k, renormalise)  # [n, E], [n, k], [n, k]
        self.tokens += logits.shape[0]
        flat = experts.reshape(-1).cpu()
        self.routed += torch.bincount(flat, minlength=self.experts)
        self.weight_sum += torch.bincount(flat, weights.reshape(-1).cpu().double(), minlength=self.experts)
        self.prob_sum += probs.double().sum(0).cpu()


@dataclass
class _ExpertNeurons:
    """Counts over one expert's routed tokens: rows, units, entries > 0 and |a| > eps."""

    rows: int = 0
    units: int = 0
    positive: int = 0
    above_eps: int = 0

    def update(self, values: torch.Tensor, eps: float) -> None:
        self.rows += values.shape[0]
        self.units = values.shape[-1]
        self.positive += int((values > 0).sum())
        self.above_eps += int((values.abs() > eps).sum())


class _RoutingTracer(Tracer):
    def __init__(self, model: Model, k: int, renormalise: bool, eps: float) -> None:
        super().__init__(model, ["blocks.*.moe.router", "blocks.*.moe.experts.*.post"])
        self.k, self.renormalise, self.eps = k, renormalise, eps
        self.layers: dict[int, _LayerRouting] = {}
        self.experts: dict[tuple[int, int], _ExpertNeurons] = {}

    def on_site(self, site: Site, value: Any, module: torch.nn.Module) -> None:
        reading = flatten(site, value, self._batch_info(), module)  # real tokens only
        if site.name.endswith("moe.router"):
            layer = self.layers.setdefault(site.layer, _LayerRouting(reading.values.shape[-1]))
            layer.update(reading.values, self.k, self.renormalise)
        else:
            key = (site.layer, dict(site.index)["e"])
            self.experts.setdefault(key, _ExpertNeurons()).update(reading.values, self.eps)


@dataclass(frozen=True, eq=False)
class MoERouting(TableResult):
    """One row per (MoE layer, expert); see the module docstring for the columns."""

    table_name: ClassVar[str] = "moe_routing"
    columns: Mapping[str, np.ndarray]
    top_k: int
    renormalised: bool
    eps: float

    def to_table(self) -> dict[str, np.ndarray]:
        return {name: column.copy() for name, column in self.columns.items()}


def _rows(tracer: _RoutingTracer) -> list[dict[str, Any]]:
    rows = []
    for layer in sorted(tracer.layers):
        sums = tracer.layers[layer]
        for expert in range(sums.experts):
            routed = int(sums.routed[expert])
            neurons = tracer.experts.get((layer, expert), _ExpertNeurons())
            entries = neurons.rows * neurons.units
            rows.append({
                "layer": layer,
                "expert": expert,
                "tokens": sums.tokens,
                "routed": routed,
                "frequency": routed / sums.tokens if sums.tokens else math.nan,
                "mean_weight": float(sums.weight_sum[expert]) / routed if routed else math.nan,
                "mean_prob": float(sums.prob_sum[expert]) / sums.tokens if sums.tokens else math.nan,
                "expert_tokens": neurons.rows,
                "units": neurons.units,
                "activation_ratio": neurons.positive / entries if entries else math.nan,
                eps_column("activation_ratio_abs_gt", tracer.eps): neurons.above_eps / entries if entries else math.nan,
            })
    return rows


def _routing_rule(model: Model) -> tuple[int, bool]:
    router = model.router("moe_routing")
    k = getattr(model.config, "num_experts_per_tok", None)
    if not isinstance(k, int) or k < 1:
        raise InputError(f"moe_routing: {model.name}'s config has num_experts_per_tok={k!r}; it must be a whole number >= 1")
    return k, router.renormalise(model.config)


def moe_routing(
    model: ModelLike, data: Any, *, eps: float = DEFAULT_EPS, batch_size: int = 8, max_length: int = 128,
    max_tokens: int | None = None,
) -> MoERouting:
    """Routing frequency, mean routing weight and neuron activation ratio per (layer, expert).

    ``model``: a Mixtral, Qwen2-MoE or OLMoE model (an :class:`actscope.Model`, the module, or
    its directory). ``data``: strings (the model's tokenizer), a text source, or model-input
    dicts; padding is excluded. ``eps``: the magnitude threshold of the ``|a| > eps`` ratio.
    """
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise InputError(f"moe_routing: eps must be a number >= 0, got {eps!r}; e.g. 1e-3")
    model = as_model(model)
    k, renormalise = _routing_rule(model)
    tracer = _RoutingTracer(model, k, renormalise, float(eps))
    feed(tracer, data, batch_size=batch_size, max_length=max_length, max_tokens=max_tokens)
    rows = _rows(tracer)
    columns = {key: np.array([row[key] for row in rows]) for key in rows[0]}
    return MoERouting(columns, k, renormalise, float(eps))


__all__ = ["MoERouting", "moe_routing", "route"]
