"""GPT-2: pre-norm blocks built from ``Conv1D`` layers (``x @ W + b``, weight ``[in, out]``).

* ``embed`` is the output of ``drop``: token plus position embeddings, which is what block 0
  receives (GPT-2 adds them inline, so no embedding module outputs the sum).
* ``attn.v``: ``c_attn`` computes q, k and v in one matrix; the site keeps the last third of its
  output (``[q | k | v]``, each ``hidden`` wide) split into heads.
* ``attn.z`` is the input of ``attn.c_proj``; ``attn.out`` the attention module's output.
* MLP ``c_proj(act(c_fc(x)))``: ``mlp.pre`` is the output of ``c_fc``, the neuron
  ``mlp.post`` the input of ``mlp.c_proj``; ``resid.mid`` is the input of ``ln_2``.
* Cross-attention layers (``add_cross_attention``) are not part of the table.
"""
from .base import Adapter, Mlp, Readout, Tiny
from .common import decoder_sites, fused_value, mha_parts
from .tiny import FFN, HEADS, HIDDEN, INIT_RANGE, LAYERS, POSITIONS, VOCAB, hf_config

GPT2_SITES = decoder_sites(
    layer="h.{i}",
    attn="attn",
    mlp="mlp",
    q="c_attn",
    v="c_attn",
    o="c_proj",
    ln_mid="ln_2",
    up="c_fc",
    down="c_proj",
    embed="drop",
    v_read=fused_value(mha_parts),
)

TINY = Tiny(lambda: hf_config("GPT2Config", vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=HEADS,
                               n_positions=POSITIONS, initializer_range=INIT_RANGE, bos_token_id=0, eos_token_id=0),
            "GPT2LMHeadModel")

ADAPTERS = [Adapter("gpt2", ("gpt2",), "h", GPT2_SITES, Mlp(gated=False, act="act"), readout=Readout(final=("ln_f",)), tiny=TINY)]
