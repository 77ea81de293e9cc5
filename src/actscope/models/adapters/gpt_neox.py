"""GPT-NeoX and Pythia: pre-norm blocks, usually with a *parallel* residual.

With ``use_parallel_residual`` (every Pythia and GPT-NeoX-20B checkpoint) a block computes
``x + attn(ln1(x)) + mlp(ln2(x))``: the MLP reads the block input, not the stream after
attention, so there is no "after attention, before the MLP" point and ``resid.mid`` is left
out of the table. (For the rare sequential variant the input of ``post_attention_layernorm``
would be that point, but one table serves both and the parallel form is the one in use.)

* ``embed`` is the output of ``emb_dropout`` (what block 0 receives).
* ``attn.v``: ``query_key_value`` is fused *per head*: its output is viewed as
  ``[batch, pos, head, 3·d_head]`` and split into q | k | v; the site keeps each head's last
  third.
* ``attn.z`` is the input of ``attention.dense``; ``attn.out`` the attention module's output.
* MLP ``dense_4h_to_h(act(dense_h_to_4h(x)))``: ``mlp.pre`` is the output of
  ``dense_h_to_4h``, the neuron ``mlp.post`` the input of ``dense_4h_to_h``.
"""
import torch

from .base import Adapter, HookCall, Mlp, ReadContext, Readout, Tiny, read_output
from .common import decoder_sites, n_heads
from .tiny import decoder_shape, hf_config


def per_head_value(call: HookCall, ctx: ReadContext) -> torch.Tensor:
    """``[batch, pos, head, d_head]`` values from the per-head fused qkv output."""
    qkv = read_output(call, ctx)
    heads = n_heads(ctx.config)
    grouped = qkv.reshape(*qkv.shape[:-1], heads, qkv.shape[-1] // heads)  # [.., head, 3·d_head]
    return grouped.chunk(3, dim=-1)[2]


GPT_NEOX_SITES = decoder_sites(
    layer="layers.{i}",
    attn="attention",
    mlp="mlp",
    q="query_key_value",
    v="query_key_value",
    o="dense",
    ln_mid="post_attention_layernorm",
    up="dense_h_to_4h",
    down="dense_4h_to_h",
    embed="emb_dropout",
    v_read=per_head_value,
)
del GPT_NEOX_SITES["blocks.{i}.resid.mid"]  # parallel residual: see the module docstring

ADAPTERS = [
    Adapter("gpt_neox", ("gpt_neox",), "layers", GPT_NEOX_SITES, Mlp(gated=False, act="act"), readout=Readout(final=("final_layer_norm",)),
            tiny=Tiny(lambda: hf_config("GPTNeoXConfig", **decoder_shape(bos_token_id=0, eos_token_id=0)), "GPTNeoXForCausalLM")),
]
