"""mean, resample, patch, clamp and replace_activation: each equals the same change made by hand
(to the weights, or by a plain PyTorch hook on the activations); the model is identical after
every context, also after an exception; they work in ``generate`` and in training steps."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import actscope
from actscope import interventions as iv
from actscope.zoo.tiny import tiny_model
from conftest import logits, model_state

TOL = dict(atol=1e-5, rtol=1e-5)


def other_inputs(inputs, seed=1):
    ids = torch.randint(0, 128, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@contextlib.contextmanager
def down_input_replaced(module, layer, new_input):
    """By hand: a plain forward-pre-hook on down_proj that swaps its input for new_input(x)."""
    down = module.model.layers[layer].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda mod, args: (new_input(args[0]),))
    try:
        yield
    finally:
        handle.remove()


def units_set_to(units, values):
    """By hand: a new_input that overwrites ``units`` (the last axis) of a copy with ``values``."""
    def new_input(x):
        x = x.clone()
        x[..., units] = values
        return x
    return new_input


def assert_edit_reproduces(module, inputs, edits, expected):
    """``actscope.edit(module, edits)`` gives ``expected`` and does change the logits."""
    with actscope.edit(module, edits):
        edited = logits(module, inputs)
    torch.testing.assert_close(edited, expected, **TOL)
    assert not torch.allclose(edited, logits(module, inputs), atol=1e-5)


# -- mean ----------------------------------------------------------------------------------
def test_means_from_reads_the_recorded_means(bert):
    module, inputs = bert
    run = actscope.profile(module, [inputs], sites="blocks.0.mlp.post")
    with torch.no_grad(), actscope.capture(module, "blocks.0.mlp.post", flat=True) as cap:
        module(**inputs)
    naive = cap.tensor("blocks.0.mlp.post").double().mean(0)  # [units] over every real token
    torch.testing.assert_close(iv.means_from(run, "blocks.0.mlp.post"), naive, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(iv.means_from(run, "blocks.0.mlp.post[7,3]"), naive[[3, 7]], atol=1e-6, rtol=1e-6)
    with pytest.raises(actscope.InputError, match="no neurons of 'blocks.1.mlp.post'"):
        iv.means_from(run, "blocks.1.mlp.post")
    with pytest.raises(actscope.InputError, match="no mean for"):
        iv.means_from(run, "blocks.0.mlp.post[999]")


def test_mean_equals_bias_folded_weights(bert):
    module, inputs = bert
    means = torch.tensor([0.25, -1.5])
    dense = module.encoder.layer[1].output.dense
    by_hand = copy.deepcopy(module)
    hand = by_hand.encoder.layer[1].output.dense
    hand.bias.data += dense.weight.data[:, [3, 7]] @ means
    hand.weight.data[:, [3, 7]] = 0
    with actscope.edit(module, {"blocks.1.mlp.post[3,7]": iv.mean(means)}):
        edited = logits(module, inputs)
    torch.testing.assert_close(edited, logits(by_hand, inputs), **TOL)
    assert not torch.allclose(edited, logits(module, inputs), atol=1e-4)
    with pytest.raises(actscope.InputError, match="2 means for a site with 3 selected units"):
        with actscope.edit(module, {"blocks.1.mlp.post[1,3,7]": iv.mean(means)}):
            logits(module, inputs)


# -- clamp ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bounds", [dict(max=0.05), dict(min=-0.02), dict(min=-0.02, max=torch.linspace(0.0, 0.2, 64))])
def test_clamp_equals_clamping_the_activations_by_hand(llama, bounds):
    module, inputs = llama
    low, high = bounds.get("min"), bounds.get("max")

    def by_hand(x):
        x = x if low is None else torch.where(x < low, torch.as_tensor(low), x)
        return x if high is None else torch.where(x > high, torch.as_tensor(high), x)

    with down_input_replaced(module, 1, by_hand):
        expected = logits(module, inputs)
    assert_edit_reproduces(module, inputs, {"blocks.1.mlp.post": iv.clamp(**bounds)}, expected)


def test_clamp_needs_a_bound():
    with pytest.raises(actscope.InputError, match="needs min=, max= or both"):
        iv.clamp()
    with pytest.raises(actscope.InputError, match="above max"):
        iv.clamp(min=2.0, max=1.0)


# -- resample ------------------------------------------------------------------------------
def test_resample_equals_rows_drawn_by_hand(llama):
    module, inputs = llama
    with torch.no_grad(), actscope.capture(module, "blocks.0.mlp.post[2,9]", flat=True) as cap:
        module(**other_inputs(inputs))
    source = cap.tensor("blocks.0.mlp.post[2,9]")  # [n, 2]
    generator = torch.Generator().manual_seed(5)
    rows = torch.randint(source.shape[0], inputs["input_ids"].shape, generator=generator)  # [batch, pos]
    with down_input_replaced(module, 0, units_set_to([2, 9], source[rows])):
        expected = logits(module, inputs)
    assert_edit_reproduces(module, inputs, {"blocks.0.mlp.post[2,9]": iv.resample(source, seed=5)}, expected)


def test_resample_checks_its_source():
    with pytest.raises(actscope.InputError, match="non-empty"):
        iv.resample(torch.zeros(0, 4))
    with pytest.raises(actscope.InputError, match="source rows have shape"):
        iv.resample(torch.zeros(5, 3))(torch.zeros(2, 6, 4))


# -- patch ---------------------------------------------------------------------------------
def test_patch_with_the_own_clean_value_changes_nothing(llama):
    module, inputs = llama
    with torch.no_grad(), actscope.capture(module, "blocks.0.mlp.post") as cap:
        clean = logits(module, inputs)
    with actscope.edit(module, {"blocks.0.mlp.post": iv.patch(cap.tensor("blocks.0.mlp.post"))}):
        torch.testing.assert_close(logits(module, inputs), clean, atol=0, rtol=0)


def test_patch_units_from_a_clean_run_equals_patching_by_hand(llama):
    module, inputs = llama
    corrupted = other_inputs(inputs)
    with torch.no_grad(), actscope.capture(module, "blocks.1.mlp.post") as cap:
        module(**inputs)
    clean = cap.tensor("blocks.1.mlp.post")  # [batch, pos, d_mlp]
    with down_input_replaced(module, 1, units_set_to([1, 4], clean[..., [1, 4]])):
        expected = logits(module, corrupted)
    assert_edit_reproduces(module, corrupted, {"blocks.1.mlp.post[1,4]": iv.patch(clean[..., [1, 4]])}, expected)


def test_patch_shape_mismatch_is_a_clear_error_and_restores_the_model(llama):
    module, inputs = llama
    before = model_state(module)
    with pytest.raises(actscope.InputError, match=r"cached tensor has shape \(1, 3, 64\).*has \(2, 6, 64\)"):
        with actscope.edit(module, {"blocks.0.mlp.post": iv.patch(torch.zeros(1, 3, 64))}):
            logits(module, inputs)
    assert model_state(module) == before


# -- replace_activation --------------------------------------------------------------------
def swapped(module, paths, new):
    """By hand: a copy of the model whose activation modules are replaced by ``new``."""
    copied = copy.deepcopy(module)
    for path in paths:
        parent, _, name = path.rpartition(".")
        setattr(copied.get_submodule(parent), name, new)
    return copied


@pytest.mark.parametrize(("family", "where", "paths"), [
    ("llama", None, ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"]),
    ("llama", "blocks.1", ["model.layers.1.mlp.act_fn"]),
    ("gpt2", [0], ["transformer.h.0.mlp.act"]),
    ("bert", "blocks.0-1.mlp", ["encoder.layer.0.intermediate.intermediate_act_fn", "encoder.layer.1.intermediate.intermediate_act_fn"]),
    ("mixtral", 1, ["model.layers.1.mlp.experts.act_fn"]),
    ("qwen2_moe", 0, ["model.layers.0.mlp.experts.act_fn", "model.layers.0.mlp.shared_expert.act_fn"]),
])
def test_replace_activation_equals_swapping_the_module(family, where, paths):
    module, inputs = tiny_model(family)
    by_hand = swapped(module, paths, torch.nn.ReLU())
    before = model_state(module)
    with iv.replace_activation(module, where, "relu") as replaced:
        edited = logits(module, inputs)
    assert sorted(replaced) == sorted(paths)
    torch.testing.assert_close(edited, logits(by_hand, inputs), **TOL)
    assert not torch.allclose(edited, logits(module, inputs), atol=1e-4)
    assert model_state(module) == before


def test_replace_activation_composes_with_edit(llama):
    module, inputs = llama
    by_hand = swapped(module, ["model.layers.0.mlp.act_fn"], torch.nn.ReLU())
    by_hand.model.layers[0].mlp.down_proj.weight.data[:, 5] *= 3.0
    with iv.replace_activation(module, 0, torch.relu), actscope.edit(module, {"blocks.0.mlp.post[5]": iv.scale(3.0)}):
        edited = logits(module, inputs)
    torch.testing.assert_close(edited, logits(by_hand, inputs), **TOL)
    # an edit of the activation module's own output sees the replaced value, whatever the order
    with actscope.edit(module, {"module:model.layers.0.mlp.act_fn@output": iv.clamp(max=0.1)}):
        with iv.replace_activation(module, 0, "identity"):
            with actscope.capture(module, "blocks.0.mlp.pre,module:model.layers.0.mlp.act_fn@output") as cap:
                logits(module, inputs)
    torch.testing.assert_close(cap.tensor("module:model.layers.0.mlp.act_fn@output"), cap.tensor("blocks.0.mlp.pre").clamp(max=0.1))


@pytest.mark.parametrize(("where", "new_fn", "message"), [
    (5, "relu", "do not exist"),
    ("layers.0", "relu", "cannot read blocks"),
    (None, "tanh-ish", "unknown activation"),
])
def test_replace_activation_refuses_bad_input(llama, where, new_fn, message):
    module, _ = llama
    with pytest.raises(actscope.InputError, match=message):
        with iv.replace_activation(module, where, new_fn):
            pass


# -- the model is untouched, whatever happens ---------------------------------------------
def contexts(module, inputs):
    source = torch.randn(10, 64)
    with torch.no_grad(), actscope.capture(module, "blocks.0.mlp.post") as cap:
        module(**inputs)
    cached = cap.tensor("blocks.0.mlp.post")
    return [
        lambda: actscope.edit(module, {"blocks.0.mlp.post[1,2]": iv.mean([0.5, 1.0])}),
        lambda: actscope.edit(module, {"blocks.*.mlp.post": iv.resample(source)}),
        lambda: actscope.edit(module, {"blocks.0.mlp.post": iv.patch(cached)}),
        lambda: actscope.edit(module, {"blocks.0.attn.z[head=1]": iv.clamp(min=0.0)}),
        lambda: iv.replace_activation(module, None, "relu"),
    ]


def test_model_identical_after_every_context_and_after_an_exception(llama):
    module, inputs = llama
    before, reference = model_state(module), logits(module, inputs)
    for make in contexts(module, inputs):
        with make():
            logits(module, inputs)
        assert model_state(module) == before
        with pytest.raises(RuntimeError, match="boom"):
            with make():
                logits(module, inputs)
                raise RuntimeError("boom")
        assert model_state(module) == before
    assert torch.equal(logits(module, inputs), reference)


# -- generate and training -----------------------------------------------------------------
def test_usable_in_generate(llama):
    module, inputs = llama
    prompt = inputs["input_ids"][:1, :3]
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    by_hand = swapped(module, ["model.layers.1.mlp.act_fn"], torch.nn.ReLU())
    hand = by_hand.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: (a[0].clamp(max=0.01),))
    expected = by_hand.generate(prompt, **settings)
    hand.remove()
    with iv.replace_activation(module, 1, "relu"), actscope.edit(module, {"blocks.0.mlp.post": iv.clamp(max=0.01)}):
        generated = module.generate(prompt, **settings)
    assert torch.equal(generated, expected)
    with actscope.edit(module, {"blocks.0.mlp.post[3]": iv.mean([2.0])}):
        assert module.generate(prompt, **settings).shape == (1, 8)


def grads(module, inputs):
    module.zero_grad(set_to_none=True)
    module(**inputs, labels=inputs["input_ids"]).loss.backward()
    found = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return found


def test_training_step_gradients_equal_the_hand_made_change(llama):
    module, inputs = llama
    module.train()
    try:
        with down_input_replaced(module, 0, lambda x: torch.clamp(x, max=0.02)):
            expected = grads(module, inputs)
        with actscope.edit(module, {"blocks.0.mlp.post": iv.clamp(max=0.02)}):
            clamped = grads(module, inputs)
        by_hand = swapped(module, ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"], torch.nn.ReLU())
        with iv.replace_activation(module, None, "relu"):
            relu = grads(module, inputs)
        relu_expected = grads(by_hand, inputs)
    finally:
        module.eval()
    assert clamped.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(clamped[name], expected[name], **TOL)
        torch.testing.assert_close(relu[name], relu_expected[name], **TOL)
    assert clamped["model.layers.0.mlp.up_proj.weight"].abs().sum() > 0
