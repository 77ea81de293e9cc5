"""observe/capture: bit-identical outputs, hooks removed whatever happens, stats vs naive."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import actscope
from conftest import hook_count, model_state

DOCS = ["The cat sat on the mat.", "Rain fell over the quiet harbour all night long, and nobody minded.", "Why?"]


@pytest.fixture(scope="module")
def batch(minilm):
    return minilm.tokenizer(DOCS, return_tensors="pt", padding=True)


def test_observing_leaves_outputs_bit_identical(minilm, batch):
    before = model_state(minilm.module)
    with torch.no_grad():
        plain = minilm(**batch).last_hidden_state
        with actscope.observe(minilm, "blocks.*.mlp.post,blocks.*.attn.z,blocks.*.resid.pre,embed"):
            observed = minilm(**batch).last_hidden_state
        after_output = minilm(**batch).last_hidden_state
    assert torch.equal(plain, observed)
    assert torch.equal(plain, after_output)
    assert model_state(minilm.module) == before


def test_pattern_sites_are_bit_identical_to_eager_attention(minilm, batch):
    # Attention probabilities exist only in eager attention: the run switches to it, so the
    # reference is the same model in eager mode, unobserved.
    before = model_state(minilm.module)
    with torch.no_grad():
        minilm.module.set_attn_implementation("eager")
        try:
            eager = minilm(**batch).last_hidden_state
        finally:
            minilm.module.set_attn_implementation(before[3])
        with actscope.observe(minilm, "blocks.*.attn.pattern,blocks.*.mlp.post"):
            observed = minilm(**batch).last_hidden_state
    assert torch.equal(eager, observed)
    assert model_state(minilm.module) == before


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_hooks_and_state_restored_after_exceptions(minilm, batch, error):
    before = model_state(minilm.module)
    with pytest.raises(type(error)):
        with actscope.observe(minilm, "blocks.*.mlp.post,blocks.0.attn.pattern"):
            assert hook_count(minilm.module) > before[0]
            assert minilm.module.config._attn_implementation == "eager"
            raise error
    assert model_state(minilm.module) == before


def test_nested_contexts_unwind_in_order(minilm, batch):
    before = model_state(minilm.module)
    with torch.no_grad(), actscope.observe(minilm, "blocks.0.mlp.post") as outer:
        with actscope.capture(minilm, "blocks.0.mlp.post,blocks.1.attn.pattern") as inner:
            minilm(**batch)
        assert minilm.module.config._attn_implementation == before[3]
        minilm(**batch)
    assert model_state(minilm.module) == before
    assert int(outer.stats["blocks.0.mlp.post"].moments.count[0]) == 2 * int(batch["attention_mask"].sum())
    assert inner.tensor("blocks.0.mlp.post").shape[-1] == 1536


def test_observed_stats_equal_naive_on_captured_tensor_with_padding(minilm, batch):
    with torch.no_grad(), actscope.capture(minilm, "blocks.2.mlp.post") as cap:
        with actscope.observe(minilm, "blocks.2.mlp.post") as obs:
            minilm(**batch)
    full = cap.tensor("blocks.2.mlp.post").double().numpy()  # [batch, pos, units]
    mask = batch["attention_mask"].bool().numpy()
    real = full[mask]  # [real tokens, units]
    stats = obs.stats["blocks.2.mlp.post"]
    assert (stats.moments.count.numpy() == mask.sum()).all()
    np.testing.assert_allclose(stats.moments.mean.numpy(), real.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.moments.var.numpy(), real.var(0), rtol=1e-6)
    np.testing.assert_array_equal(stats.moments.max.numpy(), real.max(0))
    np.testing.assert_array_equal(stats.ladder.frac_pos.numpy(), (real > 0).mean(0))
    # the top example of unit 0 is the real token holding its maximum
    b, t = np.argwhere((full[..., 0] == real[:, 0].max()) & mask)[0]
    from actscope.trace import split_token_id

    doc, pos = split_token_id(stats.top.tok[0, :1])
    assert (int(doc), int(pos)) == (b, t)


def test_pattern_sink_equals_naive(minilm, batch):
    with torch.no_grad(), actscope.capture(minilm, "blocks.1.attn.pattern") as cap:
        with actscope.observe(minilm, "blocks.1.attn.pattern") as obs:
            minilm(**batch)
    pattern = cap.tensor("blocks.1.attn.pattern").double()  # [batch, head, q, k]
    mask = batch["attention_mask"].bool()
    naive = pattern[..., 0].permute(0, 2, 1)[mask].mean(0)  # [head]
    np.testing.assert_allclose(obs.stats["blocks.1.attn.pattern"].first_token_attention.numpy(), naive.numpy(), rtol=1e-6)


def test_head_selection_keeps_only_chosen_heads(minilm, batch):
    with torch.no_grad(), actscope.observe(minilm, "blocks.1.attn.z[head=2,5]") as obs:
        minilm(**batch)
    assert obs.stats["blocks.1.attn.z[head=2,5]"].moments.count.shape == (64,)


def test_capture_memory_guard(minilm, batch):
    before = model_state(minilm.module)
    with pytest.raises(actscope.errors.MemoryGuardError, match="observe statistics instead"):
        with torch.no_grad(), actscope.capture(minilm, "blocks.*.mlp.post", max_bytes=10_000):
            minilm(**batch)
    assert model_state(minilm.module) == before


def test_conv_module_site_uses_channels_as_units():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    x = torch.randn(4, 3, 8, 8)
    net(x)
    with torch.no_grad(), actscope.observe(net, "module:1@output") as obs:
        net(x)
    with torch.no_grad():
        relu = torch.relu(net[0](x)).movedim(1, -1).reshape(-1, 5).double()
    stats = obs.stats["module:1@output"]
    assert stats.moments.count.tolist() == [4 * 6 * 6] * 5
    np.testing.assert_allclose(stats.moments.mean.numpy(), relu.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats.ladder.frac_pos.numpy(), (relu > 0).double().mean(0).numpy(), rtol=1e-12)


def test_merging_two_halves_equals_one_pass(minilm, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        with actscope.observe(minilm, "blocks.0.mlp.post") as whole:
            whole.next_examples = torch.arange(3)
            minilm(input_ids=ids, attention_mask=mask)
        halves = []
        for rows in (slice(0, 2), slice(2, 3)):
            with actscope.observe(minilm, "blocks.0.mlp.post") as half:
                half.next_examples = torch.arange(3)[rows]
                minilm(input_ids=ids[rows], attention_mask=mask[rows])
            halves.append(half.stats["blocks.0.mlp.post"])
    merged = halves[0].merge(halves[1])
    one = whole.stats["blocks.0.mlp.post"]
    assert torch.equal(merged.moments.count, one.moments.count)
    np.testing.assert_allclose(merged.moments.mean.numpy(), one.moments.mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(merged.moments.var.numpy(), one.moments.var.numpy(), rtol=1e-5, atol=1e-7)
    assert torch.equal(merged.ladder.firing_hist, one.ladder.firing_hist)
