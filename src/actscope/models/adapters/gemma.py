"""Gemma, Gemma 2 and Gemma 3 (text): Llama-shaped decoders with a GeGLU MLP.

Gemma is laid out like Llama (see ``llama.py``); ``embed`` is the output of ``embed_tokens``,
which already multiplies by ``sqrt(hidden_size)``, so it is what block 0 receives.

Gemma 2 adds a norm *after* each sub-block, before the residual add:
``h = x + post_attention_layernorm(attn(input_layernorm(x)))``,
``y = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``. So:

* ``resid.mid`` is ``h``: the input of ``pre_feedforward_layernorm`` (not of
  ``post_attention_layernorm``, which normalises the attention output);
* ``attn.out`` and ``mlp.out`` are what the sub-blocks *add to the stream*: the outputs of
  ``post_attention_layernorm`` and ``post_feedforward_layernorm``, so that
  ``resid.mid = resid.pre + attn.out`` and ``resid.post = resid.mid + mlp.out`` hold;
* ``logits`` are the final logits after ``final_logit_softcapping``
  (``cap · tanh(lm_head(x) / cap)``, computed like the model does), not the raw ``lm_head``
  output.

Gemma 3's text decoder (``gemma3_text``: ``Gemma3ForCausalLM``, the 270M and 1B models) has Gemma
2's blocks and adds RMS norms on the queries and keys inside attention (``q_norm``, ``k_norm``),
which leave the values alone: its sites are Gemma 2's. Its embeddings module scales by
``sqrt(hidden_size)`` itself, and ``final_logit_softcapping`` is unset by default (``logits`` is
then the ``lm_head`` output). The layout matcher cannot take it for Gemma 2 because of the two
extra norms, hence a card.
"""
import torch

from .base import Adapter, Hook, HookCall, ReadContext, Readout, Tiny, read_output
from .llama import LLAMA_MLP, LLAMA_SITES
from .tiny import HEADS, HIDDEN, decoder_shape, hf_config


def softcapped_logits(call: HookCall, ctx: ReadContext) -> torch.Tensor:
    """The ``lm_head`` output soft-capped as the model does after it."""
    logits = read_output(call, ctx)
    cap = getattr(ctx.config, "final_logit_softcapping", None)
    if cap is None:
        return logits
    with torch.no_grad():
        return torch.tanh(logits / cap) * cap


BLOCK = "layers.{i}"

GEMMA2_SITES = {
    **LLAMA_SITES,
    "blocks.{i}.resid.mid": Hook(f"{BLOCK}.pre_feedforward_layernorm", "input"),
    "blocks.{i}.attn.out": Hook(f"{BLOCK}.post_attention_layernorm", "output"),
    "blocks.{i}.mlp.out": Hook(f"{BLOCK}.post_feedforward_layernorm", "output"),
    "logits": Hook("lm_head", "output", softcapped_logits),
}

# Gemma's RMSNorm scales by (1 + weight).
GEMMA_READOUT = Readout(final=("norm",), norm_offset=1.0)
D_HEAD = HIDDEN // HEADS

ADAPTERS = [
    Adapter("gemma", ("gemma",), "layers", LLAMA_SITES, LLAMA_MLP, readout=GEMMA_READOUT,
            tiny=Tiny(lambda: hf_config("GemmaConfig", **decoder_shape(num_key_value_heads=2, head_dim=D_HEAD)), "GemmaForCausalLM")),
    Adapter("gemma2", ("gemma2",), "layers", GEMMA2_SITES, LLAMA_MLP, readout=GEMMA_READOUT,
            tiny=Tiny(lambda: hf_config("Gemma2Config", **decoder_shape(num_key_value_heads=2, head_dim=D_HEAD,
                                                                       query_pre_attn_scalar=D_HEAD, sliding_window=4)),
                      "Gemma2ForCausalLM")),
    Adapter("gemma3_text", ("gemma3_text",), "layers", GEMMA2_SITES, LLAMA_MLP, readout=GEMMA_READOUT,
            tiny=Tiny(lambda: hf_config("Gemma3TextConfig", **decoder_shape(num_key_value_heads=2, head_dim=D_HEAD,
                                                                           query_pre_attn_scalar=D_HEAD, sliding_window=4)),
                      "Gemma3ForCausalLM")),
]
