"""ViT: a pre-norm encoder over image patches (transformers 5.x layout: ``layers.{i}`` with
``attention.{q,k,v,o}_proj`` and ``mlp.fc1/fc2``).

* ``embed`` is the output of ``embeddings``: [CLS] + patch embeddings + position embeddings
  (what block 0 receives); positions are the CLS token and the patches.
* ``resid.mid`` is the input of ``layernorm_after``; ``mlp.pre`` the output of ``mlp.fc1``; the
  neuron ``mlp.post`` the input of ``mlp.fc2``.
* ``logits`` is the output of ``classifier`` (``ViTForImageClassification``).
"""
from .base import Adapter, Mlp, Readout, Tiny
from .common import decoder_sites
from .tiny import FFN, HEADS, HIDDEN, INIT_RANGE, LAYERS, hf_config

VIT_SITES = decoder_sites(
    layer="layers.{i}",
    attn="attention",
    mlp="mlp",
    q="q_proj",
    v="v_proj",
    o="o_proj",
    ln_mid="layernorm_after",
    up="fc1",
    down="fc2",
    embed="embeddings",
    lm_head="classifier",
)

TINY = Tiny(lambda: hf_config("ViTConfig", hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                               num_attention_heads=HEADS, image_size=32, patch_size=8, num_channels=3,
                               initializer_range=INIT_RANGE),
            "ViTModel", images=True)

ADAPTERS = [Adapter("vit", ("vit",), "layers", VIT_SITES, Mlp(gated=False, act="activation_fn"), readout=Readout(final=("layernorm",)), tiny=TINY)]
