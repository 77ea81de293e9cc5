"""Phi-3: a Llama-shaped decoder with fused projections.

* ``qkv_proj`` outputs ``[q heads | k heads | v heads]`` (grouped key/value heads): ``attn.v``
  is its value block split into key/value heads.
* ``gate_up_proj`` outputs ``[gate | up]`` and the MLP computes ``down_proj(up · act(gate))``:
  ``mlp.pre`` is the gate half of that output (the pre-activation), the neuron ``mlp.post`` the
  input of ``down_proj``.
* ``resid.mid`` is the input of ``post_attention_layernorm``: the stream after the
  attention output passed ``resid_attn_dropout`` (an identity in eval mode) and was added.
"""
from .base import Adapter, Mlp, Readout, Tiny
from .common import decoder_sites, first_half, fused_value, gqa_parts
from .tiny import POSITIONS, decoder_shape, hf_config, ids

PHI3_SITES = decoder_sites(
    layer="layers.{i}",
    attn="self_attn",
    mlp="mlp",
    q="qkv_proj",
    v="qkv_proj",
    o="o_proj",
    ln_mid="post_attention_layernorm",
    up="gate_up_proj",
    down="down_proj",
    embed="embed_tokens",
    v_read=fused_value(gqa_parts),
    pre_read=first_half,
)

ADAPTERS = [
    Adapter("phi3", ("phi3",), "layers", PHI3_SITES, Mlp(gated=True, act="activation_fn", fused=True), readout=Readout(final=("norm",)),
            tiny=Tiny(lambda: hf_config("Phi3Config", **decoder_shape(num_key_value_heads=2, original_max_position_embeddings=POSITIONS, **ids())),
                      "Phi3ForCausalLM")),
]
