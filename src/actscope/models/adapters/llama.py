"""Llama-shaped decoders: Llama, Mistral, Qwen2, Qwen3 (Gemma lives in ``gemma.py``).

Pre-norm blocks ``x + attn(norm(x))`` then ``h + mlp(norm(h))``. Gated MLP
``down_proj(act(gate_proj(x)) * up_proj(x))``: the neuron (``mlp.post``) is the input of
``down_proj``; the pre-activation (``mlp.pre``) is the output of ``gate_proj``. ``resid.mid``
is the input of ``post_attention_layernorm``; ``embed`` is the output of ``embed_tokens``
(what block 0 receives). Qwen3's per-head q/k norms do not touch the values, so ``attn.v``
is the output of ``v_proj`` split into key/value heads.
"""
from typing import Any

from .base import Adapter, Mlp, Readout, Tiny
from .common import decoder_sites
from .tiny import decoder_shape, hf_config, ids

LLAMA_SITES = decoder_sites(
    layer="layers.{i}",
    attn="self_attn",
    mlp="mlp",
    q="q_proj",
    v="v_proj",
    o="o_proj",
    ln_mid="post_attention_layernorm",
    up="gate_proj",
    down="down_proj",
    embed="embed_tokens",
)

LLAMA_MLP = Mlp(gated=True, act="act_fn", up="up_proj")
LLAMA_READOUT = Readout(final=("norm",))


def tiny_decoder(config_class: str, model_class: str, **extra: Any) -> Tiny:
    """A tiny Llama-shaped decoder with grouped key/value heads (2 for 4 heads)."""
    return Tiny(lambda: hf_config(config_class, **decoder_shape(num_key_value_heads=2, **ids(), **extra)), model_class)


ADAPTERS = [
    Adapter("llama", ("llama",), "layers", LLAMA_SITES, LLAMA_MLP, readout=LLAMA_READOUT,
            tiny=tiny_decoder("LlamaConfig", "LlamaForCausalLM")),
    Adapter("mistral", ("mistral",), "layers", LLAMA_SITES, LLAMA_MLP, readout=LLAMA_READOUT,
            tiny=tiny_decoder("MistralConfig", "MistralForCausalLM")),
    Adapter("qwen2", ("qwen2",), "layers", LLAMA_SITES, LLAMA_MLP, readout=LLAMA_READOUT,
            tiny=tiny_decoder("Qwen2Config", "Qwen2ForCausalLM")),
    Adapter("qwen3", ("qwen3",), "layers", LLAMA_SITES, LLAMA_MLP, readout=LLAMA_READOUT,
            tiny=tiny_decoder("Qwen3Config", "Qwen3ForCausalLM", head_dim=16)),
]
