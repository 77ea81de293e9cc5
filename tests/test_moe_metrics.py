"""MoE routing on tiny Mixtral, Qwen2-MoE and OLMoE: frequencies and weights against a naive
numpy computation from the raw router logits (padding dropped by hand), against the model's
own routing decisions, and expert neuron activation ratios recomputed from the weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actscope.errors import InputError
from actscope.metrics.moe import moe_routing
from actscope.zoo.tiny import tiny_config, tiny_model

FAMILIES = ["mixtral", "qwen2_moe", "olmoe"]
EPS = 1e-3


def padded(family: str, **config_changes):
    if config_changes:
        import transformers

        from actscope.zoo.tiny import MODEL_CLASSES, example_inputs

        config = tiny_config(family)
        for key, value in config_changes.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = getattr(transformers, MODEL_CLASSES[family])(config).eval()
        inputs = example_inputs(family, config)
    else:
        model, inputs = tiny_model(family)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], inputs["input_ids"].flip(1)], dim=1)  # [2, 12]
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][1, 5:] = 0  # example 1: 5 real tokens, 7 of padding
    return model, inputs


def moe_blocks(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")]


def naive_routing(logits: np.ndarray, k: int, renormalise: bool, experts: int):
    """Frequency, mean applied weight and mean probability per expert, in float64 numpy."""
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)  # [n, E]
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # [n, k]
    weights = np.take_along_axis(probs, top, 1)
    if renormalise:
        weights = weights / weights.sum(1, keepdims=True)
    routed = np.array([(top == e).sum() for e in range(experts)])
    weight_sum = np.array([weights[top == e].sum() for e in range(experts)])
    return routed / len(logits), weight_sum / np.maximum(routed, 1), probs.mean(0), routed


def recorded(model, inputs):
    """Per MoE block, the model's own router logits and routing, and the experts' inputs."""
    seen: dict[int, dict] = {}
    handles = []
    for i in moe_blocks(model):
        mlp = model.model.layers[i].mlp
        handles.append(mlp.gate.register_forward_hook(lambda m, a, out, i=i: seen.setdefault(i, {}).update(gate=out)))
        handles.append(mlp.experts.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, {}).update(hidden=a[0])))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_matches_naive_and_the_model(family):
    model, inputs = padded(family)
    result = moe_routing(model, [inputs], eps=EPS)
    table = result.to_table()
    config = model.config
    keep = inputs["attention_mask"].bool().reshape(-1)  # [batch·pos]
    seen = recorded(model, inputs)
    k, experts = config.num_experts_per_tok, int(table["expert"].max()) + 1
    assert result.top_k == k and result.renormalised == (family == "mixtral")
    assert sorted(set(table["layer"].tolist())) == moe_blocks(model)
    for i in moe_blocks(model):
        rows = table["layer"] == i
        logits, weights, index = (t[keep] for t in seen[i]["gate"])  # the model's own, real tokens only
        frequency, mean_weight, mean_prob, routed = naive_routing(logits.double().numpy(), k, result.renormalised, experts)
        assert table["tokens"][rows].tolist() == [int(keep.sum())] * experts
        assert table["routed"][rows].tolist() == routed.tolist()
        assert table["routed"][rows].sum() == k * int(keep.sum())
        np.testing.assert_allclose(table["frequency"][rows], frequency, rtol=1e-12)
        np.testing.assert_allclose(table["mean_weight"][rows], mean_weight, rtol=1e-6)
        np.testing.assert_allclose(table["mean_prob"][rows], mean_prob, rtol=1e-6)
        # The model's own decisions: the same experts and the same applied weights.
        own = np.array([(index == e).sum().item() for e in range(experts)])
        assert own.tolist() == routed.tolist()
        own_weight = np.array([weights[index == e].double().sum().item() for e in range(experts)]) / np.maximum(own, 1)
        np.testing.assert_allclose(table["mean_weight"][rows], own_weight, rtol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_renormalisation_follows_norm_topk_prob(family):
    model, inputs = padded(family, norm_topk_prob=True)
    result = moe_routing(model, [inputs])
    assert result.renormalised
    keep = inputs["attention_mask"].bool().reshape(-1)
    for i, seen in recorded(model, inputs).items():
        _, weights, index = (t[keep] for t in seen["gate"])
        rows = result.to_table()["layer"] == i
        own = np.array([weights[index == e].double().sum().item() / max(int((index == e).sum()), 1) for e in range(4)])
        np.testing.assert_allclose(result.to_table()["mean_weight"][rows], own, rtol=1e-6)
        assert np.all(own <= 1) and own.max() > 0.5  # renormalised top-2 weights: one of them ≥ 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_activation_ratio_from_the_weights(family):
    model, inputs = padded(family)
    table = moe_routing(model, [inputs], eps=EPS).to_table()
    keep = inputs["attention_mask"].bool().reshape(-1)
    for i, seen in recorded(model, inputs).items():
        experts = model.model.layers[i].mlp.experts
        hidden, index = seen["hidden"][keep], seen["gate"][2][keep]
        for e in range(experts.num_experts):
            rows = hidden[(index == e).any(-1)]  # real tokens routed to e
            gate, up = F.linear(rows, experts.gate_up_proj[e]).chunk(2, dim=-1)
            with torch.no_grad():
                a = (experts.act_fn(gate) * up).double().numpy()  # [routed, d_expert]
            row = np.flatnonzero((table["layer"] == i) & (table["expert"] == e))[0]
            assert table["expert_tokens"][row] == len(a) == table["routed"][row]
            assert table["units"][row] == a.shape[1]
            assert table["activation_ratio"][row] == pytest.approx((a > 0).mean(), rel=1e-6)
            assert table["activation_ratio_abs_gt_0.001"][row] == pytest.approx((np.abs(a) > EPS).mean(), rel=1e-6)


def test_padding_is_excluded():
    model, inputs = padded("olmoe")
    other = {k: v.clone() for k, v in inputs.items()}
    other["input_ids"][1, 5:] = 3  # only padded positions change
    first, second = moe_routing(model, [inputs]).to_table(), moe_routing(model, [other]).to_table()
    for key in ("tokens", "routed", "mean_weight", "mean_prob", "activation_ratio"):
        np.testing.assert_array_equal(first[key], second[key])
    assert first["tokens"][0] == 12 + 5


def test_refuses_models_without_experts_and_bad_eps():
    model, inputs = tiny_model("llama")
    with pytest.raises(InputError, match="mixture-of-experts"):
        moe_routing(model, [inputs])
    moe, moe_inputs = tiny_model("mixtral")
    with pytest.raises(InputError, match="eps"):
        moe_routing(moe, [moe_inputs], eps=-1)
