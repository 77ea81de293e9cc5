"""profile → run directory → open_run, checked against a naive computation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import actscope
import actscope.data
import actscope.metrics.tables
import actscope.store
from conftest import model_state

DOCS = [
    "A small boat drifted past the lighthouse at dawn.",
    "Prices rose 3.5% in March, the third rise this year.",
    "def add(a, b): return a + b",
    "She asked whether the museum would open on Sunday.",
    "Thunder rolled over the hills.",
]


@pytest.fixture(scope="module")
def run(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "minilm"
    return actscope.profile(minilm, DOCS, sites="blocks.0-1.mlp.post,blocks.0.attn.pattern", out=out, batch_size=2, k=3)


def naive_real_tokens(minilm, site):
    batch = minilm.tokenizer(DOCS, return_tensors="pt", padding=True)
    with torch.no_grad(), actscope.capture(minilm, site) as cap:
        minilm(**batch)
    return cap.tensor(site).double().numpy()[batch["attention_mask"].bool().numpy()]


def test_neurons_table_equals_naive(minilm, run):
    table = run.to_pandas("neurons")
    rows = table[table.site == "blocks.1.mlp.post"].sort_values("unit")
    real = naive_real_tokens(minilm, "blocks.1.mlp.post")
    assert len(rows) == 1536
    assert (rows["count"].to_numpy() == real.shape[0]).all()
    np.testing.assert_allclose(rows["mean"].to_numpy(), real.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["std"].to_numpy(), real.std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["max"].to_numpy(), real.max(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["frac_pos"].to_numpy(), (real > 0).mean(0), atol=1.5 / real.shape[0])
    np.testing.assert_allclose(rows["frac_abs_gt_0.1"].to_numpy(), (np.abs(real) > 0.1).mean(0), atol=1.5 / real.shape[0])
    assert set(table.columns) >= {"site", "layer", "unit", "count", "mean", "std", "min", "max", "frac_pos",
                                  "frac_abs_gt_0", "frac_abs_gt_0.001", "frac_abs_gt_0.01", "frac_abs_gt_0.1", "frac_abs_gt_1"}


def test_layers_table(minilm, run):
    layers = run.to_pandas("layers").set_index("site")
    real = naive_real_tokens(minilm, "blocks.0.mlp.post")
    row = layers.loc["blocks.0.mlp.post"]
    assert row["tokens"] == real.shape[0] and row["units"] == 1536 and row["layer"] == 0
    assert row["activation_ratio"] == pytest.approx((real > 0).mean(), abs=2e-4)
    assert row["dead_units"] == int(((real > 0).sum(0) == 0).sum())


def test_heads_and_examples(run):
    heads = run.to_pandas("heads")
    assert len(heads) == 12 and heads["first_token_attention"].between(0, 1).all()
    examples = run.to_pandas("examples")
    first = examples[(examples.site == "blocks.0.mlp.post") & (examples.unit == 7)].sort_values("rank")
    assert len(first) == 3 and first["value"].is_monotonic_decreasing
    assert set(first["doc"]) <= set(range(len(DOCS)))
    assert all(isinstance(t, str) and t for t in first["token"])


def test_manifest_and_round_trip(minilm, run):
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"]["weight_hash"] == actscope.store.weight_hash(minilm.module)
    assert manifest["data"]["documents"] == len(DOCS)
    assert manifest["data"]["fingerprint"] == actscope.data.load_corpus(DOCS).fingerprint
    assert [p["site"] for p in manifest["plan"]] == ["blocks.0.mlp.post", "blocks.1.mlp.post", "blocks.0.attn.pattern"]
    again = actscope.open_run(run.path)
    assert set(again.tables) == set(run.tables)
    for name in run.tables:
        assert again.tables[name].equals(run.tables[name]), name
    for name in run.arrays:
        assert torch.equal(again.arrays[name], run.arrays[name]), name
    edges, counts = again.histogram("blocks.0.mlp.post")
    assert int(counts.sum()) == 1536 * manifest["data"]["tokens"]


def test_profile_leaves_model_unchanged(minilm):
    before = model_state(minilm.module)
    actscope.profile(minilm, DOCS[:2], sites="blocks.0.mlp.post,blocks.0.attn.pattern")
    assert model_state(minilm.module) == before


def test_max_tokens_is_exact(minilm):
    run = actscope.profile(minilm, DOCS, sites="blocks.0.mlp.post", max_tokens=17)
    assert run.manifest["data"]["tokens"] == 17
    assert run.to_pandas("neurons")["count"].max() == 17


def test_crash_mid_run_leaves_no_run(minilm, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(actscope.metrics.tables, "examples_table", explode)
    with pytest.raises(RuntimeError):
        actscope.profile(minilm, DOCS, sites="blocks.0.mlp.post", out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    with pytest.raises(actscope.RunDirError, match="no run directory"):
        actscope.open_run(tmp_path / "r")


def test_model_input_dicts_without_tokenizer():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    data = [{"input": torch.randn(10, 6)} for _ in range(3)]
    run = actscope.profile(net, data, sites="module:1@output")
    relu = torch.relu(net[0](torch.cat([d["input"] for d in data]))).double()
    neurons = run.to_pandas("neurons")
    np.testing.assert_allclose(neurons["mean"].to_numpy(), relu.mean(0).detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(neurons["frac_pos"].to_numpy(), (relu > 0).double().mean(0).numpy(), rtol=1e-12)


def test_text_data_needs_a_tokenizer():
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU())
    with pytest.raises(actscope.DataError, match="no tokenizer"):
        actscope.profile(net, ["some text"], sites="module:1@output")
