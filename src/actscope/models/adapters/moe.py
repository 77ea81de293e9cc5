"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, OLMoE (transformers 5.x layout).

Attention and the residual stream are laid out like Llama (see ``llama.py``); the MLP of a
block is a sparse MoE module ``mlp`` with a router ``mlp.gate`` and the experts ``mlp.experts``.

* ``moe.router`` is the router logits ``[batch·pos, experts]`` (layout ``flat``): item 0 of
  what ``mlp.gate`` returns (``(logits, top-k weights, top-k indices)`` in 5.x).
* ``moe.experts.{e}.post`` is expert ``e``'s neuron ``act(gate) · up`` for the tokens routed
  to it (layout ``tokens``: ``(values [n, d_expert], flat token index [n])``).
  **These values are recomputed, not read.** In transformers 5.x the experts are one fused
  module holding ``gate_up_proj [experts, 2·d_expert, hidden]`` and
  ``down_proj [experts, hidden, d_expert]``; its forward (eager, batched or grouped matmul,
  chosen by ``config._experts_implementation``) never exposes a per-expert tensor or calls a
  per-expert submodule, so there is nothing to hook. A forward-pre-hook on ``mlp.experts``
  sees its inputs ``(hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights)``
  and recomputes ``act(x W_gate_e^T) · (x W_up_e^T)`` for the tokens whose ``top_k_index``
  holds ``e``, with the module's own weights, activation and gating function, so the values
  equal the model's (to float rounding: the model may batch the rows differently). The
  recomputation costs one extra up-projection per observed expert.
* Qwen2-MoE adds a dense shared expert gated by a sigmoid: ``moe.shared.post`` is its neuron,
  the input of ``mlp.shared_expert.down_proj`` (layout ``flat``). Qwen2-MoE blocks listed in
  ``mlp_only_layers`` (or skipped by ``decoder_sparse_step``) have a dense MLP instead, and
  offer ``mlp.pre``/``mlp.post`` rather than the MoE sites.
* ``mlp.out`` is the output of the whole MoE module (experts and shared expert combined).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Adapter, Hook, HookCall, ReadContext, Router, Tiny, read_output
from .common import config_value
from .llama import LLAMA_MLP, LLAMA_READOUT, LLAMA_SITES
from .tiny import EXPERTS, FFN, HEADS, TOP_K, decoder_shape, hf_config, ids

BLOCK = "layers.{i}"


def expert_inputs(call: HookCall) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_states [tokens, hidden], top_k_index [tokens, k])`` of a fused-experts call."""
    names = ("hidden_states", "top_k_index")
    values = [call.args[n] if len(call.args) > n else call.kwargs.get(name) for n, name in enumerate(names)]
    if any(value is None for value in values):
        raise TypeError(f"{type(call.module).__name__} was called without hidden_states and top_k_index")
    return values[0], values[1]


def expert_activation(module: torch.nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``expert``'s neuron ``act(gate) · up`` for rows ``x``, as the module computes it."""
    has_gate = getattr(module, "has_gate", True)
    name = "gate_up_proj" if has_gate else "up_proj"
    weight = getattr(module, name)[expert]
    projected = x @ weight if getattr(module, "is_transposed", False) else F.linear(x, weight)
    if getattr(module, "has_bias", False):
        projected = projected + getattr(module, f"{name}_bias")[expert]
    if not has_gate:
        return module.act_fn(projected)
    apply_gate = getattr(module, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(projected)
    gate, up = projected.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def expert_neurons(call: HookCall, ctx: ReadContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute expert ``e``'s neurons for the tokens routed to it: ``(values, token index)``."""
    hidden, routing = expert_inputs(call)
    expert = ctx.index["e"]
    with torch.no_grad():
        tokens = (routing == expert).any(dim=-1).nonzero().flatten()  # [n] rows of hidden
        return expert_activation(call.module, expert, hidden[tokens]), tokens


def moe_sites(*, shared: bool = False, dense: bool = False) -> dict[str, Hook]:
    """Llama-shaped sites plus the MoE ones; ``dense`` keeps mlp.pre/post for dense blocks."""
    sites: dict[str, Any] = dict(LLAMA_SITES)
    if not dense:
        del sites["blocks.{i}.mlp.pre"], sites["blocks.{i}.mlp.post"]
    sites["blocks.{i}.moe.router"] = Hook(f"{BLOCK}.mlp.gate", "output", read_output, "flat")
    sites["blocks.{i}.moe.experts.{e}.post"] = Hook(f"{BLOCK}.mlp.experts", "input", expert_neurons, "tokens")
    if shared:
        sites["blocks.{i}.moe.shared.post"] = Hook(f"{BLOCK}.mlp.shared_expert.down_proj", "input", layout="flat")
    return sites


def n_experts(config: Any) -> int:
    return config_value(config, "num_local_experts", "num_experts")


# The routers of transformers 5.x (MixtralTopKRouter, Qwen2MoeTopKRouter, OlmoeTopKRouter): softmax,
# top k, and the k weights renormalised always (Mixtral) or when config.norm_topk_prob (the others).
ALWAYS = Router(n_experts, lambda config: True)
WHEN_ASKED = Router(n_experts, lambda config: bool(getattr(config, "norm_topk_prob", False)))


def tiny_moe(config_class: str, model_class: str, kv_heads: int = 2, **extra: Any) -> Tiny:
    return Tiny(lambda: hf_config(config_class, **decoder_shape(num_key_value_heads=kv_heads, num_experts_per_tok=TOP_K, **ids(), **extra)),
                model_class)


ADAPTERS = [
    Adapter("mixtral", ("mixtral",), "layers", moe_sites(), router=ALWAYS, readout=LLAMA_READOUT,
            tiny=tiny_moe("MixtralConfig", "MixtralForCausalLM", num_local_experts=EXPERTS)),
    # Qwen2-MoE blocks in mlp_only_layers are dense, Llama-like MLPs (the tiny model's block 1 is one).
    Adapter("qwen2_moe", ("qwen2_moe",), "layers", moe_sites(shared=True, dense=True), LLAMA_MLP, router=WHEN_ASKED,
            readout=LLAMA_READOUT,
            tiny=tiny_moe("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=EXPERTS, moe_intermediate_size=48,
                          shared_expert_intermediate_size=FFN, mlp_only_layers=[1])),
    Adapter("olmoe", ("olmoe",), "layers", moe_sites(), router=WHEN_ASKED, readout=LLAMA_READOUT,
            tiny=tiny_moe("OlmoeConfig", "OlmoeForCausalLM", kv_heads=HEADS, num_experts=EXPERTS)),
]
