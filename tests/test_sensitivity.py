"""Sensitive neurons (SeND): the per-unit formula against a naive double loop, and the
checkpoint path against plain transformers forward hooks on hand-perturbed tiny Llamas."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

import actscope
from actscope.errors import InputError
from actscope.metrics.sensitivity import Sensitivity, neuron_sensitivity, sensitive_mask, sensitivity_from_trajectory
from actscope.zoo.tiny import tiny_model

import conftest

WORDS = [f"w{i}" for i in range(40)]
TEXTS = ["w1 w2 w3 w4 w5", "w7 w8 w9", "w10 w11 w12 w13 w14 w15 w16 w17", "w3 w30"]  # different lengths: padding


# -- the formula --------------------------------------------------------------------------
def naive_sensitivity(trajectory: np.ndarray) -> np.ndarray:
    """Σ_t |E_{t+1,i} − E_{t,i}| · Var_t(E_{t,i}), one unit and one step at a time."""
    steps, units = trajectory.shape
    out = np.zeros(units)
    for i in range(units):
        column = [float(trajectory[t, i]) for t in range(steps)]
        mean = sum(column) / steps
        variance = sum((x - mean) ** 2 for x in column) / steps  # population variance
        for t in range(steps - 1):
            out[i] += abs(column[t + 1] - column[t]) * variance
    return out


def test_trajectory_matches_double_loop():
    trajectory = torch.randn(6, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = sensitivity_from_trajectory(trajectory).numpy()
    np.testing.assert_allclose(got, naive_sensitivity(trajectory.numpy()), rtol=1e-6, atol=0)


def test_trajectory_hand_value():
    # values 0, 1, 3: total variation 3, population variance 14/9 → 14/3
    got = sensitivity_from_trajectory(torch.tensor([[0.0], [1.0], [3.0]]))
    assert float(got[0]) == pytest.approx(14 / 3, rel=1e-12)


def test_trajectory_with_extra_axes_is_per_entry():
    trajectory = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = sensitivity_from_trajectory(trajectory)
    assert got.shape == (3, 5)
    for n in range(3):
        np.testing.assert_allclose(got[n].numpy(), naive_sensitivity(trajectory[:, n].numpy()), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(1, 4), (5,), ()])
def test_trajectory_needs_two_checkpoints(shape):
    with pytest.raises(InputError, match="T >= 2"):
        sensitivity_from_trajectory(torch.zeros(shape))


def test_sensitive_mask_rounds_half_up_and_breaks_ties_by_index():
    values = np.array([1.0, 5.0, 5.0, 2.0, 0.0, 3.0, 4.0, 4.0, 0.5, 0.1])
    assert sensitive_mask(values, 0.1).nonzero()[0].tolist() == [1]
    assert sensitive_mask(values, 0.25).nonzero()[0].tolist() == [1, 2, 6]  # 2.5 → 3; ties: 6 before 7
    assert sensitive_mask(values, 0.01).sum() == 1  # at least one unit
    assert sensitive_mask(values, 1.0).all()
    for bad in (0, 0.0, 1.5, -0.1, True, "0.1"):
        with pytest.raises(InputError, match="top"):
            sensitive_mask(values, bad)


# -- checkpoints --------------------------------------------------------------------------
def word_tokenizer():
    return conftest.word_tokenizer(["<pad>", "<unk>", *WORDS], pad_token="<pad>", unk_token="<unk>")


def perturbed_llama(step: int) -> torch.nn.Module:
    """The tiny Llama with every weight moved by a step-dependent, seeded amount. In float64,
    so a padded batch and one unpadded input agree far below the tolerances."""
    model, _ = tiny_model("llama", seed=0)
    model = model.double()
    generator = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.03 * step * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return model


@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory):
    tokenizer = word_tokenizer()
    dirs = []
    for step in range(3):
        path = tmp_path_factory.mktemp(f"ckpt{step}")
        perturbed_llama(step).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return dirs


@pytest.fixture(scope="module")
def naive_models(checkpoint_dirs):
    """The checkpoints loaded by transformers itself (not through actscope)."""
    from transformers import LlamaForCausalLM

    return [LlamaForCausalLM.from_pretrained(path).eval() for path in checkpoint_dirs]


def naive_representations(models, texts, module_path, position, at="output"):
    """[T, inputs, units] from transformers directly: one unpadded input at a time, a plain
    forward hook on the named module."""
    tokenizer = word_tokenizer()
    out = []
    for model in models:
        seen = []
        module = model.get_submodule(module_path)
        if at == "output":
            handle = module.register_forward_hook(lambda mod, args, output: seen.append(output))
        else:
            handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        rows = []
        try:
            with torch.no_grad():
                for text in texts:
                    seen.clear()
                    model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
                    rows.append(seen[0][0, position])
        finally:
            handle.remove()
        out.append(torch.stack(rows))
    return torch.stack(out).numpy()


def naive_result(representations: np.ndarray, top: float):
    per_input = np.stack([naive_sensitivity(representations[:, n]) for n in range(representations.shape[1])])
    sensitivity = per_input.mean(axis=0)
    count = int(np.floor(top * len(sensitivity) + 0.5))
    order = sorted(range(len(sensitivity)), key=lambda i: -sensitivity[i])
    return per_input, sensitivity, set(order[:count])


def test_checkpoint_dirs_match_naive(checkpoint_dirs, naive_models):
    result = neuron_sensitivity([str(p) for p in checkpoint_dirs], TEXTS, top=0.25)
    assert isinstance(result, Sensitivity)
    assert result.site == "blocks.0.resid.post"  # 2 blocks: the penultimate is block 0
    expected = naive_representations(naive_models, TEXTS, "model.layers.0", -2)
    assert result.representations.shape == (3, len(TEXTS), 32)
    np.testing.assert_allclose(result.representations, expected, rtol=1e-6, atol=0)
    per_input, sensitivity, top_set = naive_result(expected, 0.25)
    np.testing.assert_allclose(result.per_input, per_input, rtol=1e-6, atol=0)
    np.testing.assert_allclose(result.sensitivity, sensitivity, rtol=1e-6, atol=0)
    assert set(np.flatnonzero(result.is_sensitive)) == top_set and len(top_set) == 8
    # Exactly the formula on the captured representations (no capture noise in between).
    np.testing.assert_allclose(result.sensitivity, naive_result(result.representations, 0.25)[1], rtol=1e-6, atol=0)
    assert result.n_checkpoints == 3 and result.n_inputs == len(TEXTS)


def test_modules_models_and_dirs_agree(checkpoint_dirs):
    tokenizer = word_tokenizer()
    from_dirs = neuron_sensitivity(checkpoint_dirs, TEXTS)
    modules = [perturbed_llama(step) for step in range(3)]  # rebuilt in memory, never saved
    from_modules = neuron_sensitivity(modules, TEXTS, tokenizer=tokenizer)
    from_models = neuron_sensitivity([actscope.wrap(m, tokenizer) for m in modules], TEXTS)
    np.testing.assert_allclose(from_modules.sensitivity, from_dirs.sensitivity, rtol=1e-6, atol=0)
    np.testing.assert_allclose(from_models.sensitivity, from_dirs.sensitivity, rtol=1e-6, atol=0)


def test_token_id_inputs_equal_text_inputs(checkpoint_dirs):
    tokenizer = word_tokenizer()
    rows = [tokenizer(t)["input_ids"] for t in TEXTS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    by_ids = neuron_sensitivity(checkpoint_dirs, {"input_ids": ids, "attention_mask": mask}, batch_size=3)
    by_text = neuron_sensitivity(checkpoint_dirs, TEXTS)
    np.testing.assert_allclose(by_ids.representations, by_text.representations, rtol=1e-6, atol=0)


def test_any_site_and_position(naive_models):
    tokenizer = word_tokenizer()
    for position in (0, 1, -1):
        result = neuron_sensitivity(naive_models, TEXTS, site="blocks.1.mlp.post", position=position, tokenizer=tokenizer)
        expected = naive_representations(naive_models, TEXTS, "model.layers.1.mlp.down_proj", position, at="input")
        assert result.site == "blocks.1.mlp.post" and result.position == position
        assert result.representations.shape == (3, len(TEXTS), 64)
        np.testing.assert_allclose(result.representations, expected, rtol=1e-6, atol=1e-12)  # atol only for entries near 0


def test_checkpoints_are_held_one_at_a_time():
    alive: list[weakref.ref] = []

    def checkpoints():
        for step in range(3):
            gc.collect()
            # the previous checkpoint must be gone before the next one is built
            assert all(ref() is None for ref in alive), f"checkpoint {step - 1} still alive"
            model = perturbed_llama(step)
            alive.append(weakref.ref(model))
            yield model
            del model

    result = neuron_sensitivity(checkpoints(), torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]]))
    assert result.n_checkpoints == 3


def test_model_mode_is_restored():
    modules = [perturbed_llama(step) for step in range(2)]
    modules[0].train()
    neuron_sensitivity(modules, torch.tensor([[3, 4, 5]]))
    assert modules[0].training and not modules[1].training


def test_table_and_top_units(naive_models):
    result = neuron_sensitivity(naive_models, TEXTS, top=0.1, tokenizer=word_tokenizer())
    table = result.to_table()
    assert set(table) == {"site", "unit", "sensitivity", "rank", "is_sensitive"}
    order = np.argsort(-result.sensitivity, kind="stable")
    assert result.top_units(5).tolist() == order[:5].tolist()
    assert result.top_units().tolist() == order[:3].tolist()  # 10 % of 32 → 3
    assert table["rank"][order[0]] == 0 and table["rank"][order[-1]] == 31
    assert result.to_pandas().shape == (32, 5)
    with pytest.raises(InputError, match="k must be"):
        result.top_units(33)


def test_errors(checkpoint_dirs):
    with pytest.raises(InputError, match="at least two checkpoints"):
        neuron_sensitivity(checkpoint_dirs[:1], TEXTS)
    with pytest.raises(InputError, match="single one"):
        neuron_sensitivity(str(checkpoint_dirs[0]), TEXTS)
    with pytest.raises(InputError, match="position 5 does not exist"):
        neuron_sensitivity(checkpoint_dirs, TEXTS, position=5)
    with pytest.raises(InputError, match="need a tokenizer"):
        neuron_sensitivity([perturbed_llama(0), perturbed_llama(1)], TEXTS)
    with pytest.raises(InputError, match="exactly one"):
        neuron_sensitivity(checkpoint_dirs, TEXTS, site="blocks.*.mlp.post")
    with pytest.raises(InputError, match="top"):
        neuron_sensitivity(checkpoint_dirs, TEXTS, top=0)
    with pytest.raises(InputError, match="checkpoint 0 is a int"):
        neuron_sensitivity([3, 4], TEXTS)


def test_different_architectures_are_refused(checkpoint_dirs):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(checkpoint_dirs[0])
    config.intermediate_size = 48
    wider = LlamaForCausalLM(config).double().eval()
    with pytest.raises(InputError, match="same architecture"):
        neuron_sensitivity([checkpoint_dirs[0], wider], TEXTS, site="blocks.0.mlp.post", tokenizer=word_tokenizer())


def test_auto_site_needs_two_blocks():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    models = [LlamaForCausalLM(config).eval() for _ in range(2)]
    with pytest.raises(InputError, match="at least two blocks"):
        neuron_sensitivity(models, torch.tensor([[1, 2, 3]]))
    result = neuron_sensitivity(models, torch.tensor([[1, 2, 3]]), site="blocks.0.resid.post")
    assert result.sensitivity.shape == (16,)
