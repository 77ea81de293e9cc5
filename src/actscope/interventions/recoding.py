"""Recoding at inference (Ulmer, "Recoding latent sentence representations — dynamic
gradient-based activation modification in RNNs"): during the forward pass, move a hidden state
``h`` a few gradient steps towards what a read-out should produce, then let the model go on
from the moved state.

:func:`recode` is an intervention like the others, so it composes with
:func:`actscope.edit`::

    readout = actscope.interventions.lm_readout(model)             # h → logits
    with actscope.edit(model, {"blocks.1.resid.post": recode(readout, target_ids, steps=3, lr=0.5)}):
        out = model(**inputs)

Each step is ``h ← h − lr · ∇_h loss(readout(h), target)`` with the loss summed over every
position of the site's tensor (so each position moves by its own gradient, whatever the batch
size). ``steps=0`` returns the tensor unchanged. The edit is a detached offset added to ``h``,
so gradients of a training step flow through the site as they would without it, and the
read-out's own parameters receive no gradient from the recoding. For a recurrent *cell*
(``nn.GRUCell``, ``nn.LSTMCell`` — the LSTM's ``(h, c)`` output edits its ``h``) called once
per time step, editing the cell's output recodes the state that feeds the next step, as in the
paper; a fused ``nn.LSTM`` / ``nn.GRU`` only exposes its outputs, so there the edit reaches the
layers above, not the recurrence.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import InputError
from ..models import ModelLike, as_model

LOSSES = ("cross_entropy", "mse")
Readout = Callable[[torch.Tensor], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def recode(readout: Readout, target: Any, *, steps: int = 1, lr: float = 0.1, loss: str | Loss = "cross_entropy") -> Callable[[torch.Tensor], torch.Tensor]:
    """An intervention that takes ``steps`` gradient steps of size ``lr`` on the site's tensor
    towards ``target`` as seen through ``readout`` (see the module docstring).

    ``loss``: ``"cross_entropy"`` (``target`` class indices, one per position or one for all:
    ``readout(h)`` gives logits ``[..., classes]``), ``"mse"`` (``target`` broadcastable to
    ``readout(h)``), or a callable ``(readout output, target) → per-position or scalar loss``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"steps must be a whole number ≥ 0 (0 leaves the state as it is), got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise InputError(f"lr must be a positive step size, got {lr!r}")
    if not callable(readout):
        raise InputError(f"readout must be a function of the hidden state (e.g. lm_readout(model)), got {type(readout).__name__}")
    objective = _loss(loss)

    def apply(h: torch.Tensor) -> torch.Tensor:
        if steps == 0:
            return h
        state = h.detach().clone()
        with torch.enable_grad():
            for _ in range(steps):
                state.requires_grad_(True)
                out = readout(state)
                value = objective(out, _target(target, out, loss)).sum()
                (gradient,) = torch.autograd.grad(value, state)
                state = (state - lr * gradient).detach()
        return h + (state - h.detach())

    return apply


def _loss(loss: str | Loss) -> Loss:
    if callable(loss):
        return loss
    if loss == "cross_entropy":
        return lambda logits, target: torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none")
    if loss == "mse":
        return lambda out, target: (out.float() - target.float()).square()
    raise InputError(f"loss must be one of {', '.join(LOSSES)} or a function (output, target) → loss; got {loss!r}")


def _target(target: Any, out: torch.Tensor, loss: str | Loss) -> torch.Tensor:
    if callable(loss) and not isinstance(loss, str):
        return target
    value = torch.as_tensor(target, device=out.device)
    if loss == "cross_entropy":
        positions = out.shape[:-1]
        try:
            return value.long().expand(positions)
        except RuntimeError:
            raise InputError(f"cross-entropy targets must be one class index, or one per position {tuple(positions)}; "
                             f"got shape {tuple(value.shape)}") from None
    return value


def lm_readout(model: ModelLike) -> Readout:
    """``h → logits`` of a causal or masked LM from the residual stream: the family card's
    final modules (the final norm) then the output embedding. For a site after the last
    block's final norm, or any other read-out, write your own function."""
    model = as_model(model)
    module = model.module
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if head is None:
        raise InputError(f"{model.name} has no output embedding (LM head); pass your own readout function h → output")
    final = []
    if model.adapter is not None:
        from ..models.adapters import resolve_module

        for path in model.adapter.readout.final:
            found = resolve_module(module, path)
            if found is not None:
                final.append(found[1])

    def readout(h: torch.Tensor) -> torch.Tensor:
        for part in final:
            h = part(h)
        return head(h)

    return readout


__all__ = ["recode", "lm_readout"]
