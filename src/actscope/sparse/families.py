"""Which modules form each MLP block, per model family: a data table over the adapters.

The adapters (``actscope.models.adapters``) already say where each block's neuron lives: the
input of the output projection (``blocks.{i}.mlp.post``) and the pre-activation (``mlp.pre``,
the gate of a gated MLP). This table adds only what sparse execution needs beyond that: the
up projection of gated MLPs, the activation attribute, and whether weights are fused or stored
transposed. The MLP's *container* is the parent of the output projection: the MLP module for
every family but OPT, whose ``fc1``/``activation_fn``/``fc2`` live on the decoder layer itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError


@dataclass(frozen=True)
class MlpSpec:
    """What the adapters do not say about a family's MLP.

    ``gated``: ``down(act(gate(x)) * up(x))``, else ``down(act(up(x)))``. ``up``: attribute of
    the up projection of a gated MLP (empty when ``fused``: Phi-3's ``gate_up_proj`` outputs
    ``[gate | up]``). ``act``: attribute of the activation. ``conv1d``: GPT-2's ``Conv1D``
    stores ``[in, out]`` weights. ``chained``: no MLP module (OPT), so the container is the block.
    """

    gated: bool
    act: str
    up: str = ""
    fused: bool = False
    conv1d: bool = False
    chained: bool = False


_LLAMA_LIKE = MlpSpec(gated=True, act="act_fn", up="up_proj")

MLP_SPECS: dict[str, MlpSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": MlpSpec(gated=True, act="activation_fn", fused=True),
    "gpt2": MlpSpec(gated=False, act="act", conv1d=True),
    "gpt_neox": MlpSpec(gated=False, act="act"),
    "opt": MlpSpec(gated=False, act="activation_fn", chained=True),
}

MOE_FAMILIES = ("mixtral", "qwen2_moe", "olmoe")


@dataclass(frozen=True)
class MlpBlock:
    """The modules of one block's MLP. ``first`` is the projection of the MLP input that gives
    the pre-activation (``gate_proj``, ``gate_up_proj`` or the plain up projection)."""

    layer: int
    spec: MlpSpec
    container: torch.nn.Module
    first: torch.nn.Module
    up: torch.nn.Module | None  # gated and not fused only
    down: torch.nn.Module
    act: Any
    first_name: str
    down_name: str

    @property
    def units(self) -> int:
        """Number of MLP units (``d_mlp``)."""
        weight = self.down.weight
        return int(weight.shape[0] if self.spec.conv1d else weight.shape[1])


def spec_for(model: Any) -> MlpSpec:
    """The family's spec; a clear refusal for MoE and unknown families."""
    family = model.family
    if family in MOE_FAMILIES:
        raise InputError(
            f"{model.name} is a mixture-of-experts model ({family}); sparse MLP execution supports the dense-MLP "
            f"families only ({', '.join(MLP_SPECS)}): the experts already skip most of the MLP"
        )
    if family not in MLP_SPECS:
        raise InputError(
            f"{model.name} (family {family or 'unknown'}) has no sparse-execution table; supported families: "
            f"{', '.join(MLP_SPECS)}"
        )
    return MLP_SPECS[family]


def mlp_blocks(model: Any) -> list[MlpBlock]:
    """One :class:`MlpBlock` per layer, resolved on the model through its adapter's paths."""
    from ..models.model import resolve_module

    spec = spec_for(model)
    sites = model.adapter.sites
    down_path, first_path = sites["blocks.{i}.mlp.post"].path, sites["blocks.{i}.mlp.pre"].path
    blocks = []
    for layer in range(model.n_layers or 0):
        found = resolve_module(model.module, down_path.format(i=layer))
        first = resolve_module(model.module, first_path.format(i=layer))
        if found is None or first is None:
            raise InputError(f"{model.name}: block {layer} has no {down_path.format(i=layer)}; is this a {model.family} model?")
        parent_path, _, down_name = found[0].rpartition(".")
        container = model.module.get_submodule(parent_path)
        up = getattr(container, spec.up) if spec.gated and not spec.fused else None
        blocks.append(MlpBlock(layer, spec, container, first[1], up, found[1], getattr(container, spec.act),
                               first[0].rpartition(".")[2], down_name))
    if not blocks:
        raise InputError(f"{model.name} has no MLP blocks to sparsify")
    return blocks


def out_in_weight(module: torch.nn.Module, conv1d: bool) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view; ``Conv1D`` stores ``[in, out]``)."""
    return module.weight.T if conv1d else module.weight


def bias_of(module: torch.nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)
