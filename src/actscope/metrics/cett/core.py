"""CETT building blocks (METHODS.md, "CETT"): the output projection behind a neuron site, the
CETT of a given dropped set on full tensors, and per-unit thresholds from a layer's ε.

For one MLP block and one token, the neuron activation ``a`` (``[d_ff]``) is the input of the
output projection ``W_out`` (``[d_model, d_ff]``), unit i contributes ``n_i = W_out[:, i] · a_i``
and, for a dropped set D,

    CETT = ‖Σ_{i∈D} n_i‖₂ / ‖FFN(x)‖₂.

``FFN(x)`` is the output of the projection module, ``W_out a + b`` *(our choice where the module
has a bias, as in BERT/MiniLM and GPT-2; the paper's Llama-family MLPs have none, where it is
exactly ``W_out a``)*. The projection is found from the module the site ``blocks.{i}.mlp.post``
hooks (``model.catalog[site].path``): an ``nn.Linear`` (weight ``[d_model, d_ff]``) or
transformers' ``Conv1D`` (GPT-2; weight ``[d_ff, d_model]``, transposed here); a quantised layer
gives its dequantised weight, an offloaded one the weight its offload holds.
"""
from __future__ import annotations


import torch

from ...errors import InputError
from ...models.adapters import out_in_weight
from ...models.adapters.base import dense_weight
from ...sites import Site
from ...models import Model

F64 = torch.float64


def output_projection(model: Model, site: Site) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W_out [d_model, d_ff], bias [d_model] or None)`` of the module ``site`` feeds, float64.

    ``site`` must be a whole neuron site read at the input of its projection
    (``blocks.{i}.mlp.post``); a unit selection, a recomputed or sliced reading is refused.
    """
    check_neuron_site(site)
    module = model.module.get_submodule(site.path)
    weight = out_in_weight(module)  # [d_model, d_ff]
    if weight is None:
        raise InputError(
            f"{site.label}: CETT needs the output projection behind the neuron, but {site.path} is a "
            f"{type(module).__name__}; only nn.Linear and transformers' Conv1D are supported"
        )
    bias = dense_weight(module, "bias")  # quantised or offloaded layers: their real values
    return weight.detach().to(F64).contiguous(), None if bias is None else bias.detach().to(F64)


def check_neuron_site(site: Site) -> None:
    """Refuse sites whose tensor is not the full input of a projection module."""
    from ...models.adapters.base import read_input

    plain = site.hook.read in (None, read_input) or getattr(site.hook.read, "view_of", None) is read_input
    if site.hook.at != "input" or not plain or site.hook.layout not in ("units", "flat"):
        raise InputError(
            f"{site.label} is not a neuron site read at the input of an output projection; CETT "
            "needs blocks.{i}.mlp.post of a dense MLP (MoE expert sites are not supported)"
        )
    if site.units is not None or site.heads is not None:
        raise InputError(
            f"{site.label}: CETT drops units by their contribution to the whole MLP output, so it "
            f"needs every unit; write {site.name} without a [unit] selection"
        )


def cett_of_dropped(
    a: torch.Tensor, w_out: torch.Tensor, dropped: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token CETT of the dropped set, on full tensors (float64).

    ``a`` ``[n, d_ff]`` activations, ``w_out`` ``[d_model, d_ff]``, ``dropped`` ``[n, d_ff]`` or
    ``[d_ff]`` bool. Returns ``[n]``: ``‖W_out (a ⊙ dropped)‖ / ‖W_out a + b‖`` (NaN where the
    output is exactly zero, where CETT is undefined).
    """
    a = a.to(F64)
    w_out = w_out.to(F64)
    output = a @ w_out.T + (0 if bias is None else bias.to(F64))  # [n, d_model]
    lost = (a * dropped.to(F64)) @ w_out.T  # [n, d_model]
    norm = output.norm(dim=-1)
    return torch.where(norm > 0, lost.norm(dim=-1) / norm.clamp_min(torch.finfo(F64).tiny), torch.nan)


def unit_thresholds(eps: float, w_out: torch.Tensor) -> torch.Tensor:
    """Per-unit activation thresholds ``ε / ‖W_out[:, i]‖₂`` (``[d_ff]``, float64).

    ``|a_i| < ε / ‖W_out[:, i]‖`` is ``‖n_i‖ < ε``. A unit with a zero column contributes
    nothing, so it gets ``inf`` (always dropped) for ε > 0; ε = 0 drops nothing.
    """
    norms = w_out.to(F64).norm(dim=0)  # [d_ff]
    if eps <= 0:
        return torch.zeros_like(norms)
    return torch.where(norms > 0, eps / norms.clamp_min(torch.finfo(F64).tiny), torch.inf)
