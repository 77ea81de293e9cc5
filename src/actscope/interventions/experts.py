"""Switch mixture-of-experts experts off or on: ``experts(model, off={layer: [e, …]}, on=…)``.

Why not ``edit(model, {"blocks.1.moe.router": …})``: in transformers 5.x the router
(``mlp.gate``: ``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``, ``OlmoeTopKRouter``) returns
``(logits, top-k weights, top-k indices)`` and the sparse MoE block routes with the weights and
indices, never with the returned logits. Editing the logits (item 0, what the router site
holds) therefore changes nothing downstream. This context hooks the router's output and
recomputes all three from edited logits with the routers' own rule:

    probs = softmax(logits, in float32)            # over all experts
    weights, chosen = topk(probs, k)               # k = router.top_k
    weights /= weights.sum()                       # Mixtral always; Qwen2-MoE and OLMoE when
                                                   # config.norm_topk_prob
    weights → the dtype of the router's own weights (float32 for Mixtral, the logits' dtype
              for Qwen2-MoE and OLMoE)

* ``off`` (forbid): the experts' logits become −inf before the softmax, so the remaining
  experts share the probability mass and the top k is taken among them, exactly as the model
  would route if those experts did not exist. At most ``experts − k`` experts per layer can be
  off (otherwise a token would have to be routed to an off expert).
* ``on`` (force, our choice for the weights): every token's top k holds the forced experts,
  and the remaining ``k − |on|`` slots go to the model's own top choices among the others.
  Each chosen expert is weighted by its router probability (after any ``off`` masking),
  renormalised over the chosen k when the model renormalises — so a forced expert the router
  disliked gets a small weight, and without renormalisation (OLMoE's default) the weights
  need not sum to one. At most ``k`` experts per layer can be on.

With nothing off or on in a layer the recomputed routing is the model's own, bit for bit.
The router's returned logits are the edited ones (−inf for off experts), so an auxiliary
load-balancing loss computed from them sees the edited routing too. Hooks live in the hook
registry (:mod:`actscope.hooks`): whatever happens inside, they are removed, and parameters,
buffers and flags are never touched. Gradients flow through the weights, so the context also works in training steps.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from ..errors import InputError, SiteError
from ..models import Model, ModelLike

ExpertSelection = Mapping[int, Sequence[int]] | Iterable[tuple[int, int]]


@dataclass(frozen=True)
class ExpertEdit:
    """What an ``experts`` block applies: per MoE layer, the experts off and on."""

    off: Mapping[int, tuple[int, ...]]
    on: Mapping[int, tuple[int, ...]]

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.off) | set(self.on))


@contextmanager
def experts(model: ModelLike, off: ExpertSelection | None = None, on: ExpertSelection | None = None) -> Iterator[ExpertEdit]:
    """Forbid (``off``) or force (``on``) routing to chosen experts of chosen layers.

    ``off`` / ``on``: ``{layer: [expert, …]}`` or ``[(layer, expert), …]``. ``model``: a
    Mixtral, Qwen2-MoE or OLMoE model (an :class:`actscope.Model` or the module). Routing is
    recomputed the way the model does it (see the module docstring); the model is unchanged
    after the block, whatever happens inside.
    """
    from ..hooks import hooks
    from ..models import as_model

    model = as_model(model)
    edit = ExpertEdit(_by_layer(off, "off"), _by_layer(on, "on"))
    plans = [_layer_plan(model, layer, edit) for layer in edit.layers]
    with hooks(model.module) as registry:
        for router, rule in plans:
            registry.after(router, rule.hook)
        yield edit


@dataclass(frozen=True)
class _RoutingRule:
    """The edited routing of one layer: masks over its experts, k, and whether to renormalise."""

    off: torch.Tensor  # [E] bool
    on: torch.Tensor  # [E] bool
    k: int
    renormalise: bool

    def hook(self, router: torch.nn.Module, args: tuple, output: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not (isinstance(output, tuple) and len(output) == 3):
            raise SiteError(
                f"{type(router).__name__} returned {type(output).__name__}, not (logits, weights, indices); "
                "expert on/off needs the transformers 5.x routers"
            )
        logits, weights, _ = output  # [tokens, E], [tokens, k], [tokens, k]
        return self.route(logits, weights.dtype)

    def route(self, logits: torch.Tensor, weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        off = self.off.to(logits.device)
        edited = logits.masked_fill(off, float("-inf")) if bool(off.any()) else logits
        probs = torch.softmax(edited, dim=-1, dtype=torch.float)  # [tokens, E]
        # Probabilities are <= 1, so + 2 ranks every forced expert above every other one.
        key = probs + 2.0 * self.on.to(probs.device) if bool(self.on.any()) else probs
        chosen = torch.topk(key, self.k, dim=-1).indices  # [tokens, k]
        weights = probs.gather(-1, chosen)  # [tokens, k]
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return edited, weights.to(weight_dtype), chosen


def _by_layer(selection: ExpertSelection | None, what: str) -> dict[int, tuple[int, ...]]:
    """``{layer: sorted experts}`` from a mapping or (layer, expert) pairs."""
    if selection is None:
        return {}
    if isinstance(selection, Mapping) and not all(_is_index(layer) for layer in selection):
        raise InputError(f"experts({what}=…): layers must be whole numbers >= 0, got {list(selection)}; write {what}={{1: [3, 5]}}")
    pairs = (
        [(layer, e) for layer, chosen in selection.items() for e in _as_list(chosen, what, layer)]
        if isinstance(selection, Mapping) else list(selection)
    )
    out: dict[int, set[int]] = {}
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_index(v) for v in pair)):
            raise InputError(
                f"experts({what}=…): {pair!r} is not a (layer, expert) pair of whole numbers >= 0; "
                f"write {what}={{1: [3, 5]}} or {what}=[(1, 3), (1, 5)]"
            )
        out.setdefault(int(pair[0]), set()).add(int(pair[1]))
    if isinstance(selection, Mapping):  # a layer with an empty list is re-routed unchanged
        for layer in selection:
            out.setdefault(int(layer), set())
    return {layer: tuple(sorted(chosen)) for layer, chosen in out.items()}


def _as_list(chosen: Any, what: str, layer: Any) -> list[Any]:
    if isinstance(chosen, (int, bool)) or not isinstance(chosen, Iterable):
        raise InputError(f"experts({what}=…): layer {layer!r} maps to {chosen!r}; give a list of experts, e.g. {{{layer!r}: [3]}}")
    return list(chosen)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _layer_plan(model: Model, layer: int, edit: ExpertEdit) -> tuple[torch.nn.Module, _RoutingRule]:
    """The router module of ``layer`` and the rule that re-routes it."""
    from ..sites import plan_sites

    routing = model.router("experts")
    try:
        site = plan_sites(model, f"blocks.{layer}.moe.router").sites[0]
    except SiteError:
        moe_layers = sorted(s.layer for s in plan_sites(model, "blocks.*.moe.router").sites)
        raise InputError(
            f"experts: block {layer} of {model.name} has no MoE router; its MoE blocks are {moe_layers}"
        ) from None
    router = model.module.get_submodule(site.path)
    n_experts, k = int(router.weight.shape[0]), int(router.top_k)
    off, on = edit.off.get(layer, ()), edit.on.get(layer, ())
    _check_layer(layer, off, on, n_experts, k)
    return router, _RoutingRule(_mask(off, n_experts), _mask(on, n_experts), k, routing.renormalise(model.config))


def _check_layer(layer: int, off: tuple[int, ...], on: tuple[int, ...], n_experts: int, k: int) -> None:
    bad = [e for e in (*off, *on) if e >= n_experts]
    if bad:
        raise InputError(f"experts: layer {layer} has experts 0-{n_experts - 1}; expert {bad[0]} does not exist")
    both = sorted(set(off) & set(on))
    if both:
        raise InputError(f"experts: layer {layer}: expert(s) {both} are both off and on; choose one")
    if len(off) > n_experts - k:
        raise InputError(
            f"experts: layer {layer} routes every token to {k} of {n_experts} experts, so at most {n_experts - k} "
            f"can be off; got {len(off)} ({list(off)})"
        )
    if len(on) > k:
        raise InputError(f"experts: layer {layer} routes each token to {k} experts, so at most {k} can be on; got {list(on)}")


def _mask(chosen: tuple[int, ...], n_experts: int) -> torch.Tensor:
    mask = torch.zeros(n_experts, dtype=torch.bool)
    mask[list(chosen)] = True
    return mask


__all__ = ["ExpertEdit", "ExpertSelection", "experts"]
