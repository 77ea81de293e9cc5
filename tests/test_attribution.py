"""Attribution patching: each estimate equals a finite-difference directional derivative of the
metric (float64 model, raw PyTorch hooks), it correlates with exact patching, and it costs
two forward passes and one backward pass, leaving the model untouched."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from actscope.errors import InputError
from actscope.explain.attribution import attribution_patching, compare_effects
from actscope.explain.patching import activation_patching, logit_difference
from conftest import clean_and_corrupted, first_input_of, model_state, pre_hooked_logits

CORRECT, WRONG = 3, 5
EPS = 1e-5


@pytest.fixture(scope="module")
def gpt2():
    return clean_and_corrupted("gpt2")


def metric_value(module, ids, hooks=()) -> float:
    logits = pre_hooked_logits(module, ids, hooks)
    return float((logits[:, -1, CORRECT] - logits[:, -1, WRONG]).mean())


def directional_derivative(module, corrupted, target, delta, mask) -> float:
    """d/dε m(corrupt + ε·delta on the masked entries) at ε = 0, by central differences."""
    shift = lambda eps: (lambda x: x + eps * delta * mask)  # noqa: E731
    up = metric_value(module, corrupted, [(target, shift(EPS))])
    down = metric_value(module, corrupted, [(target, shift(-EPS))])
    return (up - down) / (2 * EPS)


def test_estimates_equal_finite_difference_derivatives(gpt2):
    module, clean, corrupted = gpt2
    module64 = copy.deepcopy(module).double()
    result = attribution_patching(module64, clean, corrupted, logit_difference(CORRECT, WRONG),
                                  sites="blocks.1.attn.z,blocks.0.mlp.post[0:6]", per=("site", "head", "unit"))
    base = metric_value(module64, corrupted)
    assert result.metric_corrupt == pytest.approx(base, rel=1e-9)
    c_proj, down = module64.transformer.h[1].attn.c_proj, module64.transformer.h[0].mlp.c_proj
    z_delta = first_input_of(module64, c_proj, clean) - first_input_of(module64, c_proj, corrupted)  # [2, 6, 32]
    post_delta = first_input_of(module64, down, clean) - first_input_of(module64, down, corrupted)  # [2, 6, 64]
    expected = {}
    for head in range(4):
        mask = torch.zeros_like(z_delta)
        mask[..., head * 8:(head + 1) * 8] = 1
        expected[("head", "blocks.1.attn.z", head, -1, -1)] = directional_derivative(module64, corrupted, c_proj, z_delta, mask)
    expected[("site", "blocks.1.attn.z", -1, -1, -1)] = directional_derivative(module64, corrupted, c_proj, z_delta, torch.ones_like(z_delta))
    for unit in range(6):
        mask = torch.zeros_like(post_delta)
        mask[..., unit] = 1
        expected[("unit", "blocks.0.mlp.post", -1, unit, -1)] = directional_derivative(module64, corrupted, down, post_delta, mask)
    site_mask = torch.zeros_like(post_delta)
    site_mask[..., :6] = 1
    expected[("site", "blocks.0.mlp.post[0,1,2,3,4,5]", -1, -1, -1)] = directional_derivative(module64, corrupted, down, post_delta, site_mask)
    got = dict(zip(result.keys(), result.effect.tolist()))
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert max(abs(v) for v in expected.values()) > 1e-2  # non-trivial gradients


def test_position_estimates_sum_to_the_site_estimate(gpt2):
    module, clean, corrupted = gpt2
    result = attribution_patching(module, clean, corrupted, logit_difference(CORRECT, WRONG), sites="blocks.0.mlp.post", per=("site", "position"))
    site, positions = result.only("site"), result.only("position")
    assert len(positions) == 6
    assert positions.effect.sum() == pytest.approx(site.effect[0], rel=1e-5)
    # Causal attention: positions before the corrupted one (2) are identical, so they estimate 0.
    np.testing.assert_array_equal(positions.effect[[0, 1]], 0.0)
    assert np.all(positions.effect[2:] != 0)


def test_correlates_with_exact_patching(gpt2):
    module, clean, corrupted = gpt2
    metric = logit_difference(CORRECT, WRONG)
    estimate = attribution_patching(module, clean, corrupted, metric)
    heads = activation_patching(module, clean, corrupted, metric, sites="blocks.*.attn.z", per="head")
    units = activation_patching(module, clean, corrupted, metric, sites="blocks.*.mlp.post", per="unit")
    for exact, per, n in ((heads, "head", 8), (units, "unit", 128)):
        agreement = compare_effects(estimate, exact, per=per)
        assert agreement.n == n
        x, y = estimate.only(per).effect, exact.effect  # same component order in both tables
        assert agreement.pearson == pytest.approx(float(np.corrcoef(x, y)[0, 1]), rel=1e-9)
        from scipy.stats import spearmanr

        assert agreement.spearman == pytest.approx(float(spearmanr(x, y).statistic), rel=1e-9)
        assert agreement.pearson > 0.8, (per, agreement.pearson)


def test_two_forwards_one_backward_and_the_model_untouched(gpt2):
    module, clean, corrupted = gpt2
    before = model_state(module)
    calls = []
    handle = module.register_forward_hook(lambda *args: calls.append(1))
    try:
        result = attribution_patching(module, clean, corrupted, logit_difference(CORRECT, WRONG))
    finally:
        handle.remove()
    assert len(calls) == 2 and (result.forward_passes, result.backward_passes) == (2, 1)
    assert len(result.only("head")) == 8 and len(result.only("unit")) == 128 and len(result.only("site")) == 4
    assert model_state(module) == before
    assert all(p.grad is None for p in module.parameters())

    def failing(logits, inputs):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        attribution_patching(module, clean, corrupted, failing)
    assert model_state(module) == before


def test_refuses_bad_input(gpt2):
    module, clean, corrupted = gpt2
    with pytest.raises(InputError, match="per must be"):
        attribution_patching(module, clean, corrupted, logit_difference(CORRECT, WRONG), per=("head", "neuron"))
    with pytest.raises(InputError, match="through autograd"):
        attribution_patching(module, clean, corrupted, lambda logits, inputs: torch.tensor(1.0))
    one = activation_patching(module, clean, corrupted, logit_difference(CORRECT, WRONG), sites="blocks.0.attn.z", per="site")
    with pytest.raises(InputError, match="correlation needs at least 2"):
        compare_effects(one, one)
