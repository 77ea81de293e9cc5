"""Calibration: thresholds against naive quantiles of captured activations, file round trip,
refusal of another model's calibration, and bad settings."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import actscope
from actscope.errors import InputError
from actscope.metrics.core import sentence_core, token_core
from actscope.sparse import Calibration, calibrate
from actscope.zoo.tiny import tiny_model

LOW = 3


def data(seed: int = 1) -> list[dict]:
    """Two right-padded batches: padding must not count."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(LOW, 128, (4, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        mask[3, 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def llama():
    return actscope.wrap(tiny_model("llama")[0])


@pytest.fixture(scope="module")
def gpt2():
    return actscope.wrap(tiny_model("gpt2")[0])


def captured(model, site: str) -> torch.Tensor:
    """Real-token rows of ``site`` over the calibration data (independent of actscope.sparse)."""
    with actscope.capture(model, site, flat=True) as cap, torch.no_grad():
        for inputs in data():
            model.module(**inputs)
    return cap.tensor(site).double()


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_cats_threshold_is_the_quantile_of_abs_activation(which, request):
    model = request.getfixturevalue(which)
    cal = calibrate(model, data(), method="cats", sparsity=0.6)
    act = model.module.model.layers[0].mlp.act_fn if which == "llama" else model.module.transformer.h[0].mlp.act
    for layer in (0, 1):
        a = act(captured(model, f"blocks.{layer}.mlp.pre").float()).abs().double().numpy().ravel()
        t = float(np.quantile(a, 0.6))
        assert math.isclose(float(cal.threshold(layer, "act")), t, rel_tol=1e-6)
        assert math.isclose(cal.expected_sparsity[layer], float(np.mean((a < np.float32(t)) | (a == 0))), rel_tol=1e-12)
    assert cal.expected_weight_skipped == pytest.approx(cal.expected_sparsity * (2 / 3 if which == "llama" else 1 / 2), rel=1e-12)


def test_real_tokens_only(llama):
    """Padding rows are excluded: the number of calibration values is real tokens × units."""
    from actscope.sparse.families import mlp_blocks
    from actscope.sparse.recording import record_abs

    values = record_abs(llama, mlp_blocks(llama), data(), ("in", "down"))
    real = sum(int(b["attention_mask"].sum()) for b in data())
    assert values[(0, "in")].size == real * 32 and values[(1, "down")].size == real * 64


def test_teal_thresholds_are_quantiles_of_inputs(llama):
    cal = calibrate(llama, data(), method="teal", sparsity=0.5, allocation="uniform", projections="mlp")
    for layer in (0, 1):
        x = captured(llama, f"module:model.layers.{layer}.mlp.gate_proj@input").abs().numpy().ravel()
        h = captured(llama, f"blocks.{layer}.mlp.post").abs().numpy().ravel()
        for kind, values, share in (("in", x, "expected_in_sparsity"), ("down", h, "expected_down_sparsity")):
            t = float(np.quantile(values, 0.5))
            assert math.isclose(float(cal.threshold(layer, kind)), t, rel_tol=1e-6)
            assert math.isclose(cal.per_layer[share][layer], float(np.mean(values <= np.float32(t))), rel_tol=1e-12)
        s_in, s_down = cal.per_layer["expected_in_sparsity"][layer], cal.per_layer["expected_down_sparsity"][layer]
        assert math.isclose(cal.expected_sparsity[layer], (2 * s_in + s_down) / 3, rel_tol=1e-12)


def test_cett_thresholds_are_eps_over_column_norms(llama):
    cal = calibrate(llama, data(), method="cett", p=0.01)
    for layer in (0, 1):
        norms = llama.module.model.layers[layer].mlp.down_proj.weight.detach().double().norm(dim=0)  # [U]
        eps = cal.per_layer["eps"][layer]
        np.testing.assert_allclose(cal.threshold(layer, "neuron").double() * norms, np.full(64, eps), rtol=1e-6)
    assert cal.settings["p"] == 0.01 and cal.settings["degradation"] <= 0.01


def test_core_expected_sparsity_from_each_prompt_alone(llama):
    cal = calibrate(llama, data(), method="core", sparsity=0.75, alpha=0.4)
    assert cal.settings["beta"] == 0.25 and cal.settings["alpha"] == 0.4
    sizes = {0: [], 1: []}
    for batch in data():
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            row = ids[mask.bool()][None]
            for layer in (0, 1):
                with actscope.capture(llama, f"blocks.{layer}.mlp.post", flat=True) as cap, torch.no_grad():
                    llama.module(input_ids=row)
                counts = token_core(cap.tensor(f"blocks.{layer}.mlp.post"), 0.4).sum(0).numpy()
                sizes[layer].append(len(sentence_core(counts, 0.25)) / 64)
    np.testing.assert_allclose(cal.expected_sparsity, [1 - np.mean(sizes[0]), 1 - np.mean(sizes[1])], rtol=1e-12)


@pytest.mark.parametrize("method,kw", [("cats", {"sparsity": 0.5}), ("teal", {"sparsity": 0.3, "step": 0.05}),
                                       ("teal", {"sparsity": 0.3, "allocation": "uniform", "projections": "mlp"}),
                                       ("core", {"sparsity": 0.5})])
def test_round_trip(llama, tmp_path, method, kw):
    cal = calibrate(llama, data(), method=method, **kw)
    path = cal.save(tmp_path / "cal.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.safetensors"]  # no temporary left behind
    back = Calibration.load(path, llama)
    assert isinstance(back, Calibration)
    for name in ("method", "family", "model_name", "weight_hash", "layers", "units"):
        assert getattr(back, name) == getattr(cal, name)
    assert dict(back.settings) == dict(cal.settings)
    assert set(back.thresholds) == set(cal.thresholds)
    for key, value in cal.thresholds.items():
        assert torch.equal(back.thresholds[key], value)
    np.testing.assert_array_equal(back.expected_sparsity, cal.expected_sparsity)
    for key, value in cal.per_layer.items():
        np.testing.assert_array_equal(back.per_layer[key], value)
    assert back.to_pandas().equals(cal.to_pandas())
    with pytest.raises(InputError, match="already exists"):
        cal.save(path)


def test_another_models_calibration_is_refused(llama, tmp_path):
    path = calibrate(llama, data(), method="cats", sparsity=0.5).save(tmp_path / "cal.safetensors")
    other = actscope.wrap(tiny_model("llama", seed=1)[0], name="other-llama")
    from actscope.store import weight_hash

    with pytest.raises(InputError) as error:
        Calibration.load(path, other)
    message = str(error.value)
    assert f"{path} was made for model 'LlamaForCausalLM'" in message
    assert "not for model 'other-llama'" in message
    assert weight_hash(llama.module)[:12] in message and weight_hash(other.module)[:12] in message


def test_to_pandas_has_one_row_per_layer(llama):
    frame = calibrate(llama, data(), method="teal", sparsity=0.5, allocation="uniform", projections="mlp").to_pandas()
    assert list(frame["layer"]) == [0, 1]
    assert {"expected_sparsity", "expected_weight_skipped", "threshold_in", "threshold_down"} <= set(frame.columns)
    frame = calibrate(llama, data(), method="teal", sparsity=0.5, allocation="uniform").to_pandas()
    assert {"threshold_self_attn.q_proj", "threshold_mlp.down_proj", "block_error", "sparsity self_attn.o_proj"} <= set(frame.columns)


@pytest.mark.parametrize("kw,match", [
    ({"method": "fast", "sparsity": 0.5}, "method must be one of"),
    ({"method": "cats"}, "takes a target sparsity"),
    ({"method": "cats", "sparsity": 1.0}, r"sparsity must be a fraction in \[0, 1\)"),
    ({"method": "teal", "sparsity": 0.5, "p": 0.01}, "takes a target sparsity and no p"),
    ({"method": "cett", "sparsity": 0.5}, "takes p"),
    ({"method": "core", "sparsity": 0.5, "alpha": 0}, "alpha must be"),
    ({"method": "teal", "sparsity": 0.5, "allocation": "fast"}, "allocation must be one of greedy, uniform"),
    ({"method": "teal", "sparsity": 0.5, "projections": "attn"}, "projections must be one of all, mlp"),
    ({"method": "teal", "sparsity": 0.5, "step": 0}, r"step \(the block sparsity the greedy search adds per step\) must be in \(0, 0.5\]"),
    ({"method": "cats", "sparsity": 0.5, "allocation": "greedy"}, "allocation and projections are TEAL's options"),
])
def test_bad_settings(llama, kw, match):
    with pytest.raises(InputError, match=match):
        calibrate(llama, data(), **kw)


def test_training_mode_refused():
    module = tiny_model("llama")[0].train()
    with pytest.raises(InputError, match="model.eval"):
        calibrate(module, data(), method="cats", sparsity=0.5)
