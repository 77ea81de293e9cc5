"""OPT: decoder blocks whose MLP layers ``fc1``/``fc2`` live on the block itself.

* ``embed`` is the input of block 0: OPT adds token embeddings (after ``project_in`` where the
  checkpoint has one) and learned position embeddings inline, so no module outputs the sum.
* OPT flattens tokens before its MLP (``hidden.reshape(-1, hidden_size)``), so the MLP sites
  have the ``flat`` layout ``[batch·pos, unit]``: ``mlp.pre`` is the output of ``fc1``, the
  neuron ``mlp.post`` the input of ``fc2``, ``mlp.out`` the output of ``fc2`` (before dropout
  and the residual add).
* ``resid.mid`` (flat too) is the input of ``final_layer_norm``, which is the residual stream
  after attention in the usual pre-norm OPT (``do_layer_norm_before=True``, every size except
  350m). The post-norm opt-350m normalises the stream after attention inside
  ``self_attn_layer_norm`` instead; there this site delivers nothing (use
  ``module:model.decoder.layers.N.self_attn_layer_norm@output``).
* ``attn.v`` is ``v_proj`` split into heads, ``attn.z`` the input of ``out_proj``.
"""
from typing import Any

from .base import Adapter, Hook, HookCall, Mlp, ReadContext, Readout, Tiny, read_input, read_output
from .common import attention_weights, n_heads, split_heads
from .tiny import FFN, HEADS, HIDDEN, INIT_RANGE, LAYERS, POSITIONS, VOCAB, hf_config

BLOCK = "decoder.layers.{i}"


def pre_norm_stream(call: HookCall, ctx: ReadContext) -> Any:
    """The input of ``final_layer_norm`` when it is the pre-MLP norm; nothing otherwise."""
    if not getattr(ctx.config, "do_layer_norm_before", True):
        return None
    return read_input(call, ctx)


OPT_SITES = {
    "embed": Hook("decoder.layers.0", "input"),
    "blocks.{i}.resid.pre": Hook(BLOCK, "input"),
    "blocks.{i}.resid.mid": Hook(f"{BLOCK}.final_layer_norm", "input", pre_norm_stream, "flat"),
    "blocks.{i}.resid.post": Hook(BLOCK, "output"),
    "blocks.{i}.attn.pattern": Hook(f"{BLOCK}.self_attn", "output", attention_weights, "pattern", needs_eager=True),
    "blocks.{i}.attn.v": Hook(f"{BLOCK}.self_attn.v_proj", "output", split_heads(read_output, n_heads), "heads"),
    "blocks.{i}.attn.z": Hook(f"{BLOCK}.self_attn.out_proj", "input", split_heads(read_input), "heads"),
    "blocks.{i}.attn.out": Hook(f"{BLOCK}.self_attn", "output"),
    "blocks.{i}.mlp.pre": Hook(f"{BLOCK}.fc1", "output", layout="flat"),
    "blocks.{i}.mlp.post": Hook(f"{BLOCK}.fc2", "input", layout="flat"),
    "blocks.{i}.mlp.out": Hook(f"{BLOCK}.fc2", "output", layout="flat"),
    "logits": Hook("lm_head", "output"),
}

TINY = Tiny(lambda: hf_config("OPTConfig", vocab_size=VOCAB, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN, ffn_dim=FFN,
                               num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=POSITIONS,
                               init_std=INIT_RANGE, pad_token_id=1, bos_token_id=0, eos_token_id=0),
            "OPTForCausalLM")

ADAPTERS = [
    # fc1, activation_fn and fc2 live on the decoder layer; the post-norm opt-350m has no final
    # norm (a missing module is skipped) and projects out of its word-embedding width.
    Adapter("opt", ("opt",), "decoder.layers", OPT_SITES, Mlp(gated=False, act="activation_fn", chained=True),
            readout=Readout(final=("decoder.final_layer_norm", "decoder.project_out")), tiny=TINY),
]
