"""Falcon (7B/40B/180B and the small RW models): LayerNorm blocks over one fused ``query_key_value``.

Three block forms, chosen by the config (``FalconDecoderLayer.forward``):

* ``new_decoder_architecture`` (Falcon-40B, -180B): parallel, ``x + attn(ln_attn(x)) + mlp(ln_mlp(x))``
  (one ``input_layernorm`` for both when ``num_ln_in_parallel_attn`` is 1);
* ``parallel_attn`` (Falcon-7B, the default): parallel, ``x + attn(ln(x)) + mlp(ln(x))`` with
  ``ln = input_layernorm``;
* neither (some RW models): sequential, ``h = x + attn(input_layernorm(x))``,
  ``y = h + mlp(post_attention_layernorm(h))``.

``resid.mid`` is the input of ``post_attention_layernorm``, a module that only the sequential form
has: parallel models have no stream between the sub-blocks and do not offer the site
(``resid.post = resid.pre + attn.out + mlp.out`` instead).

``query_key_value`` outputs q, k and v in one of three layouts, viewed as ``[.., fused heads, d_head]``
(``FalconAttention.forward``); ``attn.v`` picks the values out of whichever the config says:

* grouped (``new_decoder_architecture``): ``num_kv_heads`` groups, each its queries then one key
  and one value head: ``[kv, heads / kv + 2, d_head]``, values at ``[:, -1]``;
* multi-query (``multi_query``, Falcon-7B): all query heads, then one key and one value head:
  ``[heads + 2, d_head]``, values at ``[-1:]`` (one value head shared by every query head);
* interleaved (neither): q, k, v per head: ``[heads, 3, d_head]``, values at ``[:, 2]``.

* ``embed`` is the output of ``word_embeddings`` (what block 0 receives: positions are rotary, or
  ALiBi biases added to the attention scores, never to the stream).
* ``attn.z`` is the input of ``self_attention.dense``; ``attn.out`` the attention module's output.
* MLP ``dense_4h_to_h(act(dense_h_to_4h(x)))``: ``mlp.pre`` is the output of ``dense_h_to_4h``, the
  neuron ``mlp.post`` the input of ``dense_4h_to_h``, ``mlp.out`` the MLP module's output (the
  parallel forms then add the attention output to that tensor in place, after the hook has read it).
* ``logits`` is the output of ``lm_head``; the final norm is ``ln_f``.

The tiny model is the grouped form (``new_decoder_architecture``, 2 key/value heads for 4 query
heads, separate ``ln_attn`` / ``ln_mlp``), the layout of the larger Falcons and the one whose value
slicing is the least obvious; the family tests run the other two layouts as well.
"""
from typing import Any, Callable

import torch

from .base import Adapter, HookCall, Mlp, ReadContext, Readout, Tiny, read_output
from .common import decoder_sites, n_heads
from .tiny import FFN, HEADS, HIDDEN, INIT_RANGE, LAYERS, POSITIONS, VOCAB, hf_config


def grouped_values(heads: torch.Tensor, config: Any) -> torch.Tensor:
    """``[.., kv · (heads / kv + 2), d]`` → each group's last (value) head ``[.., kv, d]``."""
    return heads.unflatten(-2, (config.num_kv_heads, -1))[..., -1, :]


def multi_query_values(heads: torch.Tensor, config: Any) -> torch.Tensor:
    """``[.., heads + 2, d]`` → the one shared value head ``[.., 1, d]``."""
    return heads[..., -1:, :]


def interleaved_values(heads: torch.Tensor, config: Any) -> torch.Tensor:
    """``[.., heads · 3, d]`` → every head's third (value) part ``[.., heads, d]``."""
    return heads.unflatten(-2, (n_heads(config), 3))[..., 2, :]


def qkv_layout(config: Any) -> str:
    if config.new_decoder_architecture:
        return "grouped"
    return "multi_query" if config.multi_query else "interleaved"


VALUES: dict[str, Callable[[torch.Tensor, Any], torch.Tensor]] = {
    "grouped": grouped_values,
    "multi_query": multi_query_values,
    "interleaved": interleaved_values,
}


def fused_values(call: HookCall, ctx: ReadContext) -> torch.Tensor:
    """``[batch, pos, value head, d_head]`` from the ``query_key_value`` output, for the config's layout."""
    qkv = read_output(call, ctx)
    d_head = ctx.config.hidden_size // n_heads(ctx.config)
    heads = qkv.unflatten(-1, (-1, d_head))  # [batch, pos, fused heads, d_head]
    return VALUES[qkv_layout(ctx.config)](heads, ctx.config)


FALCON_SITES = decoder_sites(
    layer="h.{i}",
    attn="self_attention",
    mlp="mlp",
    q="query_key_value",
    v="query_key_value",
    o="dense",
    ln_mid="post_attention_layernorm",  # the sequential form only: see the module docstring
    up="dense_h_to_4h",
    down="dense_4h_to_h",
    embed="word_embeddings",
    v_read=fused_values,
)

TINY = Tiny(lambda: hf_config("FalconConfig", vocab_size=VOCAB, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_hidden_layers=LAYERS,
                               num_attention_heads=HEADS, num_kv_heads=2, new_decoder_architecture=True,
                               max_position_embeddings=POSITIONS, initializer_range=INIT_RANGE, bos_token_id=0, eos_token_id=0),
            "FalconForCausalLM")

ADAPTERS = [Adapter("falcon", ("falcon",), "h", FALCON_SITES, Mlp(gated=False, act="act"), readout=Readout(final=("ln_f",)), tiny=TINY)]
