"""Weights laid out once, on entering :func:`actscope.sparse.sparsify`, so every skippable unit
or input channel owns one contiguous row.

* unit rows ``[d_mlp, d_model]``: gate and up as stored by ``nn.Linear`` (no copy), the down
  projection transposed (a copy), GPT-2's ``Conv1D`` weights transposed where needed;
* input-channel rows ``[d_model, ·]`` for TEAL: the transposed gate|up (``[d_model, 2·d_mlp]``,
  one matrix so one product gives both) or first projection.

A tensor already in the needed layout is used as is (a view of the parameter, never written);
anything else is a contiguous copy that lives as long as the context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.adapters import out_in_weight
from .families import MlpBlock, bias_of


@dataclass(frozen=True)
class Weights:
    """One block's weights for sparse execution (shapes in comments; U = d_mlp)."""

    gate: torch.Tensor | None  # [U, d] gated only
    gate_bias: torch.Tensor | None  # [U]
    up: torch.Tensor  # [U, d]: the up projection (plain MLPs: the first projection)
    up_bias: torch.Tensor | None  # [U]
    down_t: torch.Tensor  # [U, d_out]
    down_bias: torch.Tensor | None  # [d_out]
    first_t: torch.Tensor | None  # TEAL: [d, 2U] gate|up (gated) or [d, U] (plain)
    first_bias: torch.Tensor | None  # TEAL: [2U] or [U]


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t if t.is_contiguous() else t.contiguous()


def lay_out(block: MlpBlock, teal: bool) -> Weights:
    """The weights of ``block``; ``teal`` adds the transposed input-side matrix."""
    first = out_in_weight(block.first)  # [U, d] or [2U, d] (fused gate|up)
    first_bias = bias_of(block.first)
    units = block.units
    if block.spec.gated and block.spec.fused:
        gate, up = first[:units], first[units:]
        gate_bias, up_bias = (first_bias[:units], first_bias[units:]) if first_bias is not None else (None, None)
    elif block.spec.gated:
        gate, up, gate_bias = first, out_in_weight(block.up), first_bias
        up_bias = bias_of(block.up)
    else:
        gate, up, gate_bias, up_bias = None, first, None, first_bias
    down_t = out_in_weight(block.down).T  # [U, d_out]
    first_t, teal_bias = None, None
    if teal:
        stacked = up if gate is None else torch.cat([gate, up])  # [U or 2U, d]
        first_t = _rows(stacked.T)  # [d, U or 2U]
        # Gated MLPs have biases on both gate and up, or on neither.
        teal_bias = up_bias if gate is None else (torch.cat([gate_bias, up_bias]) if gate_bias is not None else None)
    return Weights(
        gate=_rows(gate) if gate is not None else None,
        gate_bias=gate_bias.detach() if gate_bias is not None else None,
        up=_rows(up),
        up_bias=up_bias.detach() if up_bias is not None else None,
        down_t=_rows(down_t),
        down_bias=bias_of(block.down).detach() if bias_of(block.down) is not None else None,
        first_t=first_t,
        first_bias=teal_bias.detach() if teal_bias is not None else None,
    )
