"""StableLM (StableLM-3B-4E1T, StableLM 2): Llama-named modules with LayerNorms and a gated MLP.

The module names are Llama's (see ``llama.py``), so the site table is Llama's: ``attn.v`` is the
output of ``v_proj`` split into key/value heads (the optional per-head ``q_layernorm`` /
``k_layernorm`` touch queries and keys only), ``attn.z`` the input of ``o_proj``, the neuron
``mlp.post`` the input of ``down_proj`` of ``down_proj(act_fn(gate_proj(x)) · up_proj(x))``,
``embed`` the output of ``embed_tokens`` (what block 0 receives: positions are rotary).

Two block forms, chosen by ``use_parallel_residual``:

* sequential (the default; StableLM-3B-4E1T, StableLM 2 1.6B): ``h = x + attn(input_layernorm(x))``,
  ``y = h + mlp(post_attention_layernorm(h))``: ``resid.mid`` is ``h``, the input of
  ``post_attention_layernorm``;
* parallel (StableLM 2 12B): ``y = x + attn(ln(x)) + mlp(ln(x))`` with ``ln = input_layernorm``
  for both, and ``post_attention_layernorm`` is ``None``. There is no stream between the
  sub-blocks, and the site table's ``resid.mid`` resolves to no module, so such a model does not
  offer it (``resid.post = resid.pre + attn.out + mlp.out`` instead).

The norms are ``nn.LayerNorm`` (bias included), which decoding treats as a centring map; the final
one is ``norm``. The tiny model is the sequential form with grouped key/value heads (2 for 4) and
biased q/k/v projections, like StableLM 2 1.6B.
"""
from .base import Adapter, Readout, Tiny
from .llama import LLAMA_MLP, LLAMA_SITES
from .tiny import decoder_shape, hf_config, ids

TINY = Tiny(lambda: hf_config("StableLmConfig", **decoder_shape(num_key_value_heads=2, use_qkv_bias=True, **ids())),
            "StableLmForCausalLM")

ADAPTERS = [Adapter("stablelm", ("stablelm",), "layers", LLAMA_SITES, LLAMA_MLP, readout=Readout(final=("norm",)), tiny=TINY)]
