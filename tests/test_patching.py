"""Activation patching: exact recovery, agreement with a hand-patched forward, and a model left
untouched (parameters, buffers, hooks, attention implementation), also after an exception."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import actscope
from actscope.errors import InputError, SiteError
from actscope.explain.patching import activation_patching, logit_difference
from conftest import clean_and_corrupted, first_input_of, model_state, pre_hooked_logits

CORRECT, WRONG = 3, 5


@pytest.fixture(scope="module")
def gpt2():
    return clean_and_corrupted("gpt2")


def hand_metric(logits: torch.Tensor) -> float:
    return float((logits[:, -1, CORRECT] - logits[:, -1, WRONG]).mean())


def hand_run(module, ids, hooks=()) -> float:
    """Forward with raw PyTorch pre-hooks (module, function replacing the first input)."""
    return hand_metric(pre_hooked_logits(module, ids, hooks))


def test_patching_a_site_with_its_clean_value_recovers_exactly_everything(gpt2):
    module, clean, corrupted = gpt2
    result = activation_patching(module, clean, corrupted, logit_difference(CORRECT, WRONG), sites="blocks.*.resid.pre")
    assert result.metric_clean != result.metric_corrupt
    np.testing.assert_array_equal(result.recovered, [1.0, 1.0])
    # Only position 2 differs, so patching the residual stream there alone recovers it all too.
    by_position = activation_patching(module, clean, corrupted, logit_difference(CORRECT, WRONG), sites="blocks.0.resid.pre", per="position")
    np.testing.assert_array_equal(by_position.position, np.arange(6))
    np.testing.assert_array_equal(by_position.recovered, [0, 0, 1, 0, 0, 0])


def test_reference_metrics_and_recovered_fraction_by_hand(gpt2):
    module, clean, corrupted = gpt2
    result = activation_patching(module, clean, corrupted, logit_difference(CORRECT, WRONG), sites="blocks.*.attn.z", per="head")
    m_clean, m_corrupt = hand_run(module, clean), hand_run(module, corrupted)
    assert result.metric_clean == pytest.approx(m_clean, rel=1e-6)
    assert result.metric_corrupt == pytest.approx(m_corrupt, rel=1e-6)
    np.testing.assert_allclose(result.recovered, (result.metric - m_corrupt) / (m_clean - m_corrupt), rtol=1e-6)
    assert result.forward_passes == 2 + 8 and len(result) == 8
    np.testing.assert_array_equal(result.layer, np.repeat([0, 1], 4))
    np.testing.assert_array_equal(result.head, np.tile(np.arange(4), 2))


def test_head_patch_equals_clean_columns_substituted_by_hand(gpt2):
    module, clean, corrupted = gpt2
    c_proj = module.transformer.h[1].attn.c_proj  # its input is attn.z: [batch, pos, head·d_head]
    clean_z = first_input_of(module, c_proj, clean)
    d_head = clean_z.shape[-1] // 4
    result = activation_patching(module, clean, corrupted, logit_difference(CORRECT, WRONG), sites="blocks.1.attn.z", per="head")
    for head in range(4):
        columns = slice(head * d_head, (head + 1) * d_head)

        def substitute(x, columns=columns):
            x = x.clone()
            x[..., columns] = clean_z[..., columns]
            return x

        assert result.metric[head] == pytest.approx(hand_run(module, corrupted, [(c_proj, substitute)]), rel=1e-6, abs=1e-7)
    assert np.ptp(result.metric) > 1e-3  # heads differ: the test can tell them apart


def test_unit_and_position_patches_equal_hand_substitution(gpt2):
    module, clean, corrupted = gpt2
    down = module.transformer.h[0].mlp.c_proj  # its input is mlp.post: [batch, pos, d_mlp]
    clean_post = first_input_of(module, down, clean)
    metric = logit_difference(CORRECT, WRONG)
    units = activation_patching(module, clean, corrupted, metric, sites="blocks.0.mlp.post[3,17,40]", per="unit")
    np.testing.assert_array_equal(units.unit, [3, 17, 40])
    for row, unit in enumerate((3, 17, 40)):
        def substitute(x, unit=unit):
            x = x.clone()
            x[..., unit] = clean_post[..., unit]
            return x

        assert units.metric[row] == pytest.approx(hand_run(module, corrupted, [(down, substitute)]), rel=1e-6, abs=1e-7)
    positions = activation_patching(module, clean, corrupted, metric, sites="blocks.0.mlp.post", per="position")

    def substitute_position(x):
        x = x.clone()
        x[:, 2] = clean_post[:, 2]
        return x

    assert positions.metric[2] == pytest.approx(hand_run(module, corrupted, [(down, substitute_position)]), rel=1e-6)
    assert positions.metric[0] == pytest.approx(positions.metric_corrupt, rel=1e-6)  # nothing differs there


def test_logit_difference_reads_each_rows_last_real_token():
    logits = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])  # right padding, then left padding
    value = logit_difference([1, 2], [3, 4])(logits, {"attention_mask": mask})
    by_hand = ((logits[0, 1, 1] - logits[0, 1, 3]) + (logits[1, 3, 2] - logits[1, 3, 4])) / 2
    assert float(value) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(logit_difference(1, 3)(logits, {})) == pytest.approx(float((logits[:, -1, 1] - logits[:, -1, 3]).mean()), rel=1e-6)
    with pytest.raises(InputError, match="one id, or one per row"):
        logit_difference([1, 2, 3], 4)(logits, {})


def test_model_identical_after_patching_and_after_an_exception(gpt2):
    module, clean, corrupted = gpt2
    before = model_state(module)
    activation_patching(module, clean, corrupted, logit_difference(CORRECT, WRONG), sites="blocks.*.attn.z,blocks.1.mlp.post[0:4]", per="site")
    assert model_state(module) == before
    calls = []

    def failing(logits, inputs):
        calls.append(1)
        if len(calls) == 3:  # inside the first patched run
            raise RuntimeError("metric failed")
        return logits[:, -1, 0].mean()

    with pytest.raises(RuntimeError, match="metric failed"):
        activation_patching(module, clean, corrupted, failing, sites="blocks.*.attn.z", per="head")
    assert model_state(module) == before
    assert all(p.grad is None for p in module.parameters())


def test_bad_inputs_are_refused_with_the_fix(gpt2):
    module, clean, corrupted = gpt2
    metric = logit_difference(CORRECT, WRONG)
    with pytest.raises(InputError, match="per must be one of"):
        activation_patching(module, clean, corrupted, metric, per="neuron")
    with pytest.raises(InputError, match="per='head' needs per-head sites"):
        activation_patching(module, clean, corrupted, metric, sites="blocks.0.mlp.post", per="head")
    with pytest.raises(InputError, match="same batch and number of positions"):
        activation_patching(module, clean, corrupted[:, :5], metric)
    with pytest.raises(SiteError, match="cannot be edited"):
        activation_patching(module, clean, corrupted, metric, sites="blocks.0.attn.pattern")
    with pytest.raises(InputError, match="one number"):
        activation_patching(module, clean, corrupted, lambda logits, inputs: logits[:, -1, 0])


def test_works_on_a_plain_module_through_module_sites():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    clean, corrupted = torch.randn(5, 4), torch.randn(5, 4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net

        def forward(self, x):
            return self.body(x)

    model = actscope.wrap(Net())
    metric = lambda logits, inputs: logits[:, 0].mean()  # noqa: E731
    result = activation_patching(model, {"x": clean}, {"x": corrupted}, metric, sites="module:body.1@output", per="unit")
    with torch.no_grad():
        hidden_clean = torch.relu(net[0](clean))
    for unit in range(8):
        with torch.no_grad():
            hidden = torch.relu(net[0](corrupted))
            hidden[:, unit] = hidden_clean[:, unit]
            by_hand = float(net[2](hidden)[:, 0].mean())
        assert result.metric[unit] == pytest.approx(by_hand, rel=1e-6, abs=1e-7)
    assert np.ptp(result.metric) > 1e-3


def test_circuit_overlap_counts_shared_heads_by_hand(gpt2):
    from actscope.explain.circuits import circuit_overlap

    module, clean, corrupted = gpt2
    task_a = activation_patching(module, clean, corrupted, logit_difference(CORRECT, WRONG), per="head")
    task_b = activation_patching(module, clean, corrupted, logit_difference(7, 9), per="head")
    overlap = circuit_overlap(task_a, task_b, top=3)

    def top3(result):  # by hand: the three heads with the largest |recovered|
        ranked = sorted(range(len(result)), key=lambda i: -abs(result.recovered[i]))[:3]
        return {(int(result.layer[i]), int(result.head[i])) for i in ranked}

    a, b = top3(task_a), top3(task_b)
    assert {(int(site.split(".")[1]), head) for _, site, head, _, _ in overlap.in_a} == a
    assert {(int(site.split(".")[1]), head) for _, site, head, _, _ in overlap.in_b} == b
    assert len(overlap.shared) == len(a & b)
    assert overlap.overlap_a == pytest.approx(len(a & b) / 3) and overlap.jaccard == pytest.approx(len(a & b) / len(a | b))
    same = circuit_overlap(task_a, task_a, threshold=0.1)
    assert same.overlap_a == same.jaccard == 1.0
    assert len(same.in_a) == int((np.abs(task_a.recovered) >= 0.1).sum())
    table = overlap.to_table()
    assert len(table["site"]) == len(a | b) and table["in_a"].sum() == 3 and table["in_b"].sum() == 3
    with pytest.raises(InputError, match="exactly one of"):
        circuit_overlap(task_a, task_b)
