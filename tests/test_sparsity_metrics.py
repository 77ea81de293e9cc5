"""activation_sparsity(): every figure equals a naive computation on the captured activations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import actscope
from actscope.errors import InputError
from actscope.metrics.sparsity import activation_sparsity

SITES = ["blocks.0.mlp.post", "blocks.1.mlp.post"]
DEAD = [3, 7, 40]  # units of block 1 forced dead by a very negative c_fc bias


def relu_gpt2() -> torch.nn.Module:
    """A tiny random GPT-2 with a plain ReLU MLP (d_mlp = 64) and three dead units."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=128, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64,
        activation_function="relu", initializer_range=0.2, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.bias[DEAD] = -1e3
    return model


def padded_batches() -> list[dict[str, torch.Tensor]]:
    """Two batches with right padding (padding must not count as a token)."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for lengths in ([7, 4, 9], [9, 2]):
        ids = torch.randint(0, 128, (len(lengths), max(lengths)), generator=generator)
        mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@pytest.fixture(scope="module")
def model():
    return relu_gpt2()


@pytest.fixture(scope="module")
def real(model):
    """Per site: the activations of real tokens only, [tokens, 64] float64, by hand."""
    rows = {site: [] for site in SITES}
    for batch in padded_batches():
        with torch.no_grad(), actscope.capture(model, SITES) as cap:
            model(**batch)
        keep = batch["attention_mask"].bool()
        for site in SITES:
            rows[site].append(cap.tensor(site)[keep].double())  # [real tokens, 64]
    return {site: torch.cat(parts).numpy() for site, parts in rows.items()}


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "relu"
    return actscope.profile(model, padded_batches(), sites="blocks.*.mlp.post", out=out)


def naive(a: np.ndarray, fires) -> dict[str, np.ndarray]:
    fired = fires(a)  # [tokens, units] bool
    per_token = fired.sum(1)
    return {
        "ratio": fired.mean(),
        "per_unit": fired.sum(0),
        "dead": np.flatnonzero(fired.sum(0) == 0),
        "hist": np.bincount(per_token, minlength=a.shape[1] + 1),
    }


def check_against_naive(result, real, fires):
    assert list(result.site) == SITES
    for i, site in enumerate(SITES):
        want = naive(real[site], fires)
        tokens = real[site].shape[0]
        assert result.tokens[i] == tokens == 31 and result.units[i] == 64
        assert result.activation_ratio[i] == pytest.approx(want["ratio"], rel=1e-9)
        assert result.sparsity[i] == pytest.approx(1 - want["ratio"], rel=1e-9)
        assert result.dead_units[i] == len(want["dead"])
        np.testing.assert_array_equal(result.dead(site), want["dead"])
        unit = result.per_unit
        rows = unit.site == site
        np.testing.assert_array_equal(unit.unit[rows], np.arange(64))
        np.testing.assert_array_equal(np.rint(unit.firing_frequency[rows] * tokens).astype(int), want["per_unit"])
        np.testing.assert_allclose(unit.firing_frequency[rows], want["per_unit"] / tokens, rtol=1e-12, atol=0)
        np.testing.assert_array_equal(result.per_token.counts(site), want["hist"])


def test_positive_criterion_equals_naive(model, real):
    result = activation_sparsity(model, padded_batches(), sites="blocks.*.mlp.post")
    check_against_naive(result, real, lambda a: a > 0)
    assert result.criterion == "a > 0"
    assert set(DEAD) < set(result.dead("blocks.1.mlp.post"))  # forced ones, and unit 61 on its own
    # Units: the pooled ratio weighs the two equally wide sites by their (equal) tokens.
    assert result.overall_activation_ratio == pytest.approx(np.mean([(real[s] > 0).mean() for s in SITES]), rel=1e-9)


def test_eps_criterion_from_the_ladder_and_added_to_it(model, real):
    in_ladder = activation_sparsity(model, padded_batches(), criterion=0.1)
    check_against_naive(in_ladder, real, lambda a: np.abs(a) > 0.1)
    assert in_ladder.criterion == "|a| > 0.1"
    added = activation_sparsity(model, padded_batches(), criterion=0.37)  # not in the default ladder
    check_against_naive(added, real, lambda a: np.abs(a) > 0.37)
    assert added.activation_ratio[0] < in_ladder.activation_ratio[0]


def test_reads_a_saved_run_without_recomputing(saved, real):
    for source in (saved, saved.path, actscope.open_run(saved.path)):
        check_against_naive(activation_sparsity(source), real, lambda a: a > 0)
    only = activation_sparsity(saved.path, sites="blocks.1.*")
    assert list(only.site) == ["blocks.1.mlp.post"]
    assert only.dead_units[0] == len(naive(real["blocks.1.mlp.post"], lambda a: a > 0)["dead"]) > len(DEAD)


def test_tables(saved, real):
    result = activation_sparsity(saved)
    layers = result.to_pandas()
    assert list(layers.columns) == ["site", "layer", "units", "tokens", "activation_ratio", "sparsity", "dead_units"]
    assert list(layers["layer"]) == [0, 1]
    units = result.per_unit.to_pandas()
    assert len(units) == 128 and units["dead"].sum() == result.dead_units.sum()
    tokens = result.per_token.to_pandas()
    assert len(tokens) == 2 * 65
    np.testing.assert_allclose(tokens.groupby("site")["share"].sum().to_numpy(), [1.0, 1.0], rtol=1e-12)


def test_errors_say_how_to_fix(saved, model):
    with pytest.raises(InputError, match="eps in .*criterion"):
        activation_sparsity(saved, criterion=0.37)
    with pytest.raises(InputError, match="no site of this run matches"):
        activation_sparsity(saved, sites="blocks.9.*")
    with pytest.raises(InputError, match="criterion must be"):
        activation_sparsity(saved, criterion="positive")
    with pytest.raises(InputError, match="criterion must be"):
        activation_sparsity(saved, criterion=-1.0)
    with pytest.raises(InputError, match="batch_size only apply when profiling"):
        activation_sparsity(saved, batch_size=4)
    with pytest.raises(InputError, match="no site 'nope'"):
        activation_sparsity(saved).dead("nope")
