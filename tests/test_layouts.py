"""Families without a card, recognised by their structure (models/adapters/layouts.py).

:data:`LAYOUTS` are transformers families that have no card but are built like a family that has
one; each gets that card's sites, says so once in a log line, and runs through the whole family
matrix (tests/test_families.py) and, where its layout has a dense MLP card, sparse execution
(tests/test_sparse_execution.py). :data:`NO_LAYOUT` are families built differently — some with the
very module names of a carded family — that must not be matched: they keep module sites only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pytest
import torch

import actscope
from actscope.models.adapters import adapter_for, card_for, cards
from actscope.models.adapters.layouts import layout_mismatch, shapes_fit
from actscope.models.adapters.tiny import FFN, HEADS, HIDDEN, INIT_RANGE, LAYERS, POSITIONS, VOCAB, decoder_shape, hf_config, ids
from actscope.zoo.tiny import tiny_model

BATCH, POSITIONS_IN = 2, 6
ENCODER_SHAPE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, max_position_embeddings=POSITIONS, initializer_range=INIT_RANGE)
GPT_SHAPE = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS,
                 initializer_range=INIT_RANGE, bos_token_id=0, eos_token_id=0)


@dataclass(frozen=True)
class Cardless:
    """A tiny model of a card-less family: config class and fields, model class, the card whose
    layout it has (None: none), lowest token id of its inputs."""

    config_class: str
    model_class: str
    fields: dict = field(default_factory=dict)
    layout: str | None = None
    first_token: int = 0


LAYOUTS = {
    # grouped-query attention (2 key/value heads for 4), a LayerNorm without parameters
    "olmo": Cardless("OlmoConfig", "OlmoForCausalLM", decoder_shape(num_key_value_heads=2, **ids()), "llama"),
    "helium": Cardless("HeliumConfig", "HeliumForCausalLM", decoder_shape(num_key_value_heads=2, head_dim=HIDDEN // HEADS, **ids()), "llama"),
    "smollm3": Cardless("SmolLM3Config", "SmolLM3ForCausalLM", decoder_shape(num_key_value_heads=2, **ids()), "llama"),
    # head_dim 16 with hidden size 32 and 4 heads: the attention is wider than the stream
    "seed_oss": Cardless("SeedOssConfig", "SeedOssForCausalLM", decoder_shape(num_key_value_heads=2, head_dim=16, **ids()), "llama"),
    # q/k norms per head (OLMoE's act on the whole width): the values are untouched either way
    "qwen3_moe": Cardless("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      decoder_shape(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, **ids()),
                      "olmoe"),
    # RoBERTa's modules and position ids (counted from pad_token_id + 1; ids 0-2 special)
    "camembert": Cardless("CamembertConfig", "CamembertModel", dict(ENCODER_SHAPE, pad_token_id=1, bos_token_id=0, eos_token_id=2),
                      "bert", first_token=3),
}

NO_LAYOUT = {
    # Llama's module names, but post-norm: h = x + post_attention_layernorm(attn(x)), so Llama's
    # resid.mid (the input of post_attention_layernorm) would be the attention output
    "olmo2": Cardless("Olmo2Config", "Olmo2ForCausalLM", decoder_shape(num_key_value_heads=2, **ids())),
    # GPT-2's module names, but c_attn is fused per head ([q|k|v] for each head), where GPT-2's
    # reader would take the last third of the whole output
    "gpt_bigcode": Cardless("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(GPT_SHAPE, multi_query=False)),
    # ... and multi-query: c_attn outputs hidden + 2·head_dim, too narrow for three hidden-wide blocks
    "gpt_bigcode_mqa": Cardless("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(GPT_SHAPE, multi_query=True)),
    # Llama's attention and Phi-3's fused gate_up_proj MLP: no card has both
    "glm": Cardless("GlmConfig", "GlmForCausalLM", decoder_shape(num_key_value_heads=2, head_dim=HIDDEN // HEADS, **ids())),
}


@lru_cache(maxsize=None)
def layout_model(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A random-init model of a card-less family (eval mode, seeded) and ``[2, 6]`` token ids."""
    import transformers

    tiny = {**LAYOUTS, **NO_LAYOUT}[name]
    torch.manual_seed(seed)
    module = getattr(transformers, tiny.model_class)(hf_config(tiny.config_class, **tiny.fields)).eval()
    ids_ = torch.randint(tiny.first_token, VOCAB, (BATCH, POSITIONS_IN), generator=torch.Generator().manual_seed(seed))
    return module, {"input_ids": ids_, "attention_mask": torch.ones_like(ids_)}


def card_named(family: str) -> Any:
    return next(card for card in cards() if card.family == family)


def expected_layout(name: str) -> Any:
    """The card a card-less family is expected to match (for the matrices' parametrisation)."""
    return card_named(LAYOUTS[name].layout)


def fresh(name: str) -> torch.nn.Module:
    """A new module (not the cached one), so that its match and log line happen in the test."""
    return layout_model.__wrapped__(name)[0]


def actscope_notes(caplog) -> list[str]:
    return [" ".join(r.getMessage().split()) for r in caplog.records if r.name == "actscope" and r.levelno >= logging.WARNING]


# -- matched ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_cardless_family_gets_its_layouts_card_and_says_so_once(name, caplog):
    module = fresh(name)
    layout = LAYOUTS[name].layout
    assert adapter_for(module.config) is None  # really a family without a card
    with caplog.at_level(logging.WARNING, logger="actscope"):
        first, again = actscope.wrap(module), actscope.wrap(module)
    expected = f"{name} ({layout} layout)"
    assert first.family == again.family == expected
    line = (f"{type(module).__name__}: model type '{name}' has no actscope card of its own; its modules match the "
            f"{layout} layout, so its sites come from the {layout} card (family '{expected}')")
    assert actscope_notes(caplog) == [line]
    card = first.adapter
    source = card_named(layout)
    assert card.model_types == (name,) and card.tiny is None
    assert card.sites == source.sites and card.mlp == source.mlp and card.readout == source.readout
    assert f"family={expected}" in repr(first)
    assert first.catalog and all(not site.startswith("module:") for site in first.catalog)


def test_a_bare_model_matches_without_its_head():
    """OlmoModel (no lm_head): the same layout, every site but logits."""
    import transformers

    tiny = LAYOUTS["olmo"]
    bare = actscope.wrap(transformers.OlmoModel(hf_config(tiny.config_class, **tiny.fields)))
    with_head = actscope.wrap(layout_model("olmo")[0])
    assert bare.family == "olmo (llama layout)"
    assert set(bare.catalog) == set(with_head.catalog) - {"logits"}


@pytest.mark.parametrize("family", ["llama", "stablelm", "gpt2", "falcon", "bert", "olmoe"])
def test_a_carded_family_keeps_its_own_card_without_a_log_line(family, caplog):
    module, _ = tiny_model(family)
    with caplog.at_level(logging.WARNING, logger="actscope"):
        model = actscope.wrap(module)
    assert model.adapter is adapter_for(module.config) and model.family == family
    assert actscope_notes(caplog) == []


def test_a_matched_mixture_of_experts_refuses_the_router_rule_it_cannot_see():
    module, _ = layout_model("qwen3_moe")
    model = actscope.wrap(module)
    assert model.n_experts == module.config.num_experts  # the experts are counted from the config as the card says
    with pytest.raises(actscope.InputError, match="model type 'qwen3_moe' has no actscope card, so whether its router renormalises"):
        model.router("moe_routing").renormalise(module.config)


def test_a_calibration_records_the_matched_family():
    from actscope.sparse import calibrate

    model = actscope.wrap(layout_model("olmo")[0])
    ids_ = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
    calibration = calibrate(model, [{"input_ids": ids_, "attention_mask": torch.ones_like(ids_)}], method="cats", sparsity=0.5)
    assert calibration.family == "olmo (llama layout)"


# -- not matched -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(NO_LAYOUT))
def test_a_family_built_differently_keeps_module_sites_only(name, caplog):
    module = fresh(name)
    with caplog.at_level(logging.WARNING, logger="actscope"):
        model = actscope.wrap(module)
    assert model.adapter is None and model.family is None and model.catalog == {}
    assert actscope_notes(caplog) == []
    with pytest.raises(actscope.SiteError, match="canonical site name"), actscope.capture(model, "blocks.0.mlp.post"):
        pass
    block = next(path for path, m in module.named_modules() if isinstance(m, torch.nn.ModuleList))
    _, inputs = layout_model(name)
    with torch.no_grad(), actscope.capture(model, f"module:{block}.0@input") as captured:
        module(**inputs)
    assert captured.tensor(f"module:{block}.0@input").shape == (BATCH, POSITIONS_IN, HIDDEN)


@pytest.mark.parametrize(("name", "nearest", "reason"), [
    ("olmo2", "llama", ("'layers.0' has children ['mlp', 'post_attention_layernorm', 'post_feedforward_layernorm', 'self_attn'], "
                        "the llama layout ['input_layernorm', 'mlp', 'post_attention_layernorm', 'self_attn']")),
    ("gpt_bigcode", "gpt2", ("'h.0.attn' has children ['c_attn', 'c_proj', 'resid_dropout'], "
                             "the gpt2 layout ['attn_dropout', 'c_attn', 'c_proj', 'resid_dropout']")),
    ("glm", "llama", ("'layers.0.mlp' has children ['activation_fn', 'down_proj', 'gate_up_proj'], "
                      "the llama layout ['act_fn', 'down_proj', 'gate_proj', 'up_proj']")),
])
def test_the_mismatch_is_named(name, nearest, reason):
    assert layout_mismatch(layout_model(name)[0], card_named(nearest)) == reason


def test_the_shapes_refuse_a_fused_projection_the_readers_cannot_split():
    # multi-query c_attn outputs hidden + 2·head_dim = 48: GPT-2's reader would make heads of 4, not 8
    mqa, _ = layout_model("gpt_bigcode_mqa")
    assert shapes_fit(mqa, None, card_named("gpt2")) == "attn.v would be (4, 4) (value heads, head_dim) for 4 heads of 8"
    full, _ = layout_model("gpt_bigcode")  # the widths of GPT-2's c_attn: the children tell this one apart
    assert shapes_fit(full, None, card_named("gpt2")) is None


def test_a_module_without_a_config_has_no_card():
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    assert card_for(module) is None
    model = actscope.wrap(module)
    assert model.adapter is None and model.catalog == {}
    with torch.no_grad(), actscope.capture(model, "module:1@output") as captured:
        module(torch.ones(3, 4))
    assert captured.tensor("module:1@output").shape == (3, 8)


def test_a_config_alone_is_not_a_layout():
    """A module that carries a Llama-like config but not Llama's modules matches nothing."""

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = hf_config("OlmoConfig", **decoder_shape(**ids()))
            self.layers = torch.nn.ModuleList([torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS)])

    module = Wrapper()
    assert card_for(module) is None
    assert layout_mismatch(module, card_named("llama")) == (
        "'layers.0' has children [], the llama layout ['input_layernorm', 'mlp', 'post_attention_layernorm', 'self_attn']"
    )

