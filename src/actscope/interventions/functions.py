"""Interventions as small pure functions: each takes a site's tensor with units on the last
axis (``[..., units]``; for per-head sites ``[..., head, d_head]``) and returns a new tensor of
the same shape. They never modify their input."""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import InputError

Intervention = Callable[[torch.Tensor], torch.Tensor]


def zero() -> Intervention:
    """Ablate: every selected unit becomes 0."""
    return torch.zeros_like


def scale(factor: float) -> Intervention:
    """Multiply the selected units by ``factor``."""
    return lambda x: x * factor


def set_value(value: float | torch.Tensor) -> Intervention:
    """Clamp the selected units to ``value`` (a number, or a tensor broadcastable to them)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(value, dtype=x.dtype, device=x.device).expand_as(x).clone()

    return apply


def add(vector: torch.Tensor | float) -> Intervention:
    """Add a vector (broadcast over the leading axes) or a number."""
    return lambda x: x + torch.as_tensor(vector, dtype=x.dtype, device=x.device)


def topk(k: int) -> Intervention:
    """Keep the ``k`` largest entries of each token's last axis, zero the rest (Lazy Neuron's
    Top-k activation; "largest" by value, as for ReLU activations)."""
    if k < 1:
        raise InputError(f"top-k needs k >= 1, got {k}")

    def apply(x: torch.Tensor) -> torch.Tensor:
        if k >= x.shape[-1]:
            return x.clone()
        kept = torch.topk(x, k, dim=-1).indices
        return torch.zeros_like(x).scatter(-1, kept, x.gather(-1, kept))

    return apply


def threshold(t: float | torch.Tensor) -> Intervention:
    """Zero entries with ``|a| < t`` (``t`` a number or one threshold per unit): the CETT /
    FAT-ε edit ``a_i ← 0 if |a_i| < threshold_i``."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        limit = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return torch.where(x.abs() < limit, torch.zeros_like(x), x)

    return apply
