"""Subspace patching: full-rank basis = full patching, empty basis = no patching, a 1-d patch
equals the projection substituted by hand; the row/null split on hand-made weights; a learned
rotation (DAS) finds the one direction a rank-1 readout uses; the model is left untouched."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from actscope.errors import InputError
from actscope.explain.patching import activation_patching, logit_difference
from actscope.explain.subspace import (
    downstream_weight, learn_subspace, orthonormal_basis, row_null_split, subspace_patching,
)
from actscope.zoo.tiny import tiny_model
from conftest import model_state

CORRECT, WRONG = 3, 5


@pytest.fixture(scope="module")
def gpt2():
    module, inputs = tiny_model("gpt2")
    module = copy.deepcopy(module).double()  # float64: patched metrics compare at 1e-6 relative
    clean = inputs["input_ids"]
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 11) % module.config.vocab_size
    return module, clean, corrupted


def random_directions(k, d, seed):
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("site,d", [("blocks.1.attn.z[head=2]", 8), ("blocks.0.mlp.post[0:6]", 6), ("blocks.1.attn.z", 32)])
def test_full_rank_basis_equals_full_patching_and_empty_equals_none(gpt2, site, d):
    module, clean, corrupted = gpt2
    metric = logit_difference(CORRECT, WRONG)
    full = subspace_patching(module, clean, corrupted, metric, site, random_directions(d, d, 1))
    exact = activation_patching(module, clean, corrupted, metric, sites=site, per="site")
    assert full.k == full.d == d
    assert full.metric_patched == pytest.approx(float(exact.metric[0]), rel=1e-6)
    assert full.metric_patched != pytest.approx(full.metric_corrupt, rel=1e-3)  # the patch does something
    empty = subspace_patching(module, clean, corrupted, metric, site, torch.empty(0, d))
    assert empty.k == 0 and empty.split is None
    assert empty.metric_patched == empty.metric_corrupt


def test_one_direction_equals_the_projection_substituted_by_hand(gpt2):
    module, clean, corrupted = gpt2
    direction = random_directions(1, 8, 2)[0]
    result = subspace_patching(module, clean, corrupted, logit_difference(CORRECT, WRONG), "blocks.1.attn.z[head=1]", 3 * direction)
    unit = direction / direction.norm()
    torch.testing.assert_close(result.basis[0], unit, rtol=1e-12, atol=1e-12)  # orthonormalised, sign kept
    c_proj = module.transformer.h[1].attn.c_proj
    seen = []
    handle = c_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        module(input_ids=clean)
    handle.remove()
    clean_z = seen[0][..., 8:16]  # head 1 of [batch, pos, 4·8]

    def substitute(mod, args):
        x = args[0].clone()
        head = x[..., 8:16]
        x[..., 8:16] = head + ((clean_z - head) @ unit)[..., None] * unit
        return (x,)

    handle = c_proj.register_forward_pre_hook(substitute)
    try:
        with torch.no_grad():
            logits = module(input_ids=corrupted).logits
    finally:
        handle.remove()
    by_hand = float((logits[:, -1, CORRECT] - logits[:, -1, WRONG]).mean())
    assert result.metric_patched == pytest.approx(by_hand, rel=1e-9)
    assert result.metric_patched != pytest.approx(result.metric_corrupt, rel=1e-4)


def test_row_null_split_on_hand_made_weights():
    v = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 2.0]])
    split = row_null_split(v, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # null space: e3
    assert split.rank == 2
    np.testing.assert_allclose(split.row_norm, [math.sqrt(5), 0.0], atol=1e-12)
    np.testing.assert_allclose(split.null_norm, [3.0, 2.0], rtol=1e-12)
    np.testing.assert_allclose(split.row_norm**2 + split.null_norm**2, split.norm**2, rtol=1e-12)
    np.testing.assert_allclose(split.row_fraction, [5 / 14, 0.0], atol=1e-12)
    np.testing.assert_allclose(split.row_fraction + split.null_fraction, 1.0, rtol=1e-12)
    rank_one = row_null_split(v[:1], torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0]]))  # row space: (1,1,0)/√2
    assert rank_one.rank == 1
    np.testing.assert_allclose(rank_one.row_norm, [math.sqrt(4.5)], rtol=1e-12)  # projection (1.5, 1.5, 0)
    np.testing.assert_allclose(rank_one.null_norm, [math.sqrt(9.5)], rtol=1e-12)  # rest (-0.5, 0.5, 3)
    with pytest.raises(InputError, match=r"must be \[out, 3\]"):
        row_null_split(v, torch.ones(2, 4))


def test_downstream_weights_are_the_reading_columns():
    gpt2, _ = tiny_model("gpt2")
    llama, _ = tiny_model("llama")
    from actscope.explain.patching import as_model, plan_editable

    model = as_model(gpt2)
    site = plan_editable(model, "blocks.1.attn.z[head=1]")[0]
    torch.testing.assert_close(downstream_weight(model, site), gpt2.transformer.h[1].attn.c_proj.weight.T[:, 8:16])
    model = as_model(llama)
    site = plan_editable(model, "blocks.0.mlp.post[3,5]")[0]
    torch.testing.assert_close(downstream_weight(model, site), llama.model.layers[0].mlp.down_proj.weight[:, [3, 5]])
    assert downstream_weight(model, plan_editable(model, "blocks.0.resid.post")[0]) is None  # not a linear layer's input


def test_orthonormal_basis_spans_the_directions():
    rows = random_directions(3, 6, 4)
    basis = orthonormal_basis(rows)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(rows @ basis.T @ basis, rows, rtol=1e-10, atol=1e-10)
    with pytest.raises(InputError, match="linearly dependent"):
        orthonormal_basis(torch.stack([rows[0], 2 * rows[0]]))
    with pytest.raises(InputError, match="at most 6"):
        orthonormal_basis(random_directions(7, 6, 5))


class RankOneReadout(torch.nn.Module):
    """``head(tanh(body(x)))`` with ``head.weight = u vᵀ``: only the direction ``v`` of the
    hidden vector reaches the output."""

    def __init__(self, v: torch.Tensor):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.outer(4 * torch.randn(3), v))

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_learned_rotation_finds_the_read_direction_and_leaves_the_model_alone():
    v = torch.randn(8, generator=torch.Generator().manual_seed(3))
    v = v / v.norm()
    net = RankOneReadout(v)
    generator = torch.Generator().manual_seed(1)
    clean, corrupted = {"x": torch.randn(64, 8, generator=generator)}, {"x": torch.randn(64, 8, generator=generator)}
    metric = lambda logits, inputs: logits[:, 0].mean()  # noqa: E731
    before, rng = model_state(net), torch.random.get_rng_state()
    learned = learn_subspace(net, clean, corrupted, metric, "module:head@input", 1, steps=100, lr=0.05, seed=0)
    assert model_state(net) == before and all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng)  # the seeded rotation forks the RNG
    assert abs(float(learned.basis[0] @ v.double())) > 0.99
    assert learned.losses[-1] < learned.losses[0]
    assert learned.patch.split.row_fraction[0] > 0.98  # head's row space is span(v)
    assert learned.patch.recovered == pytest.approx(1.0, abs=0.02)
    again = learn_subspace(net, clean, corrupted, metric, "module:head@input", 1, steps=100, lr=0.05, seed=0)
    assert torch.equal(again.basis, learned.basis)

    def failing(logits, inputs):
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        learn_subspace(net, clean, corrupted, metric, "module:head@input", 1, steps=3, loss=failing)
    assert model_state(net) == before
    with pytest.raises(InputError, match="k must be an int in 1..8"):
        learn_subspace(net, clean, corrupted, metric, "module:head@input", 9)


def test_one_site_only(gpt2):
    module, clean, corrupted = gpt2
    with pytest.raises(InputError, match="works on one site"):
        subspace_patching(module, clean, corrupted, logit_difference(CORRECT, WRONG), "blocks.*.attn.z", torch.eye(32))
    with pytest.raises(InputError, match="8-dimensional"):
        subspace_patching(module, clean, corrupted, logit_difference(CORRECT, WRONG), "blocks.0.attn.z[head=0]", torch.eye(6))
