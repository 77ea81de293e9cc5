"""GPT-J: pre-norm blocks with a *parallel* residual, ``x + attn(ln_1(x)) + mlp(ln_1(x))``.

Attention and the MLP both read ``ln_1(x)`` and both outputs are added to the block input in one
sum (``GPTJBlock.forward`` returns ``attn_output + feed_forward_hidden_states + residual``), so
there is no stream "after attention, before the MLP": ``resid.mid`` is left out of the table and
``resid.post = resid.pre + attn.out + mlp.out``.

* ``embed`` is the output of ``drop``: the token embeddings (plus ``wte(token_type_ids)`` when the
  caller passes them) after dropout, which is what block 0 receives. Positions are rotary, applied
  to the first ``rotary_dim`` channels of q and k inside attention; they never touch the values.
* ``attn.v`` is the output of ``v_proj`` split into heads (every head has its own key/value head);
  ``attn.z`` the input of ``out_proj``; ``attn.out`` the attention module's output (after
  ``resid_dropout``, an identity in eval mode).
* MLP ``fc_out(act(fc_in(x)))`` (``nn.Linear`` layers): ``mlp.pre`` is the output of ``fc_in``, the
  neuron ``mlp.post`` the input of ``fc_out``, ``mlp.out`` the MLP module's output.
* ``logits`` is the output of ``lm_head`` (which has a bias in GPT-J); the final norm is ``ln_f``.
"""
from .base import Adapter, Mlp, Readout, Tiny
from .common import decoder_sites
from .tiny import FFN, HEADS, HIDDEN, INIT_RANGE, LAYERS, POSITIONS, VOCAB, hf_config

GPTJ_SITES = decoder_sites(
    layer="h.{i}",
    attn="attn",
    mlp="mlp",
    q="q_proj",
    v="v_proj",
    o="out_proj",
    ln_mid="ln_1",
    up="fc_in",
    down="fc_out",
    embed="drop",
)
del GPTJ_SITES["blocks.{i}.resid.mid"]  # parallel residual: see the module docstring

# rotary_dim 4 of a head's 8 channels: the tiny model rotates part of each head, as GPT-J-6B does (64 of 256).
TINY = Tiny(lambda: hf_config("GPTJConfig", vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=HEADS,
                               n_positions=POSITIONS, rotary_dim=4, initializer_range=INIT_RANGE, bos_token_id=0, eos_token_id=0),
            "GPTJForCausalLM")

ADAPTERS = [Adapter("gptj", ("gptj",), "h", GPTJ_SITES, Mlp(gated=False, act="act"), readout=Readout(final=("ln_f",)), tiny=TINY)]
