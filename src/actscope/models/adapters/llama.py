"""Llama-shaped decoders: Llama, Mistral, Qwen2, Qwen3 (Gemma lives in ``gemma.py``).

Pre-norm blocks ``x + attn(norm(x))`` then ``h + mlp(norm(h))``. Gated MLP
``down_proj(act(gate_proj(x)) * up_proj(x))``: the neuron (``mlp.post``) is the input of
``down_proj``; the pre-activation (``mlp.pre``) is the output of ``gate_proj``. ``resid.mid``
is the input of ``post_attention_layernorm``; ``embed`` is the output of ``embed_tokens``
(what block 0 receives). Qwen3's per-head q/k norms do not touch the values, so ``attn.v``
is the output of ``v_proj`` split into key/value heads.
"""
from .base import Adapter
from .common import decoder_sites

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

ADAPTERS = [
    Adapter("llama", ("llama",), "layers", LLAMA_SITES),
    Adapter("mistral", ("mistral",), "layers", LLAMA_SITES),
    Adapter("qwen2", ("qwen2",), "layers", LLAMA_SITES),
    Adapter("qwen3", ("qwen3",), "layers", LLAMA_SITES),
]
