"""edit(): every intervention equals the same change made by hand to weights or activations."""
from __future__ import annotations

import copy

import pytest
import torch

import actscope
from actscope import interventions as iv
from actscope.zoo.tiny import tiny_model
from conftest import logits, model_state


def test_zero_units_equals_zeroed_down_proj_columns(llama):
    module, inputs = llama
    by_hand = copy.deepcopy(module)
    by_hand.model.layers[1].mlp.down_proj.weight.data[:, [5, 9]] = 0
    with actscope.edit(module, {"blocks.1.mlp.post[5,9]": iv.zero()}):
        edited = logits(module, inputs)
    torch.testing.assert_close(edited, logits(by_hand, inputs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(edited, logits(module, inputs), atol=1e-4)


def test_scale_equals_scaled_column(llama):
    module, inputs = llama
    by_hand = copy.deepcopy(module)
    by_hand.model.layers[0].mlp.down_proj.weight.data[:, 3] *= 4.0
    with actscope.edit(module, {"blocks.0.mlp.post[3]": iv.scale(4.0)}):
        edited = logits(module, inputs)
    torch.testing.assert_close(edited, logits(by_hand, inputs), atol=1e-5, rtol=1e-5)


def test_set_value_equals_bias_folded_weights(bert):
    module, inputs = bert
    dense = module.encoder.layer[0].output.dense
    by_hand = copy.deepcopy(module)
    hand = by_hand.encoder.layer[0].output.dense
    hand.bias.data += 2.5 * dense.weight.data[:, 7]
    hand.weight.data[:, 7] = 0
    with actscope.edit(module, {"blocks.0.mlp.post[7]": iv.set_value(2.5)}):
        edited = logits(module, inputs)
    torch.testing.assert_close(edited, logits(by_hand, inputs), atol=1e-5, rtol=1e-5)


def test_zero_head_equals_zeroed_output_projection(llama):
    module, inputs = llama
    d_head = module.config.hidden_size // module.config.num_attention_heads
    by_hand = copy.deepcopy(module)
    by_hand.model.layers[0].self_attn.o_proj.weight.data[:, d_head:2 * d_head] = 0
    with actscope.edit(module, {"blocks.0.attn.z[head=1]": iv.zero()}):
        edited = logits(module, inputs)
    torch.testing.assert_close(edited, logits(by_hand, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("make", "naive"), [
    (lambda: iv.topk(3), lambda x: torch.where(x >= x.topk(3, dim=-1).values[..., -1:], x, torch.zeros_like(x))),
    (lambda: iv.threshold(0.05), lambda x: torch.where(x.abs() < 0.05, torch.zeros_like(x), x)),
    (lambda: iv.add(0.5), lambda x: x + 0.5),
])
def test_activation_edits_equal_naive_edit_of_the_captured_tensor(llama, make, naive):
    module, inputs = llama
    with torch.no_grad(), actscope.edit(module, {"blocks.0.mlp.post": make()}):
        with actscope.capture(module, "module:model.layers.0.mlp.down_proj@output,blocks.0.mlp.post") as cap:
            module(**inputs)
    seen = cap.tensor("blocks.0.mlp.post")  # hooks registered after the edit see the edited tensor
    with torch.no_grad(), actscope.capture(module, "blocks.0.mlp.post") as raw:
        module(**inputs)
    expected = naive(raw.tensor("blocks.0.mlp.post"))
    torch.testing.assert_close(seen, expected, atol=1e-6, rtol=1e-6)
    down = module.model.layers[0].mlp.down_proj
    torch.testing.assert_close(cap.tensor("module:model.layers.0.mlp.down_proj@output"), down(expected).detach(), atol=1e-5, rtol=1e-5)


def test_conv_channel_edit_equals_zeroed_filter():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3))
    x = torch.randn(2, 3, 9, 9)
    by_hand = copy.deepcopy(net)
    by_hand[0].weight.data[2] = 0
    by_hand[0].bias.data[2] = 0
    with torch.no_grad(), actscope.edit(net, {"module:0@output[2]": iv.zero()}):
        edited = net(x)
    torch.testing.assert_close(edited, by_hand(x).detach(), atol=1e-6, rtol=1e-6)


def test_edits_compose_in_order_and_nest(llama):
    module, inputs = llama
    by_hand = copy.deepcopy(module)
    by_hand.model.layers[1].mlp.down_proj.weight.data[:, 2] *= 6.0
    with actscope.edit(module, {"blocks.1.mlp.post[2]": [iv.scale(2.0), iv.scale(1.5)]}):
        with actscope.edit(module, {"blocks.1.mlp.post[2]": iv.scale(2.0)}):
            edited = logits(module, inputs)
    torch.testing.assert_close(edited, logits(by_hand, inputs), atol=1e-5, rtol=1e-5)


def test_model_identical_after_edit_and_after_an_exception(llama):
    module, inputs = llama
    before, reference = model_state(module), logits(module, inputs)
    with actscope.edit(module, {"blocks.*.mlp.post": iv.zero()}):
        logits(module, inputs)
    with pytest.raises(KeyboardInterrupt):
        with actscope.edit(module, {"blocks.*.mlp.post": iv.zero(), "blocks.0.attn.z": iv.scale(0.0)}):
            raise KeyboardInterrupt
    assert model_state(module) == before
    assert torch.equal(logits(module, inputs), reference)


def test_gradients_flow_through_edits_for_training(llama):
    module, inputs = llama
    module.zero_grad()
    with actscope.edit(module, {"blocks.0.mlp.post[4]": iv.set_value(1.0)}):
        module(**inputs, labels=inputs["input_ids"]).loss.backward()
    gate_grad = module.model.layers[0].mlp.gate_proj.weight.grad
    assert gate_grad[4].abs().sum() == 0  # the clamped neuron passes no gradient to its inputs
    assert gate_grad.abs().sum() > 0
    module.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("family", "key", "message"), [
    ("llama", "blocks.0.attn.pattern", "cannot be edited in place"),
    ("mixtral", "blocks.0.moe.experts.1.post", "cannot be edited in place"),
    ("gpt2", "blocks.0.attn.v", "cannot be written back"),
    ("llama", "blocks.0.mlp.post", "intervention function"),
])
def test_refused_edits_name_the_alternative(family, key, message):
    module, _ = tiny_model(family)
    value = 3 if message == "intervention function" else iv.zero()
    with pytest.raises(actscope.SiteError, match=message):
        with actscope.edit(module, {key: value}):
            pass


def test_intervention_shape_is_checked(llama):
    module, inputs = llama
    with pytest.raises(actscope.SiteError, match="must return a tensor of shape"):
        with actscope.edit(module, {"blocks.0.mlp.post[1,2]": lambda x: x[..., :1]}):
            logits(module, inputs)
