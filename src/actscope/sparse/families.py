"""The modules of each block's MLP, resolved on one model through its family card.

The card (:class:`actscope.models.adapters.Mlp`) says how the MLP computes its neuron (gated or
plain, fused gate|up, the activation's and up projection's attributes, the projections on the
block itself for OPT); the sites say where the neuron lives (the input of the output projection,
``blocks.{i}.mlp.post``) and the pre-activation (``mlp.pre``, the gate of a gated MLP). The MLP's
*container* is the parent of the output projection: the MLP module for every family but OPT,
whose ``fc1``/``activation_fn``/``fc2`` live on the decoder layer itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..models.adapters import Mlp, out_in_weight
from ..models import Model


@dataclass(frozen=True)
class MlpBlock:
    """The modules of one block's MLP. ``first`` is the projection of the MLP input that gives
    the pre-activation (``gate_proj``, ``gate_up_proj`` or the plain up projection)."""

    layer: int
    spec: Mlp
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
        return int(out_in_weight(self.down).shape[1])


def spec_for(model: Model) -> Mlp:
    """The card's MLP part; a clear refusal for mixture-of-experts models and models without one."""
    card = model.adapter
    if card is not None and card.router is not None:
        raise InputError(
            f"{model.name} is a mixture-of-experts model ({model.family}); sparse MLP execution supports dense-MLP "
            f"models only ({', '.join(sparse_families())}): the experts already skip most of the MLP"
        )
    if model.takes_images:
        raise InputError(f"{model.name} takes images; sparse MLP execution is for language models (token inputs): "
                         f"{', '.join(sparse_families())}")
    if card is None or card.mlp is None:
        raise InputError(
            f"{model.name} (family {model.family or 'unknown'}) has no MLP card for sparse execution; supported "
            f"families: {', '.join(sparse_families())}"
        )
    return card.mlp


def sparse_families() -> list[str]:
    """The families whose card lets sparse execution run their MLPs."""
    from ..models.adapters import cards

    return [card.family for card in cards() if card.mlp is not None and card.router is None and not (card.tiny and card.tiny.images)]


def mlp_blocks(model: Model) -> list[MlpBlock]:
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


QUANTISING_PACKAGES = ("optimum.quanto", "torchao", "bitsandbytes")


def refuse_unsupported_weights(model: Model, blocks: list[MlpBlock]) -> None:
    """Sparse execution computes each MLP from its own float copy of the weights, laid out for
    the kernels, in place of the MLP's forward: refuse, saying why, the models where that copy
    would be wrong or would undo what the model was loaded for: weights accelerate offloads
    (they live on disk or in CPU memory and are loaded only while their module runs, by hooks
    the swapped forward bypasses) and quantised weights (the float copy would be the
    dequantised weights, several times the memory, and not the model's own arithmetic)."""
    for block in blocks:
        offloaded = [m for m in (block.container, block.first, block.up, block.down) if m is not None and _offloaded(m)]
        if offloaded:
            raise InputError(
                f"{model.name}: block {block.layer}'s MLP weights are offloaded by accelerate (device_map with CPU or disk "
                "offload): they are loaded only while the module runs, through hooks that sparse execution's swapped "
                "forward bypasses, and its float copy of every MLP would undo the offload. Load the model without "
                "offloading (on one device, or device_map with enough max_memory on the GPUs) to run it sparsely; "
                "calibrate and dense_with_thresholds work on the offloaded model"
            )
        quantised = [m for m in (block.first, block.up, block.down) if m is not None and _quantised(m)]
        if quantised:
            raise InputError(
                f"{model.name}: block {block.layer}'s MLP is quantised ({type(quantised[0]).__name__}): sparse execution "
                "runs the MLP from a float copy of its weights, which for a quantised model would be the dequantised "
                "weights (several times the memory) instead of the model's own quantised arithmetic. Run it sparsely "
                "unquantised, or measure the calibration on the quantised model with dense_with_thresholds"
            )


def refuse_unsupported_projections(model: Model, projections: dict[int, list]) -> None:
    """The same refusals for the projections TEAL runs sparsely (attention ones included)."""
    for layer, found in projections.items():
        for p in found:
            if _offloaded(p.module) or _quantised(p.module):
                why = "offloaded by accelerate" if _offloaded(p.module) else f"quantised ({type(p.module).__name__})"
                raise InputError(
                    f"{model.name}: block {layer}'s {p.name} is {why}: sparse execution runs each projection from a float copy "
                    "of its weight, which would undo the offload or replace the quantised arithmetic. Load the model "
                    "unquantised on one device (or with enough max_memory on the GPUs) to run it sparsely; calibrate and "
                    "dense_with_thresholds work on this model"
                )


def _offloaded(module: torch.nn.Module) -> bool:
    hooked = any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in module.modules())
    return hooked or any(p.device.type == "meta" for p in module.parameters())


def _quantised(module: torch.nn.Module) -> bool:
    from ..models.adapters.base import is_quantised

    weight = getattr(module, "weight", None)
    own = isinstance(weight, torch.Tensor) and weight.device.type != "meta" and is_quantised(weight)
    return own or type(module).__module__.startswith(QUANTISING_PACKAGES) or type(weight).__module__.startswith(QUANTISING_PACKAGES)


def bias_of(module: torch.nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)
