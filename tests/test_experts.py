"""experts(): forbidding or forcing MoE experts equals routing recomputed by hand, token by token."""
from __future__ import annotations

import copy

import pytest
import torch

from actscope.errors import InputError
from actscope.interventions.experts import experts
from actscope.zoo.tiny import tiny_config, tiny_model
from conftest import model_state

FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "olmoe_normalised")


def build(name: str):
    if name != "olmoe_normalised":
        return tiny_model(name)
    import transformers

    config = tiny_config("olmoe")
    config.norm_topk_prob = True  # OLMoE's renormalising variant: the other branch of the rule
    torch.manual_seed(0)
    module = transformers.OlmoeForCausalLM(config).eval()
    return module, tiny_model("olmoe")[1]


@pytest.fixture(scope="module", params=FAMILIES)
def moe(request):
    return build(request.param)


def logits(module, inputs):
    with torch.no_grad():
        return module(**inputs).logits


def tokens_per_expert(module, inputs, layer: int) -> torch.Tensor:
    """How many tokens the experts module of ``layer`` receives for each expert (its own input)."""
    block = module.model.layers[layer].mlp
    seen = []
    handle = block.experts.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    try:
        logits(module, inputs)
    finally:
        handle.remove()
    return torch.bincount(seen[0].reshape(-1), minlength=block.experts.num_experts)


def renormalises(module) -> bool:
    return module.config.model_type == "mixtral" or bool(module.config.norm_topk_prob)


def naive_forward(block, off: set[int], on: set[int], k: int, renormalise: bool):
    """The sparse MoE block written out token by token, with experts off/on as documented."""

    def forward(hidden):  # [batch, pos, hidden]
        x = hidden.reshape(-1, hidden.shape[-1])
        out = torch.zeros_like(x)
        fused = block.experts
        for t in range(x.shape[0]):
            router_logits = block.gate.weight @ x[t]  # [E]
            for e in off:
                router_logits[e] = float("-inf")
            probs = torch.softmax(router_logits.float(), dim=-1)
            chosen = sorted(range(len(probs)), key=lambda e: (e not in on, -float(probs[e])))[:k]
            weights = probs[chosen]
            if renormalise:
                weights = weights / weights.sum()
            for e, weight in zip(chosen, weights):
                gate, up = (fused.gate_up_proj[e] @ x[t]).chunk(2)
                out[t] += weight * (fused.down_proj[e] @ (fused.act_fn(gate) * up))
        if hasattr(block, "shared_expert"):
            out = out + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        return out.reshape(hidden.shape)

    return forward


def test_unedited_layer_routes_exactly_as_the_model(moe):
    module, inputs = moe
    with experts(module, off={0: []}):
        assert torch.equal(logits(module, inputs), logits(copy.deepcopy(module), inputs))


def test_expert_off_routes_no_token_to_it(moe):
    module, inputs = moe
    busiest = int(tokens_per_expert(module, inputs, 0).argmax())
    assert tokens_per_expert(module, inputs, 0)[busiest] > 0
    with experts(module, off={0: [busiest]}):
        counts = tokens_per_expert(module, inputs, 0)
    assert counts[busiest] == 0
    assert counts.sum() == inputs["input_ids"].numel() * module.config.num_experts_per_tok


def test_expert_on_routes_every_token_to_it(moe):
    module, inputs = moe
    idle = int(tokens_per_expert(module, inputs, 0).argmin())
    assert tokens_per_expert(module, inputs, 0)[idle] < inputs["input_ids"].numel()
    with experts(module, on={0: [idle]}):
        assert tokens_per_expert(module, inputs, 0)[idle] == inputs["input_ids"].numel()


@pytest.mark.parametrize(("off", "on"), [({0: [1, 2]}, {}), ({}, {0: [3]}), ({0: [0]}, {0: [2]})])
def test_edited_model_equals_block_computed_by_hand(moe, off, on):
    module, inputs = moe
    by_hand = copy.deepcopy(module)
    block = by_hand.model.layers[0].mlp
    k = module.config.num_experts_per_tok
    block.forward = naive_forward(block, set(off.get(0, ())), set(on.get(0, ())), k, renormalises(module))
    with experts(module, off=off, on=on):
        edited = logits(module, inputs)
    torch.testing.assert_close(edited, logits(by_hand, inputs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(edited, logits(module, inputs), atol=1e-4)


def test_pairs_and_mapping_select_the_same_experts(moe):
    module, inputs = moe
    with experts(module, off=[(0, 1), (0, 3)]):
        pairs = logits(module, inputs)
    with experts(module, off={0: [3, 1]}):
        assert torch.equal(pairs, logits(module, inputs))


def test_model_identical_after_context_and_after_exception(moe):
    module, inputs = moe
    before = model_state(module)
    with experts(module, off={0: [1]}, on={0: [0]}):
        logits(module, inputs)
        assert model_state(module)[0] == before[0] + 1  # one router hook while inside
    assert model_state(module) == before
    with pytest.raises(RuntimeError, match="inside"):
        with experts(module, off={0: [2]}):
            raise RuntimeError("inside")
    assert model_state(module) == before


def test_generate_runs_with_an_expert_off():
    module, inputs = tiny_model("mixtral")
    with torch.no_grad(), experts(module, off={1: [0]}):
        out = module.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize(("family", "kwargs", "message"), [
    ("mixtral", {"off": {0: [4]}}, "experts 0-3"),
    ("mixtral", {"off": {0: [0, 1, 2]}}, "at most 2 can be off"),
    ("mixtral", {"on": {0: [0, 1, 2]}}, "at most 2 can be on"),
    ("mixtral", {"off": {0: [1]}, "on": {0: [1]}}, "both off and on"),
    ("mixtral", {"off": {0: 1}}, "give a list of experts"),
    ("mixtral", {"off": [(0, -1)]}, "pair of whole numbers"),
    ("qwen2_moe", {"off": {1: [0]}}, r"its MoE blocks are \[0\]"),
    ("llama", {"off": {0: [0]}}, "not a supported mixture-of-experts model"),
])
def test_bad_selection_says_what_and_how_to_fix(family, kwargs, message):
    module, _ = tiny_model(family)
    with pytest.raises(InputError, match=message):
        with experts(module, **kwargs):
            pass


def test_training_step_through_the_context_has_finite_gradients():
    module, inputs = tiny_model("mixtral")
    module.train()
    try:
        with experts(module, off={0: [1, 2]}):
            out = module(**inputs, labels=inputs["input_ids"], output_router_logits=True)
            out.loss.backward()
    finally:
        module.eval()
    gate = module.model.layers[0].mlp.gate.weight.grad  # [E, hidden]
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    assert gate is not None and torch.isfinite(gate).all()
    assert gate[[0, 3]].abs().sum() > 0 and gate[[1, 2]].abs().sum() == 0  # off experts get no gradient


def test_edit_refuses_router_logits_and_names_the_experts_context():
    import actscope
    from actscope.errors import SiteError
    from actscope.zoo.tiny import tiny_model

    model = actscope.wrap(tiny_model("mixtral")[0])
    with pytest.raises(SiteError, match=r"editing router logits does not change routing.*actscope\.interventions\.experts"):
        with actscope.edit(model, {"blocks.0.moe.router": actscope.interventions.zero()}):
            pass
