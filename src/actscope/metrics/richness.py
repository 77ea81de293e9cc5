"""Lazy versus rich learning, measured on any ``nn.Module`` ("Grokking as the transition from lazy
to rich training dynamics"; the rich/lazy weight- and representation-change measures):
:func:`empirical_ntk`, :func:`kernel_alignment`, :func:`ntk_alignment`, :func:`weight_change`,
:func:`direction_alignment`.

* **empirical NTK** on a probe batch ``x`` of ``n`` examples, with outputs ``f(x) ∈ R^C``:
  ``K_ij = Σ_c ⟨∂f_c(x_i)/∂θ, ∂f_c(x_j)/∂θ⟩`` over every trainable parameter θ (the trace over
  outputs of the ``nC × nC`` kernel). Computed one output at a time, per-example gradients through
  ``torch.func`` (memory ``n × parameters``), so the model's forward must run under ``vmap``.
* **kernel-target alignment** (centred): ``A(K, Y) = ⟨HKH, HYYᵀH⟩_F / (‖HKH‖_F ‖HYYᵀH‖_F)`` with
  ``H = I − 11ᵀ/n`` and ``Y`` the one-hot labels (or any target matrix ``[n, k]``): 1 when the
  kernel's geometry is the labels', near 0 when unrelated. In lazy training the NTK stays at its
  initial value; rich (feature) learning turns it towards the task, so the alignment rises.
* **direction alignment**: per neuron of a layer, ``cos(w_j, u_k)`` between its weight vector
  (:func:`actscope.metrics.ipr.weight_vectors`) and each of ``k`` given directions (cluster means,
  a teacher's weights): how far features have been learned towards them.
* **weight change**: the parameters' norm ``‖θ_t‖``, their distance from the initial parameters
  ``‖θ_t − θ_0‖`` and the relative change ``‖θ_t − θ_0‖ / ‖θ_0‖`` (all trainable parameters as one
  vector).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import InputError


def _parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    chosen = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    if not chosen:
        raise InputError(f"{type(module).__name__} has no trainable parameters: the NTK is taken over parameters that require grad")
    return chosen


def empirical_ntk(module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The ``[n, n]`` empirical NTK (float64, trace over outputs) of ``module`` on ``inputs``
    ``[n, ...]`` (passed positionally, one example at a time under ``vmap``)."""
    from torch.func import functional_call, grad, vmap

    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1 or inputs.shape[0] < 2:
        raise InputError("the NTK needs a probe tensor [n, ...] of at least two examples")
    params = _parameters(module)
    buffers = {name: b.detach() for name, b in module.named_buffers()}
    with torch.no_grad():
        outputs = module(inputs[:1])
    if not isinstance(outputs, torch.Tensor):
        raise InputError(f"{type(module).__name__} returns a {type(outputs).__name__}; the NTK needs a module that returns a tensor of outputs")
    count = outputs[0].numel()
    n = inputs.shape[0]
    kernel = torch.zeros(n, n, dtype=torch.float64)

    def output(p: Mapping[str, torch.Tensor], x: torch.Tensor, c: int) -> torch.Tensor:
        return functional_call(module, (p, buffers), (x.unsqueeze(0),)).reshape(-1)[c]

    for c in range(count):
        grads = vmap(grad(output), in_dims=(None, 0, None))(params, inputs, c)
        flat = torch.cat([g.reshape(n, -1) for g in grads.values()], dim=1).to(torch.float64)
        kernel += (flat @ flat.t()).cpu()
    return kernel


def target_matrix(targets: torch.Tensor, classes: int | None = None) -> torch.Tensor:
    """One-hot ``[n, classes]`` from integer labels ``[n]``, or a float ``[n, k]`` as it is (float64)."""
    if targets.dim() == 1 and not targets.dtype.is_floating_point:
        return torch.nn.functional.one_hot(targets.long(), classes or int(targets.max()) + 1).to(torch.float64)
    if targets.dim() != 2:
        raise InputError(f"targets must be integer labels [n] or a matrix [n, k], got shape {tuple(targets.shape)}")
    return targets.to(torch.float64)


def kernel_alignment(kernel: torch.Tensor, targets: torch.Tensor, *, centered: bool = True) -> float:
    """Alignment of ``kernel`` ``[n, n]`` with ``targets`` (labels ``[n]`` or ``[n, k]``), see the
    module docstring; ``centered=False`` leaves out ``H``."""
    k = kernel.to(torch.float64).cpu()
    y = target_matrix(targets.cpu())
    if k.shape != (y.shape[0], y.shape[0]):
        raise InputError(f"the kernel is {tuple(k.shape)} but there are {y.shape[0]} targets")
    t = y @ y.t()
    if centered:
        h = torch.eye(len(k), dtype=torch.float64) - 1.0 / len(k)
        k, t = h @ k @ h, h @ t @ h
    norm = float(k.norm() * t.norm())
    return float((k * t).sum()) / norm if norm > 0 else float("nan")


def ntk_alignment(module: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, centered: bool = True) -> float:
    """Kernel-target alignment of ``module``'s empirical NTK on ``inputs`` with ``targets``."""
    return kernel_alignment(empirical_ntk(module, inputs), targets, centered=centered)


def direction_alignment(model: Any, module: str, directions: torch.Tensor, *, of: str = "input") -> torch.Tensor:
    """``[units, k]`` cosines (float64) between each neuron's weight vector of ``module`` (a module
    path of ``model``; ``of`` as in :func:`actscope.metrics.ipr.weight_vectors`) and each row of
    ``directions`` ``[k, n]``; NaN for a zero vector."""
    from ..models import as_model
    from .ipr import weight_vectors

    wrapped = as_model(model)
    try:
        owner = wrapped.module.get_submodule(module)
    except AttributeError:
        raise InputError(f"{wrapped.name} has no module {module!r}") from None
    w = weight_vectors(owner, of).to("cpu", torch.float64)
    u = torch.as_tensor(directions).to(torch.float64).cpu()
    if u.dim() == 1:
        u = u[None]
    if u.dim() != 2 or u.shape[1] != w.shape[1]:
        raise InputError(f"directions must be [k, {w.shape[1]}] (one row per direction, as long as each neuron's weights), got {tuple(u.shape)}")
    norms = w.norm(dim=1, keepdim=True) * u.norm(dim=1)[None]
    return torch.where(norms > 0, (w @ u.t()) / norms, torch.full_like(norms, float("nan")))


def flat_parameters(module: torch.nn.Module) -> torch.Tensor:
    """All trainable parameters as one float64 CPU vector (a copy)."""
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in _parameters(module).values()])


def weight_change(initial: torch.Tensor, current: torch.Tensor) -> dict[str, float]:
    """``weight_norm`` ``‖θ‖``, ``weight_distance`` ``‖θ − θ₀‖`` and ``relative_weight_change``."""
    if initial.shape != current.shape:
        raise InputError(f"the parameters changed size ({initial.numel()} → {current.numel()}); weight change needs the same model")
    distance = float((current - initial).norm())
    scale = float(initial.norm())
    return {"weight_norm": float(current.norm()), "weight_distance": distance,
            "relative_weight_change": distance / scale if scale > 0 else float("nan")}


__all__ = ["direction_alignment", "empirical_ntk", "flat_parameters", "kernel_alignment", "ntk_alignment", "target_matrix", "weight_change"]
