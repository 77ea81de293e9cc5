"""Where a feature writes: its decoder row carried into the residual stream and on through the
card's readout, so that :func:`actscope.explain.decode` decodes features into the vocabulary as
it decodes neurons.

A feature's direction in the space its SAE reconstructs is ``W_dec[j]``. :data:`STREAM` says, per
site, how that space reaches the residual stream (``"stream"``: it is the stream, or what a
sub-block adds to it; ``"projection"``: the input of an output projection, whose weight maps it
there: ``mlp.post`` through the MLP's ``W_out``, ``attn.z`` through the attention's ``W_O``) and,
for post-norm encoders, how many of the norms on the residual path after block ``i``'s start
the direction has already passed (``resid.pre`` none, ``resid.mid`` the attention's, ``resid.post``
both). Pre-norm models pass only the final norms, wherever the direction enters (the logit lens).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ..errors import InputError

if TYPE_CHECKING:
    from ..models import Model
    from ..sites import Site
    from .core import SAE

F64 = torch.float64

# site suffix → (how its space reaches the stream, post-norm norms already passed in its block)
STREAM: dict[str, tuple[str, int]] = {
    "embed": ("stream", 0),
    "resid.pre": ("stream", 0),
    "attn.z": ("projection", 0),
    "attn.out": ("stream", 0),
    "resid.mid": ("stream", 1),
    "mlp.post": ("projection", 1),
    "mlp.out": ("stream", 1),
    "resid.post": ("stream", 2),
}


def feature_directions(model: "Model", sae: "SAE", writes: "Site") -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(W [d_model, d_sae] float64, N)``: each feature's direction in the residual stream and
    the linear map ``N`` from there to the unembedding (see the module docstring). ``writes`` is
    the site the SAE reconstructs (a transcoder's output site)."""
    suffix = writes.name.split(".", 2)[2] if writes.name.startswith("blocks.") else writes.name
    if suffix not in STREAM:
        raise InputError(f"features reconstructing {writes.name} cannot be decoded into the vocabulary: only features of "
                         f"{', '.join(STREAM)} sites reach the residual stream by a known linear map")
    how, passed = STREAM[suffix]
    directions = sae.W_dec.detach().to(F64).T  # [d_out, d_sae]
    if how == "projection":
        from ..models.adapters import out_in_weight

        weight = out_in_weight(model.module.get_submodule(writes.path))
        if weight is None:
            raise InputError(f"{writes.name}: {writes.path} is not a linear layer, so its features' directions cannot be carried "
                             "into the residual stream")
        directions = weight.detach().to(F64).to(directions.device) @ directions  # [d_model, d_sae]
    return directions, stream_map(model, writes.layer if writes.layer is not None else 0, passed)


def stream_map(model: "Model", layer: int, passed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norms from a point in block ``layer`` (after ``passed`` of its residual-path norms) to
    the unembedding, as one linear map on directions ``[d_model, units]``."""
    from ..explain.decode import norm_map, residual_map
    from ..models.model import resolve_module

    readout = model.adapter.readout if model.adapter is not None else None
    if readout is None or readout.post_norms is None:
        return residual_map(model, layer)
    prefix = resolve_module(model.module, model.adapter.blocks)[0]
    names = [f"{prefix}.{j}.{part}" for j in range(layer, model.n_layers) for part in readout.post_norms][passed:]
    maps = [norm_map(model.module.get_submodule(name), readout.norm_offset) for name in names]

    def apply(directions: torch.Tensor) -> torch.Tensor:
        for step in maps:
            directions = step(directions)
        return directions

    return apply
