"""Attention functions actscope adds to transformers, and which implementations return patterns.

Attention-pattern sites read the weights an attention function returns. Transformers' ``eager``
implementation returns them; the fused ones (``sdpa``, flash) do not, so :mod:`actscope.trace`
switches those to eager for the run. An implementation in :data:`PATTERN_RETURNING` is left as it
is: switching a ReLU-attention model to eager would observe a softmax model it never was.

``relu`` attention (the Bigram-Backcopy mitigation): ``w[q, k] = ReLU(q·k · scaling) / n_q`` over
the keys ``k`` that query ``q`` may see, ``n_q`` their number (the causal prefix, minus padding),
then ``out = w @ v``. Dividing by ``n_q`` is our choice (the common normalisation of ReLU attention,
which keeps a query's output on the scale of one value vector whatever its position); the weights
of one query do not sum to 1. Register it with :func:`use_relu_attention`, which also registers
transformers' eager mask for it (an additive float mask: 0 where visible).
"""
from __future__ import annotations

from typing import Any

import torch

RELU_ATTENTION = "actscope_relu"
PATTERN_RETURNING = {"eager", RELU_ATTENTION}  # implementations whose second output is the pattern


def relu_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output [batch, query, head, head_dim], weights [batch, head, query, key])``, with the
    signature transformers calls attention functions with (grouped key/value heads repeated)."""
    groups = getattr(module, "num_key_value_groups", 1)
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [b, h, q, k]
    if attention_mask is None:  # no mask given: causal
        q, k = scores.shape[-2:]
        visible = torch.ones(q, k, dtype=torch.bool, device=scores.device).tril(k - q)
    elif attention_mask.dtype == torch.bool:
        visible = attention_mask[..., : key.shape[-2]]
    else:  # additive: 0 where visible, the dtype's minimum where not
        visible = attention_mask[..., : key.shape[-2]] == 0
    visible = visible.expand_as(scores)
    counts = visible.sum(-1, keepdim=True).clamp(min=1).to(scores.dtype)  # [b, h, q, 1]
    weights = torch.where(visible, torch.relu(scores), torch.zeros_like(scores)) / counts
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def use_relu_attention(module: torch.nn.Module) -> None:
    """Register :func:`relu_attention` with transformers (once) and switch ``module`` (a
    Hugging Face model) to it. Transformers does not save the choice with the model: call this
    again after loading one that was trained with it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(RELU_ATTENTION, relu_attention)
    AttentionMaskInterface.register(RELU_ATTENTION, eager_mask)
    module.set_attn_implementation(RELU_ATTENTION)


__all__ = ["PATTERN_RETURNING", "RELU_ATTENTION", "relu_attention", "use_relu_attention"]
