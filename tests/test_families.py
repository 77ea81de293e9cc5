"""Every family, one tiny random-init model each: every family with a card (its tiny model,
``actscope.zoo.tiny.FAMILIES``) and the families without one that are recognised by their layout
(``tests/test_layouts.py``). The sites each offers and their shapes, the neuron and the attention
values against computations by hand, decoding against the model's own readout, outputs and model
state untouched by observing, and padding excluded from the statistics.

Nothing here knows a family by name. *Where* to look comes from the card's declarations: the
site paths (the MLP's container is the parent of the module ``mlp.post`` feeds), ``card.mlp``
(gated, fused, chained, the activation's and up projection's names), ``card.router``,
``card.readout``, and which sites the model offers. *What* the values must be is computed here
from the weights and the config, independently of actscope's readers. A new family is tested by
adding its card.
"""
from __future__ import annotations

import copy
import dataclasses
from functools import lru_cache

import pytest
import torch

import actscope
from actscope.explain.decode import decode
from actscope.models import resolve_module
from actscope.models.adapters import cards
from actscope.zoo.tiny import FAMILIES, MODEL_CLASSES, example_inputs, tiny_config, tiny_model
from test_layouts import LAYOUTS, expected_layout, layout_model

# Block forms a card handles by branching on the config, beyond the one its tiny model has: the
# tiny model's config with these fields changed runs through the whole matrix as well.
VARIANTS = {
    "falcon-multi-query": ("falcon", dict(new_decoder_architecture=False, multi_query=True)),  # Falcon-7B
    "falcon-interleaved-sequential": ("falcon", dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False,
                                                     num_kv_heads=4)),  # Falcon-RW
    "stablelm-parallel": ("stablelm", dict(use_parallel_residual=True, qk_layernorm=True)),  # StableLM 2 12B
}
SUBJECTS = (*FAMILIES, *VARIANTS, *LAYOUTS)
# Every block of every family offers these; besides them a block offers the dense neuron
# (mlp.pre, mlp.post) or the mixture-of-experts sites, and resid.mid where its card has one.
CORE = {"resid.pre", "resid.post", "attn.pattern", "attn.v", "attn.z", "attn.z_norm", "attn.out", "mlp.out"}
DENSE_NEURON = {"mlp.pre", "mlp.post"}
ACTIVATION_KEYS = ("hidden_act", "hidden_activation", "activation_function", "activation")


def declared(subject: str):
    """The card a subject is expected to have, known before its model is built (parametrisation)."""
    if subject in LAYOUTS:
        return expected_layout(subject)
    return {card.family: card for card in cards()}[VARIANTS[subject][0] if subject in VARIANTS else subject]


def takes_images(card) -> bool:
    return bool(card.tiny and card.tiny.images)


TEXT = [s for s in SUBJECTS if not takes_images(declared(s))]
WITH_MLP = [s for s in SUBJECTS if "blocks.{i}.mlp.post" in declared(s).sites]  # some block has a dense MLP
MOE = [s for s in SUBJECTS if declared(s).router is not None]
PRE_NORM = [s for s in SUBJECTS if declared(s).readout.post_norms is None]  # post-norm encoders normalise the sums
DECODABLE = [s for s in TEXT if s in WITH_MLP]


@lru_cache(maxsize=None)
def build(subject: str) -> tuple[torch.nn.Module, dict]:
    """One tiny model per subject for the whole file (tests only read it)."""
    if subject in VARIANTS:
        return variant_model(*VARIANTS[subject])
    return tiny_model(subject) if subject in FAMILIES else layout_model(subject)


def variant_model(family: str, changes: dict) -> tuple[torch.nn.Module, dict]:
    """The family's tiny model with ``changes`` to its config (rebuilt from the declared fields, so
    that what the config derives from them is derived again)."""
    import transformers

    config = tiny_config(family)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(type(config)) if hasattr(config, f.name)}
    config = type(config)(**{**fields, **changes})
    torch.manual_seed(0)
    module = getattr(transformers, MODEL_CLASSES[family])(config).eval()
    return module, example_inputs(family, config)


@lru_cache(maxsize=None)
def wrapped(subject: str) -> actscope.Model:
    model = actscope.wrap(build(subject)[0])
    assert model.adapter is not None, f"{subject} has no card and matched no layout"
    return model


# -- reading the card's declarations ----------------------------------------------------------
def module_at(model: torch.nn.Module, path: str) -> tuple[str, torch.nn.Module]:
    found = resolve_module(model, path)
    assert found is not None, f"{type(model).__name__} has no module {path}"
    return found


def site_module(module: torch.nn.Module, card, template: str, i: int = 0, e: int = 0) -> tuple[str, torch.nn.Module] | None:
    """(path, module) that the card's ``template`` hooks in block ``i``; None where the model has none."""
    hook = card.sites.get(template)
    return resolve_module(module, hook.path.format(i=i, e=e)) if hook is not None else None


def n_blocks(module: torch.nn.Module, card) -> int:
    return len(module_at(module, card.blocks)[1])


def offered(module: torch.nn.Module, card, template: str, i: int = 0) -> bool:
    return site_module(module, card, template, i) is not None


def dense_blocks(module: torch.nn.Module, card) -> list[int]:
    return [i for i in range(n_blocks(module, card)) if offered(module, card, "blocks.{i}.mlp.post", i)]


def moe_blocks(module: torch.nn.Module, card) -> list[int]:
    return [i for i in range(n_blocks(module, card)) if offered(module, card, "blocks.{i}.moe.router", i)]


def parent(path: str) -> str:
    return path.rpartition(".")[0]


# -- facts from the weights and the config, written here ----------------------------------------
def out_in(layer: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight as [out, in]: nn.Linear stores it so, transformers' Conv1D as [in, out]."""
    if isinstance(layer, torch.nn.Linear):
        return layer.weight
    assert type(layer).__name__ == "Conv1D", f"not a linear layer: {type(layer).__name__}"
    return layer.weight.T


def linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    bias = getattr(layer, "bias", None)
    return x @ out_in(layer).T + (0 if bias is None else bias)


def activation(config) -> torch.nn.Module:
    from transformers.activations import ACT2FN

    name = next(getattr(config, key) for key in ACTIVATION_KEYS if getattr(config, key, None))
    return ACT2FN[name]


def d_mlp(module: torch.nn.Module, card, i: int) -> int:
    """The neuron's width: the input width of the projection it feeds."""
    return out_in(site_module(module, card, "blocks.{i}.mlp.post", i)[1]).shape[1]


def experts_of(module: torch.nn.Module, card, i: int) -> torch.nn.Module | None:
    found = site_module(module, card, "blocks.{i}.moe.experts.{e}.post", i)
    return found[1] if found is not None else None


def expert_shape(experts: torch.nn.Module) -> tuple[int, int]:
    """(experts, d_expert) of a transformers 5.x fused experts module: gate_up_proj [experts, 2·d_expert, hidden]."""
    return experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[1] // 2


def heads(config) -> int:
    return config.num_attention_heads


def n_kv(config) -> int:
    return getattr(config, "num_key_value_heads", None) or heads(config)


def d_head(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // heads(config)


def grid(inputs: dict, config) -> tuple[int, int]:
    """(batch, positions) of the example input: token ids, or image patches plus [CLS]."""
    if "pixel_values" in inputs:
        pixels = inputs["pixel_values"]
        patches = (pixels.shape[-2] // config.patch_size) * (pixels.shape[-1] // config.patch_size)
        return pixels.shape[0], patches + 1
    return tuple(inputs["input_ids"].shape)


def expected_sites(module: torch.nn.Module, card) -> set[str]:
    """The card's site templates whose modules this model has, over its blocks and experts."""
    names = set()
    for template, hook in card.sites.items():
        blocks = range(n_blocks(module, card)) if "{i}" in template else [0]
        for i in blocks:
            experts = experts_of(module, card, i)
            count = expert_shape(experts)[0] if "{e}" in template and experts is not None else 1
            for e in range(count):
                if resolve_module(module, hook.path.format(i=i, e=e)) is not None:
                    names.add(template.format(i=i, e=e))
    return names


def neuron_sites(model: actscope.Model) -> list[str]:
    return [name for name in model.catalog if name.endswith(("mlp.post", "moe.shared.post")) or ".experts." in name]


def state(model: torch.nn.Module) -> dict:
    """Everything observing must leave as it found it."""
    return {
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks)
            + len(m._forward_hooks_with_kwargs) + len(m._forward_pre_hooks_with_kwargs)
            for m in model.modules()
        ),
        "training": [m.training for m in model.modules()],
        "attn": model.config._attn_implementation,
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["hooks"] == before["hooks"]
    assert after["training"] == before["training"]
    assert after["attn"] == before["attn"]
    assert after["params"].keys() == before["params"].keys()
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name], value), name


def main_output(output) -> torch.Tensor:
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


# -- (a) the sites each family offers, and their shapes --------------------------------------
@pytest.mark.parametrize("subject", SUBJECTS)
def test_sites_are_the_canonical_set_with_shapes(subject):
    module, _ = build(subject)
    model = wrapped(subject)
    card, config = model.adapter, module.config
    infos = {info.name: info for info in model.sites()}
    assert set(infos) == expected_sites(module, card)
    assert "embed" in infos
    for i in range(n_blocks(module, card)):
        block = {name.split(".", 2)[2] for name in infos if name.startswith(f"blocks.{i}.")}
        assert CORE <= block, (i, CORE - block)
        moe = "moe.router" in block and "moe.experts.0.post" in block
        assert (DENSE_NEURON <= block) != moe, (i, block)  # one neuron per block: dense or experts
    for name, info in infos.items():
        assert info.shape is not None, f"{name} delivered nothing on the example input"
        i = int(name.split(".")[1]) if name.startswith("blocks.") else 0
        if name.endswith("attn.pattern"):
            assert info.shape[1] == heads(config) and info.shape[2] == info.shape[3]
        if name.endswith(("mlp.pre", "mlp.post")):
            assert info.shape[-1] == d_mlp(module, card, i)
        if ".experts." in name:
            assert info.layout == "tokens" and info.shape[-1] == expert_shape(experts_of(module, card, i))[1]
        if name.endswith("moe.router"):
            assert info.layout == "flat" and info.shape == ("tokens", expert_shape(experts_of(module, card, i))[0])


@pytest.mark.parametrize("subject", SUBJECTS)
def test_captured_shapes(subject):
    module, inputs = build(subject)
    card, config = wrapped(subject).adapter, module.config
    batch, pos = grid(inputs, config)
    hidden = config.hidden_size

    def units(template: str, width: int) -> tuple[int, ...]:
        return (batch * pos, width) if card.sites[template].layout == "flat" else (batch, pos, width)

    expected = {
        "blocks.0.attn.pattern": (batch, heads(config), pos, pos),
        "blocks.0.attn.z": (batch, pos, heads(config), d_head(config)),
        "blocks.0.attn.z_norm": (batch, pos, heads(config)),
        "blocks.0.attn.v": (batch, pos, n_kv(config), d_head(config)),
        "blocks.0.attn.out": (batch, pos, hidden),
        "blocks.0.resid.pre": (batch, pos, hidden),
        "blocks.0.resid.post": (batch, pos, hidden),
        "embed": (batch, pos, hidden),
    }
    if offered(module, card, "blocks.{i}.resid.mid"):
        expected["blocks.0.resid.mid"] = units("blocks.{i}.resid.mid", hidden)
    if offered(module, card, "logits"):
        expected["logits"] = (batch, pos, config.vocab_size)
    for i in dense_blocks(module, card)[:1]:
        expected[f"blocks.{i}.mlp.pre"] = expected[f"blocks.{i}.mlp.post"] = units("blocks.{i}.mlp.post", d_mlp(module, card, i))
    for i in moe_blocks(module, card)[:1]:
        expected[f"blocks.{i}.moe.router"] = (batch * pos, expert_shape(experts_of(module, card, i))[0])
    with torch.no_grad(), actscope.capture(module, list(expected)) as captured:
        module(**inputs)
    assert {site: tuple(captured.tensor(site).shape) for site in expected} == expected
    # attn.z_norm: one unit per head, the L2 norm of that head's output
    z = captured.tensor("blocks.0.attn.z").double()
    torch.testing.assert_close(captured.tensor("blocks.0.attn.z_norm").double(), z.pow(2).sum(-1).sqrt(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("subject", SUBJECTS)
def test_pattern_rows_are_probabilities(subject):
    module, inputs = build(subject)
    with torch.no_grad(), actscope.capture(module, "blocks.*.attn.pattern") as captured:
        module(**inputs)
    pattern = captured.tensor("blocks.1.attn.pattern")
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
    above = pattern.triu(diagonal=1).abs().max()
    if module.can_generate():  # a model that generates text attends causally: nothing above the diagonal
        assert above == 0
    else:  # an encoder attends both ways
        assert above > 0


@pytest.mark.parametrize("subject", PRE_NORM)
def test_residual_sites_add_up(subject):
    # resid.mid = resid.pre + attn.out and resid.post = resid.mid + mlp.out in pre-norm blocks; a
    # parallel block (no resid.mid: GPT-NeoX, GPT-J, parallel Falcon) adds both to resid.pre.
    # Post-norm encoders (BERT) normalise the sums, so they are not in this test.
    module, inputs = build(subject)
    card = wrapped(subject).adapter
    sites = ["blocks.0.resid.pre", "blocks.0.attn.out", "blocks.0.mlp.out", "blocks.0.resid.post"]
    parallel = not offered(module, card, "blocks.{i}.resid.mid")
    if not parallel:
        sites.append("blocks.0.resid.mid")
    with torch.no_grad(), actscope.capture(module, sites) as captured:
        module(**inputs)
    t = {site.split(".", 2)[-1]: captured.tensor(site) for site in sites}
    mlp_out = t["mlp.out"].reshape(t["resid.pre"].shape)
    if parallel:
        torch.testing.assert_close(t["resid.post"], t["resid.pre"] + t["attn.out"] + mlp_out, atol=1e-5, rtol=1e-5)
        return
    mid = t["resid.mid"].reshape(t["resid.pre"].shape)
    torch.testing.assert_close(mid, t["resid.pre"] + t["attn.out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t["resid.post"], mid + mlp_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("subject", SUBJECTS)
def test_embed_is_what_block_0_receives(subject):
    module, inputs = build(subject)
    with torch.no_grad(), actscope.capture(module, "embed,blocks.0.resid.pre") as captured:
        module(**inputs)
    assert torch.equal(captured.tensor("embed"), captured.tensor("blocks.0.resid.pre"))


@pytest.mark.parametrize("subject", SUBJECTS)
def test_logits_site_is_the_models_logits(subject):
    # Gemma 2 soft-caps its logits after lm_head: the site must match the final logits. A bare
    # model (no head) returns no logits and must not offer the site.
    module, inputs = build(subject)
    model = wrapped(subject)
    with torch.no_grad():
        if "logits" not in model.catalog:
            assert getattr(module(**inputs), "logits", None) is None
            return
        with actscope.capture(module, "logits") as captured:
            logits = module(**inputs).logits
    assert torch.equal(captured.tensor("logits"), logits)


# -- (b) the neuron and the attention values against computations by hand ------------------
def hand_mlp(spec, container: torch.nn.Module, first: torch.nn.Module, x: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-activation, neuron) from the weights the card names, independent of the MLP's forward:
    ``act(first(x))``, or ``act(gate) · up`` for a gated MLP (gate and up: two projections, or the
    two halves of one fused projection's output)."""
    if spec is None or not spec.gated:
        pre = linear(first, x)
        return pre, act(pre)
    if spec.fused:
        gate, up = linear(first, x).chunk(2, dim=-1)
    else:
        gate, up = linear(first, x), linear(getattr(container, spec.up), x)
    return gate, act(gate) * up


@pytest.mark.parametrize("subject", WITH_MLP)
def test_mlp_pre_and_post_equal_recomputation_from_weights(subject):
    module, inputs = build(subject)
    card = wrapped(subject).adapter
    act = activation(module.config)
    for i in dense_blocks(module, card):
        pre_path, first = site_module(module, card, "blocks.{i}.mlp.pre", i)
        post_path, _ = site_module(module, card, "blocks.{i}.mlp.post", i)
        container_path = parent(post_path)  # the MLP module; the block itself when card.mlp.chained
        container = module.get_submodule(container_path)
        if parent(pre_path) != container_path:
            # Post-norm encoders (BERT, RoBERTa) split the MLP over two sub-modules of the block
            # (intermediate.dense → act → output.dense): no module holds both projections, and the
            # card has no mlp part. Such an MLP is plain, act(first(x)), x the first projection's input.
            spec, x_path = None, pre_path
        else:
            spec = card.mlp
            assert spec is not None, f"{subject}: an MLP container without the card's mlp part"
            x_path = pre_path if spec.chained else container_path  # chained: the block's input is not the MLP's
        sites = [f"module:{x_path}@input", f"blocks.{i}.mlp.pre", f"blocks.{i}.mlp.post"]
        with torch.no_grad(), actscope.capture(module, sites) as captured:
            module(**inputs)
        x, pre, post = (captured.tensor(site) for site in sites)
        with torch.no_grad():
            pre_by_hand, post_by_hand = hand_mlp(spec, container, first, x, act)
            if spec is not None:  # the card's activation attribute computes the config's activation
                torch.testing.assert_close(getattr(container, spec.act)(pre_by_hand), act(pre_by_hand))
        assert post.abs().max() > 1e-3  # not a degenerate all-zero comparison
        torch.testing.assert_close(pre, pre_by_hand, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post, post_by_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("subject", SUBJECTS)
def test_attn_z_is_each_heads_pattern_times_its_values(subject):
    # With eager attention each head's output is its probabilities times its values:
    # z[b, q, h] = Σ_k pattern[b, h, q, k] · v[b, k, h // group], group = heads / key-value heads.
    # This needs no knowledge of how a fused projection lays out q, k and v: a reader that took
    # the wrong slice would not reproduce the model's own head outputs.
    module, inputs = build(subject)
    sites = ["blocks.0.attn.pattern", "blocks.0.attn.v", "blocks.0.attn.z"]
    with torch.no_grad(), actscope.capture(module, sites) as captured:
        module(**inputs)
    pattern, v, z = (captured.tensor(site).double() for site in sites)  # [b, h, q, k], [b, k, kv, d], [b, q, h, d]
    group = z.shape[2] // v.shape[2]
    assert z.shape[2] == group * v.shape[2] and z.shape[3] == v.shape[3]
    by_hand = torch.einsum("bhqk,bkhd->bqhd", pattern, v.repeat_interleave(group, dim=2))
    assert z.abs().max() > 1e-3
    torch.testing.assert_close(z, by_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("subject", SUBJECTS)
def test_attn_v_equals_a_plain_value_projection_by_hand(subject):
    module, inputs = build(subject)
    card, config = wrapped(subject).adapter, module.config
    kv, hd = n_kv(config), d_head(config)
    v_path, v_layer = site_module(module, card, "blocks.{i}.attn.v")
    width = out_in(v_layer).shape[0]
    if width != kv * hd:
        # a fused q|k|v projection (its value part is checked through z = pattern · v above)
        assert width == (heads(config) + 2 * kv) * hd
        return
    x_site = f"module:{v_path}@input"
    with torch.no_grad(), actscope.capture(module, [x_site, "blocks.0.attn.v"]) as captured:
        module(**inputs)
    x, v = captured.tensor(x_site), captured.tensor("blocks.0.attn.v")
    with torch.no_grad():
        by_hand = linear(v_layer, x).reshape(*x.shape[:-1], kv, hd)
    torch.testing.assert_close(v, by_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [True, False], ids=["with-mask", "without-mask"])
@pytest.mark.parametrize("subject", MOE)
def test_expert_neurons_equal_recomputation_from_routing(subject, masked):
    module, inputs = build(subject)
    card = wrapped(subject).adapter
    if not masked:  # token positions must then come from the input's shape
        inputs = {"input_ids": inputs["input_ids"]}
    config = module.config
    act, k = activation(config), config.num_experts_per_tok
    i = moe_blocks(module, card)[0]
    experts_path, experts = site_module(module, card, "blocks.{i}.moe.experts.{e}.post", i)
    n_experts, d_expert = expert_shape(experts)
    pos = inputs["input_ids"].shape[1]
    raw = [f"module:{experts_path}@input", f"blocks.{i}.moe.router"]
    routed = [f"blocks.{i}.moe.experts.{e}.post" for e in range(n_experts)]
    shared = offered(module, card, "blocks.{i}.moe.shared.post", i)
    if shared:
        raw.append(f"blocks.{i}.moe.shared.post")
    with torch.no_grad(), actscope.capture(module, raw) as tensors, actscope.capture(module, routed, flat=True) as flat:
        module(**inputs)
    x, logits = tensors.tensor(raw[0]), tensors.tensor(raw[1])  # [tokens, hidden], [tokens, experts]
    chosen = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1).indices  # [tokens, k]
    gate_up = experts.gate_up_proj  # [experts, 2·d_expert, hidden]: gate rows, then up rows
    seen = 0
    for e in range(n_experts):
        rows = (chosen == e).any(-1).nonzero().flatten()
        (reading,) = flat.readings[routed[e]]
        with torch.no_grad():
            by_hand = act(x[rows] @ gate_up[e, :d_expert].T) * (x[rows] @ gate_up[e, d_expert:].T)
        assert reading.values.shape == (len(rows), d_expert)
        torch.testing.assert_close(reading.values, by_hand, atol=1e-5, rtol=1e-5)
        tok = ((rows // pos) << 20) | (rows % pos)  # example << POS_BITS | position
        assert torch.equal(reading.tok, tok)
        seen += len(rows)
    assert seen == k * x.shape[0]  # every token reached k experts
    if shared:  # a dense MLP laid out like the card's own (its first projection named as mlp.pre's)
        shared_path, _ = site_module(module, card, "blocks.{i}.moe.shared.post", i)
        container = module.get_submodule(parent(shared_path))
        first = getattr(container, card.sites["blocks.{i}.mlp.pre"].path.rpartition(".")[2])
        with torch.no_grad():
            _, by_hand = hand_mlp(card.mlp, container, first, x, act)
        torch.testing.assert_close(tensors.tensor(raw[2]), by_hand, atol=1e-5, rtol=1e-5)


# -- (c) decoding against the model's own readout ---------------------------------------------
def readout_by_forward(module: torch.nn.Module, card, directions: torch.Tensor) -> torch.Tensor:
    """``[n, vocab]`` scores of ``directions`` ``[n, hidden]`` read out by the model itself: the last
    block's output replaced by each direction, minus the logits of a zero direction (what a norm's
    bias and the head's bias add). A pre-norm model's final norm and head are linear in the
    direction up to a positive factor per row, so these rank tokens like decoding must."""
    last = module_at(module, card.blocks)[1][-1]
    rows = torch.cat([directions, torch.zeros_like(directions[:1])])[:, None, :]  # [n + 1, 1, hidden]

    def replace(_, args, output):
        return (rows, *output[1:]) if isinstance(output, tuple) else rows

    handle = last.register_forward_hook(replace)
    try:
        with torch.no_grad():
            logits = module(input_ids=torch.full((rows.shape[0], 1), 3)).logits[:, -1]
    finally:
        handle.remove()
    return logits[:-1] - logits[-1]


def readout_by_norms(module: torch.nn.Module, card, layer: int, directions: torch.Tensor) -> torch.Tensor:
    """``[n, vocab]`` scores in a post-norm encoder: each direction passes its block's second norm
    and both norms of every later block (each applied as the real module minus its bias), then
    the (tied) word embeddings."""
    blocks = module_at(module, card.blocks)[0]
    first, second = card.readout.post_norms
    names = [f"{blocks}.{layer}.{second}"] + [
        f"{blocks}.{j}.{name}" for j in range(layer + 1, n_blocks(module, card)) for name in (first, second)
    ]
    d = directions
    with torch.no_grad():
        for name in names:
            norm = module.get_submodule(name)
            d = norm(d) - (0 if getattr(norm, "bias", None) is None else norm.bias)
    return d @ module.get_input_embeddings().weight.T


def with_gains(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy whose norms' gains vary over the channels, so that decoding must apply them."""
    copied = copy.deepcopy(module).double()
    try:
        copied.set_experts_implementation("eager")  # grouped matrix products have no float64 kernel
    except ValueError:
        pass  # a model without experts
    with torch.no_grad():
        for layer in copied.modules():
            weight = getattr(layer, "weight", None)
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Embedding)) and isinstance(weight, torch.nn.Parameter) and weight.dim() == 1:
                weight.copy_(torch.linspace(0.5, 1.5, weight.numel(), dtype=weight.dtype))
    return copied


@pytest.mark.parametrize("subject", DECODABLE)
def test_decoding_ranks_tokens_like_the_models_own_readout(subject):
    source, _ = build(subject)
    card = wrapped(subject).adapter
    module = with_gains(source)
    layer, units, top = dense_blocks(module, card)[0], list(range(6)), 5
    decoded = decode(actscope.wrap(module), f"blocks.{layer}.mlp.post[{','.join(map(str, units))}]", top=top)
    directions = out_in(site_module(module, card, "blocks.{i}.mlp.post", layer)[1]).detach()[:, units].T  # [units, hidden]
    by_norms = card.readout.post_norms is not None
    scores = readout_by_norms(module, card, layer, directions) if by_norms else readout_by_forward(module, card, directions)
    for row, unit in enumerate(units):
        for direction, descending in (("promoted", True), ("suppressed", False)):
            keep = (decoded.unit == unit) & (decoded.direction == direction)
            expected = torch.argsort(scores[row], descending=descending)[:top]
            assert decoded.token_id[keep].tolist() == expected.tolist(), (unit, direction)


# -- (d) observing changes nothing -------------------------------------------------------------
@pytest.mark.parametrize("subject", SUBJECTS)
def test_observing_leaves_outputs_bit_identical_and_state_restored(subject):
    module, inputs = build(subject)
    model = wrapped(subject)
    before = state(module)
    sites = [name for name in model.catalog if not name.endswith("attn.pattern")]  # every other site
    with torch.no_grad():
        plain = main_output(module(**inputs))
        with actscope.observe(model, sites) as observer:
            observed = main_output(module(**inputs))
        after = main_output(module(**inputs))
    assert set(observer.stats) == set(sites)
    assert torch.equal(plain, observed)
    assert torch.equal(plain, after)
    assert_same_state(before, state(module))


@pytest.mark.parametrize("subject", SUBJECTS)
def test_pattern_sites_bit_identical_to_eager_and_state_restored(subject):
    # Attention probabilities exist only in eager attention: the run switches to it (and back),
    # so the reference is the same model run eagerly without observation.
    module, inputs = build(subject)
    model = wrapped(subject)
    before = state(module)
    sites = ",".join(["blocks.*.attn.pattern", *neuron_sites(model)])
    with torch.no_grad():
        module.set_attn_implementation("eager")
        try:
            eager = main_output(module(**inputs))
        finally:
            module.set_attn_implementation(before["attn"])
        with actscope.observe(model, sites) as observer:
            observed = main_output(module(**inputs))
    assert "blocks.0.attn.pattern" in observer.stats
    assert torch.equal(eager, observed)
    assert_same_state(before, state(module))


@pytest.mark.parametrize("subject", SUBJECTS)
def test_state_restored_when_the_block_raises(subject):
    module, inputs = build(subject)
    model = wrapped(subject)
    before = state(module)
    sites = ",".join(["blocks.*.attn.pattern", *neuron_sites(model)])
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), actscope.observe(model, sites):
            module(**inputs)
            assert state(module)["hooks"] > before["hooks"]
            raise RuntimeError("boom")
    assert_same_state(before, state(module))


# -- (e) padding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("subject", TEXT)
def test_padded_batch_equals_unpadded_runs(subject):
    module, inputs = build(subject)
    model = wrapped(subject)
    ids = inputs["input_ids"]
    lengths = [ids.shape[1], ids.shape[1] - 2]
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    padded = ids.masked_fill(mask == 0, module.config.pad_token_id or 0)  # right padding
    sites = neuron_sites(model) + ["blocks.1.resid.post"]
    with torch.no_grad():
        with actscope.observe(model, sites) as together:
            module(input_ids=padded, attention_mask=mask)
        with actscope.observe(model, sites) as alone:
            for row, length in enumerate(lengths):
                one = padded[row : row + 1, :length]
                module(input_ids=one, attention_mask=torch.ones_like(one))
    assert set(together.stats) == set(alone.stats)
    for site in together.stats:
        a, b = together.stats[site].moments, alone.stats[site].moments
        assert torch.equal(a.count, b.count), site
        torch.testing.assert_close(a.mean, b.mean, atol=1e-5, rtol=1e-5, equal_nan=True, msg=site)
    real = sum(lengths)
    assert int(together.stats["blocks.1.resid.post"].moments.count.max()) == real
