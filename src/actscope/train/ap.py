"""AP's extra pruning step (METHODS.md, "Dead neurons": the AP step).

Applied after a base pruning method in each pruning round: among the weights the base method
kept, prune a further ``fraction`` — the negative weights that changed least since the
previous round. Removing negative weights raises the pre-activations of the units they feed,
which revives dead ReLU units.

Choices made where the method is silent (*our choice*):

* ``fraction`` is of the weights that remain after the base pruning, per tensor (layer-wise,
  like ``torch.nn.utils.prune.l1_unstructured``); the count is ``round(fraction × remaining)``
  (Python's ``round``, as ``torch.nn.utils.prune`` rounds a float amount), capped at the
  number of remaining negative weights — non-negative weights are never pruned by this step.
* "Changed least" is ``|w − w_previous|`` per entry; ties go to the lower flat index.
* "Negative" is ``w < 0`` for the current (unmasked) weight value.

Masks are those of ``torch.nn.utils.prune``: same shape and dtype as the weight, 1 = kept,
0 = pruned. On a module the step is applied with ``prune.custom_from_mask``, so it composes
with any pruning already applied (``l1_unstructured`` etc.): the module's mask becomes the
product of its previous mask and the new one, and ``prune.remove`` makes it permanent.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import InputError

PRUNABLE = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
WEIGHT = "weight"


def snapshot_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the weights of every Linear and conv layer, keyed ``"PATH.weight"``
    (pruned layers: the weight as the forward pass sees it, i.e. masked). Take one at each
    pruning round and pass it as ``previous_weights`` to the next round's ``ap_prune_step``."""
    return {key: _current(layer).detach().clone() for key, layer in _layers(module).items()}


def ap_prune_step(
    module_or_params: torch.nn.Module | Mapping[str, torch.Tensor],
    previous_weights: Mapping[str, torch.Tensor],
    fraction: float,
    base_mask: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Prune ``fraction`` of the remaining weights: the negative ones that changed least.

    ``module_or_params``: an ``nn.Module`` (every Linear and conv ``weight`` in it, keyed
    ``"PATH.weight"``; the step is applied to the module through ``prune.custom_from_mask``)
    or a mapping ``{key: weight tensor}`` (masks are only computed). ``previous_weights``:
    ``{key: weight at the previous round}`` (e.g. from :func:`snapshot_weights`).
    ``base_mask``: ``{key: mask of this round's base pruning}``; by default a module's current
    prune mask (``weight_mask``) or all ones. Returns ``{key: mask}`` — for a module, its
    masks after the step.
    """
    _check_fraction(fraction)
    if isinstance(module_or_params, torch.nn.Module):
        return _prune_module(module_or_params, previous_weights, fraction, base_mask)
    if not isinstance(module_or_params, Mapping):
        raise InputError(f"ap_prune_step needs an nn.Module or a {{name: weight tensor}} mapping, got {type(module_or_params).__name__}")
    weights = dict(module_or_params)
    masks = _check_keys(base_mask or {}, weights)
    return {
        key: ap_mask(w.detach(), _previous(previous_weights, key, w), fraction, _base(masks, key, w))
        for key, w in weights.items()
    }


def ap_mask(weight: torch.Tensor, previous: torch.Tensor, fraction: float, base_mask: torch.Tensor) -> torch.Tensor:
    """The AP mask of one tensor: ``base_mask`` with the chosen entries set to 0."""
    kept = base_mask.bool()
    candidates = (kept & (weight < 0)).flatten().nonzero().squeeze(1)  # [c] flat indices, ascending
    count = min(round(fraction * int(kept.sum())), len(candidates))
    change = (weight - previous).abs().flatten()[candidates]  # [c]
    # A stable sort keeps ascending flat indices among equal changes: ties go to the lower index.
    chosen = candidates[torch.sort(change, stable=True).indices[:count]]
    mask = base_mask.to(weight.dtype).flatten().clone()
    mask[chosen] = 0
    return mask.view_as(weight)


def _prune_module(
    module: torch.nn.Module,
    previous_weights: Mapping[str, torch.Tensor],
    fraction: float,
    base_mask: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    from torch.nn.utils import prune

    layers = _layers(module)
    if not layers:
        raise InputError(f"{type(module).__name__} has no Linear or conv layer to prune; pass a {{name: weight}} mapping instead")
    masks = _check_keys(base_mask or {}, layers)
    for key, layer in layers.items():
        weight = _current(layer).detach()
        default = getattr(layer, "weight_mask", None)
        base = _base(masks, key, weight) if key in masks or default is None else default
        mask = ap_mask(weight, _previous(previous_weights, key, weight), fraction, base)
        prune.custom_from_mask(layer, WEIGHT, mask)  # composes: new mask = old mask × this one
    return {key: layer.weight_mask.detach().clone() for key, layer in layers.items()}


def _layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {
        f"{path}.{WEIGHT}" if path else WEIGHT: layer
        for path, layer in module.named_modules()
        if isinstance(layer, PRUNABLE)
    }


def _current(layer: torch.nn.Module) -> torch.Tensor:
    """The weight's current value: the unmasked original when the layer is pruned (entries
    the mask removed are never candidates, so their value does not matter)."""
    return layer.weight_orig if hasattr(layer, "weight_orig") else layer.weight


def _previous(previous_weights: Mapping[str, torch.Tensor], key: str, weight: torch.Tensor) -> torch.Tensor:
    if key not in previous_weights:
        raise InputError(f"previous_weights has no '{key}'; it has {sorted(previous_weights)}. "
                         "Take them with actscope.train.snapshot_weights(model) at the previous round")
    return _same_shape(previous_weights[key], weight, f"previous_weights['{key}']").to(weight.device, weight.dtype)


def _base(masks: Mapping[str, torch.Tensor], key: str, weight: torch.Tensor) -> torch.Tensor:
    if key not in masks:
        return torch.ones_like(weight)
    return _same_shape(masks[key], weight, f"base_mask['{key}']").to(weight.device)


def _same_shape(tensor: torch.Tensor, weight: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.shape != weight.shape:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise InputError(f"{what} must be a tensor of the weight's shape {tuple(weight.shape)}, got {got}")
    return tensor.detach()


def _check_keys(masks: Mapping[str, torch.Tensor], targets: Mapping[str, object]) -> Mapping[str, torch.Tensor]:
    unknown = sorted(set(masks) - set(targets))
    if unknown:
        raise InputError(f"base_mask names {unknown}, which are not weights being pruned; the weights are {sorted(targets)}")
    return masks


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise InputError(f"fraction must be a number in [0, 1] (the share of the remaining weights to prune), got {fraction!r}")
