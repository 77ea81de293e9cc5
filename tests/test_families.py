"""Every supported family, one tiny random-init model each: the sites its adapter offers and
their shapes, the neuron against a recomputation by hand from the weights, outputs and model
state untouched by observing, and padding excluded from the statistics."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

import actscope
from actscope.models import resolve_module
from actscope.zoo.tiny import FAMILIES, tiny_model

MOE = {"mixtral", "qwen2_moe", "olmoe"}
ENCODERS = {"bert", "roberta", "vit"}  # bare encoders: no head, so no logits site
BLOCK_SITES = {
    "resid.pre", "resid.mid", "resid.post",
    "attn.pattern", "attn.v", "attn.z", "attn.z_norm", "attn.out",
    "mlp.pre", "mlp.post", "mlp.out",
}
LEFT_OUT = {"gpt_neox": {"resid.mid"}}  # parallel residual: there is no stream between the sub-blocks
FLAT_MLP = {"opt"}  # OPT flattens tokens before fc1/fc2: MLP sites are [batch·pos, unit]

# The module whose input is the MLP's input (relative to the base model), per family.
MLP_INPUT = {
    "gpt2": "h.{i}.mlp",
    "gpt_neox": "layers.{i}.mlp",
    "opt": "decoder.layers.{i}.fc1",
    "bert": "encoder.layer.{i}.intermediate",
    "roberta": "encoder.layer.{i}.intermediate",
    "vit": "layers.{i}.mlp",
}
BLOCK = {"gpt2": "h.{i}", "opt": "decoder.layers.{i}", "bert": "encoder.layer.{i}", "roberta": "encoder.layer.{i}"}
# The norm whose output the attention reads (None: post-norm, the block input itself).
ATTN_NORM = {"gpt2": "ln_1", "opt": "self_attn_layer_norm", "vit": "layernorm_before", "bert": None, "roberta": None}
ACTIVATION_KEYS = ("hidden_act", "hidden_activation", "activation_function")

DENSE = [f for f in FAMILIES if f not in {"mixtral", "olmoe"}]  # families with dense MLP blocks
PRE_NORM = [f for f in FAMILIES if f not in {"bert", "roberta"}]
TEXT = [f for f in FAMILIES if f != "vit"]


@lru_cache(maxsize=None)
def build(family: str) -> tuple[torch.nn.Module, dict]:
    """One tiny model per family for the whole file (tests only read it)."""
    return tiny_model(family)


# -- helpers -------------------------------------------------------------------------------
def module_at(model: torch.nn.Module, path: str) -> tuple[str, torch.nn.Module]:
    found = resolve_module(model, path)
    assert found is not None, f"{type(model).__name__} has no module {path}"
    return found


def activation(config) -> torch.nn.Module:
    from transformers.activations import ACT2FN

    name = next(getattr(config, key) for key in ACTIVATION_KEYS if getattr(config, key, None))
    return ACT2FN[name]


def is_moe_block(family: str, config, i: int) -> bool:
    if family == "qwen2_moe":
        return i not in (config.mlp_only_layers or []) and (i + 1) % config.decoder_sparse_step == 0
    return family in MOE


def n_experts(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts


def expected_sites(family: str, config) -> set[str]:
    names = {"embed"} | (set() if family in ENCODERS else {"logits"})
    for i in range(config.num_hidden_layers):
        block = BLOCK_SITES - LEFT_OUT.get(family, set())
        if is_moe_block(family, config, i):
            block = block - {"mlp.pre", "mlp.post"} | {"moe.router"}
            block |= {f"moe.experts.{e}.post" for e in range(n_experts(config))}
            if family == "qwen2_moe":
                block |= {"moe.shared.post"}
        names |= {f"blocks.{i}.{site}" for site in block}
    return names


def d_mlp(family: str, config) -> int:
    return {"gpt2": getattr(config, "n_inner", None), "opt": getattr(config, "ffn_dim", None)}.get(family) or config.intermediate_size


def d_expert(family: str, config) -> int:
    return config.moe_intermediate_size if family == "qwen2_moe" else config.intermediate_size


def d_head(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def n_kv(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def grid(family: str, inputs: dict, config) -> tuple[int, int]:
    """(batch, positions) of the example input."""
    if family == "vit":
        pixels = inputs["pixel_values"]
        patches = (pixels.shape[-2] // config.patch_size) * (pixels.shape[-1] // config.patch_size)
        return pixels.shape[0], patches + 1  # + [CLS]
    return tuple(inputs["input_ids"].shape)


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
@pytest.mark.parametrize("family", FAMILIES)
def test_sites_are_the_canonical_set_with_shapes(family):
    module, inputs = build(family)
    model = actscope.wrap(module)
    config = module.config
    assert model.family == family
    infos = {info.name: info for info in model.sites()}
    assert set(infos) == expected_sites(family, config)
    for name, info in infos.items():
        assert info.shape is not None, f"{name} delivered nothing on the example input"
        if name.endswith("attn.pattern"):
            assert info.shape[1] == config.num_attention_heads and info.shape[2] == info.shape[3]
        if name.endswith(("mlp.pre", "mlp.post")):
            assert info.shape[-1] == d_mlp(family, config)
        if ".experts." in name:
            assert info.layout == "tokens" and info.shape[-1] == d_expert(family, config)
        if name.endswith("moe.router"):
            assert info.layout == "flat" and info.shape == ("tokens", n_experts(config))


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_shapes(family):
    module, inputs = build(family)
    config = module.config
    batch, pos = grid(family, inputs, config)
    heads, hidden = config.num_attention_heads, config.hidden_size
    expected = {
        "blocks.0.attn.pattern": (batch, heads, pos, pos),
        "blocks.0.attn.z": (batch, pos, heads, d_head(config)),
        "blocks.0.attn.z_norm": (batch, pos, heads),
        "blocks.0.attn.v": (batch, pos, n_kv(config), d_head(config)),
        "blocks.0.attn.out": (batch, pos, hidden),
        "blocks.0.resid.pre": (batch, pos, hidden),
        "blocks.0.resid.post": (batch, pos, hidden),
        "embed": (batch, pos, hidden),
    }
    if family not in LEFT_OUT:
        expected["blocks.0.resid.mid"] = (batch * pos, hidden) if family in FLAT_MLP else (batch, pos, hidden)
    if family not in ENCODERS:
        expected["logits"] = (batch, pos, config.vocab_size)
    mlp_block = 1 if family == "qwen2_moe" else 0  # qwen2_moe's block 1 is dense
    if family not in {"mixtral", "olmoe"}:
        shape = (batch * pos, d_mlp(family, config)) if family in FLAT_MLP else (batch, pos, d_mlp(family, config))
        expected[f"blocks.{mlp_block}.mlp.pre"] = expected[f"blocks.{mlp_block}.mlp.post"] = shape
    if family in MOE:
        expected["blocks.0.moe.router"] = (batch * pos, n_experts(config))
    with torch.no_grad(), actscope.capture(module, list(expected)) as captured:
        module(**inputs)
    assert {site: tuple(captured.tensor(site).shape) for site in expected} == expected
    # attn.z_norm: one unit per head, the L2 norm of that head's output
    z = captured.tensor("blocks.0.attn.z").double()
    torch.testing.assert_close(captured.tensor("blocks.0.attn.z_norm").double(), z.pow(2).sum(-1).sqrt(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_pattern_rows_are_probabilities(family):
    module, inputs = build(family)
    with torch.no_grad(), actscope.capture(module, "blocks.*.attn.pattern") as captured:
        module(**inputs)
    pattern = captured.tensor("blocks.1.attn.pattern")
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
    if family not in ENCODERS:  # causal: nothing above the diagonal
        assert pattern.triu(diagonal=1).abs().max() == 0


@pytest.mark.parametrize("family", PRE_NORM)
def test_residual_sites_add_up(family):
    # resid.mid = resid.pre + attn.out and resid.post = resid.mid + mlp.out in pre-norm blocks;
    # GPT-NeoX (parallel) adds both to resid.pre. Post-norm encoders (BERT) normalise the sum.
    module, inputs = build(family)
    sites = ["blocks.0.resid.pre", "blocks.0.attn.out", "blocks.0.mlp.out", "blocks.0.resid.post"]
    parallel = family in LEFT_OUT
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


@pytest.mark.parametrize("family", FAMILIES)
def test_embed_is_what_block_0_receives(family):
    module, inputs = build(family)
    with torch.no_grad(), actscope.capture(module, "embed,blocks.0.resid.pre") as captured:
        module(**inputs)
    assert torch.equal(captured.tensor("embed"), captured.tensor("blocks.0.resid.pre"))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ENCODERS])
def test_logits_site_is_the_models_logits(family):
    # Gemma 2 soft-caps its logits after lm_head: the site must match the final logits.
    module, inputs = build(family)
    with torch.no_grad(), actscope.capture(module, "logits") as captured:
        logits = module(**inputs).logits
    assert torch.equal(captured.tensor("logits"), logits)


# -- (b) the neuron against a recomputation by hand -------------------------------------------
def hand_mlp(family: str, mlp: torch.nn.Module, x: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-activation, neuron) computed from the MLP's weights, independent of its forward."""
    if family == "gpt2":  # Conv1D: x @ W + b with W [in, out]
        pre = x @ mlp.c_fc.weight + mlp.c_fc.bias
        return pre, act(pre)
    plain = {"gpt_neox": "dense_h_to_4h", "bert": "dense", "roberta": "dense", "vit": "fc1"}
    if family in plain or family == "opt":
        linear = mlp if family == "opt" else getattr(mlp, plain[family])  # OPT: ``mlp`` is fc1
        pre = x @ linear.weight.T + linear.bias
        return pre, act(pre)
    if family == "phi3":  # fused [gate | up]
        d_ff = mlp.down_proj.weight.shape[1]
        gate, up = x @ mlp.gate_up_proj.weight[:d_ff].T, x @ mlp.gate_up_proj.weight[d_ff:].T
    else:  # gated (SwiGLU / GeGLU)
        gate, up = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    return gate, act(gate) * up


def dense_blocks(family: str, config) -> list[int]:
    return [i for i in range(config.num_hidden_layers) if not is_moe_block(family, config, i)]


@pytest.mark.parametrize("family", DENSE)
def test_mlp_pre_and_post_equal_recomputation_from_weights(family):
    module, inputs = build(family)
    act = activation(module.config)
    for i in dense_blocks(family, module.config):
        mlp_path, mlp = module_at(module, MLP_INPUT.get(family, "layers.{i}.mlp").format(i=i))
        sites = [f"module:{mlp_path}@input", f"blocks.{i}.mlp.pre", f"blocks.{i}.mlp.post"]
        with torch.no_grad(), actscope.capture(module, sites) as captured:
            module(**inputs)
        x, pre, post = (captured.tensor(site) for site in sites)
        with torch.no_grad():
            pre_by_hand, post_by_hand = hand_mlp(family, mlp, x, act)
        assert post.abs().max() > 1e-3  # not a degenerate all-zero comparison
        torch.testing.assert_close(pre, pre_by_hand, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post, post_by_hand, atol=1e-5, rtol=1e-5)


def hand_value(family: str, block: torch.nn.Module, x: torch.Tensor, config) -> torch.Tensor:
    """The per-head values from the weights; fused qkv layouts are sliced by hand."""
    heads, kv, hd, hidden = config.num_attention_heads, n_kv(config), d_head(config), config.hidden_size
    if family == "gpt2":  # c_attn output is [q | k | v], each ``hidden`` wide
        values = x @ block.attn.c_attn.weight[:, 2 * hidden:] + block.attn.c_attn.bias[2 * hidden:]
    elif family == "gpt_neox":  # per head [q | k | v], each d_head wide
        qkv = block.attention.query_key_value
        rows = torch.cat([torch.arange(h * 3 * hd + 2 * hd, (h + 1) * 3 * hd) for h in range(heads)])
        values = x @ qkv.weight[rows].T + qkv.bias[rows]
    elif family == "phi3":  # [q heads | kv heads | kv heads]
        values = x @ block.self_attn.qkv_proj.weight[(heads + kv) * hd:].T
    else:
        linear = {
            "bert": lambda b: b.attention.self.value,
            "roberta": lambda b: b.attention.self.value,
            "vit": lambda b: b.attention.v_proj,
        }.get(family, lambda b: b.self_attn.v_proj)(block)
        values = x @ linear.weight.T + (linear.bias if linear.bias is not None else 0)
    return values.reshape(*x.shape[:-1], kv, hd)


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_v_equals_value_projection_by_hand(family):
    module, inputs = build(family)
    block_path, block = module_at(module, BLOCK.get(family, "layers.{i}").format(i=0))
    norm = ATTN_NORM.get(family, "input_layernorm")
    x_site = f"module:{block_path}@input" if norm is None else f"module:{block_path}.{norm}@output"
    with torch.no_grad(), actscope.capture(module, [x_site, "blocks.0.attn.v"]) as captured:
        module(**inputs)
    x, v = captured.tensor(x_site), captured.tensor("blocks.0.attn.v")
    with torch.no_grad():
        by_hand = hand_value(family, block, x, module.config)
    torch.testing.assert_close(v, by_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [True, False], ids=["with-mask", "without-mask"])
@pytest.mark.parametrize("family", sorted(MOE))
def test_expert_neurons_equal_recomputation_from_routing(family, masked):
    module, inputs = build(family)
    if not masked:  # token positions must then come from the input's shape
        inputs = {"input_ids": inputs["input_ids"]}
    config = module.config
    act, k, experts = activation(config), config.num_experts_per_tok, n_experts(config)
    block_path, block = module_at(module, "layers.0")
    pos = inputs["input_ids"].shape[1]
    raw = [f"module:{block_path}.mlp.experts@input", "blocks.0.moe.router"]
    routed = [f"blocks.0.moe.experts.{e}.post" for e in range(experts)]
    if family == "qwen2_moe":
        raw.append("blocks.0.moe.shared.post")
    with torch.no_grad(), actscope.capture(module, raw) as tensors, actscope.capture(module, routed, flat=True) as flat:
        module(**inputs)
    x, logits = tensors.tensor(raw[0]), tensors.tensor(raw[1])  # [tokens, hidden], [tokens, experts]
    chosen = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1).indices  # [tokens, k]
    gate_up = block.mlp.experts.gate_up_proj  # [experts, 2·d_expert, hidden]: gate rows, then up rows
    d_ff = gate_up.shape[1] // 2
    seen = 0
    for e in range(experts):
        rows = (chosen == e).any(-1).nonzero().flatten()
        (reading,) = flat.readings[routed[e]]
        with torch.no_grad():
            by_hand = act(x[rows] @ gate_up[e, :d_ff].T) * (x[rows] @ gate_up[e, d_ff:].T)
        assert reading.values.shape == (len(rows), d_expert(family, config))
        torch.testing.assert_close(reading.values, by_hand, atol=1e-5, rtol=1e-5)
        tok = ((rows // pos) << 20) | (rows % pos)  # example << POS_BITS | position
        assert torch.equal(reading.tok, tok)
        seen += len(rows)
    assert seen == k * x.shape[0]  # every token reached k experts
    if family == "qwen2_moe":
        shared = block.mlp.shared_expert
        with torch.no_grad():
            by_hand = act(x @ shared.gate_proj.weight.T) * (x @ shared.up_proj.weight.T)
        torch.testing.assert_close(tensors.tensor(raw[2]), by_hand, atol=1e-5, rtol=1e-5)


# -- (c) observing changes nothing -------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_observing_leaves_outputs_bit_identical_and_state_restored(family):
    module, inputs = build(family)
    model = actscope.wrap(module)
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


@pytest.mark.parametrize("family", FAMILIES)
def test_pattern_sites_bit_identical_to_eager_and_state_restored(family):
    # Attention probabilities exist only in eager attention: the run switches to it (and back),
    # so the reference is the same model run eagerly without observation.
    module, inputs = build(family)
    model = actscope.wrap(module)
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


@pytest.mark.parametrize("family", FAMILIES)
def test_state_restored_when_the_block_raises(family):
    module, inputs = build(family)
    model = actscope.wrap(module)
    before = state(module)
    sites = ",".join(["blocks.*.attn.pattern", *neuron_sites(model)])
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), actscope.observe(model, sites):
            module(**inputs)
            assert state(module)["hooks"] > before["hooks"]
            raise RuntimeError("boom")
    assert_same_state(before, state(module))


# -- (d) padding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", TEXT)
def test_padded_batch_equals_unpadded_runs(family):
    module, inputs = build(family)
    model = actscope.wrap(module)
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
