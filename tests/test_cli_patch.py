"""``actscope patch`` end to end on a saved tiny GPT-2 with a word-level tokenizer: the printed
and written tables equal the Python API's, and bad input exits 2 with the fix."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from actscope.cli.main import app
from actscope.zoo.tiny import tiny_model
from conftest import word_tokenizer

runner = CliRunner(env={"COLUMNS": "200"})
CLEAN, CORRUPTED = "w1 w2 w3 w4", "w1 w9 w3 w4"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    module, _ = tiny_model("gpt2")
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    module.save_pretrained(directory)
    word_tokenizer([f"w{i}" for i in range(module.config.vocab_size)]).save_pretrained(directory)
    return directory


def invoke(*args: str):
    return runner.invoke(app, ["patch", *args], catch_exceptions=False)


def api_result(model_dir, per, attribution=False):
    import actscope
    from actscope.explain.attribution import attribution_patching
    from actscope.explain.patching import activation_patching, logit_difference

    model = actscope.load(model_dir)
    function = attribution_patching if attribution else activation_patching
    sites = {"head": "blocks.*.attn.z", "unit": "blocks.*.mlp.post"}[per]
    return function(model, CLEAN, CORRUPTED, logit_difference(5, 6), sites=sites, per=per)


def test_patch_heads_prints_and_writes_the_api_table(model_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke(str(model_dir), "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", "w5", "--wrong", "w6",
                    "--per", "head", "--out", str(out))
    assert result.exit_code == 0, result.output
    expected = api_result(model_dir, "head")
    best = expected.top(1)
    assert "activation patching per head" in result.output
    assert f"{best.recovered[0]:.3f}" in result.output and f"{expected.metric_clean:.4f}" in result.output
    table = pq.read_table(out / "patching.parquet").to_pydict()
    assert len(table["recovered"]) == 8
    np.testing.assert_allclose(table["recovered"], expected.recovered, rtol=1e-6)
    assert table["head"] == expected.head.tolist()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "patching" and manifest["patching"]["answer"] == "w5"
    assert manifest["patching"]["forward_passes"] == 10


def test_attribution_per_unit_shows_the_pass_count(model_dir):
    result = invoke(str(model_dir), "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", "w5", "--wrong", "w6",
                    "--per", "unit", "--attribution", "--top", "3")
    assert result.exit_code == 0, result.output
    assert "2 forward + 1 backward passes" in result.output
    assert "3 of 128 components shown" in result.output
    expected = api_result(model_dir, "unit", attribution=True).top(1)
    assert f"{expected.recovered[0]:.3f}" in result.output


@pytest.mark.parametrize("args,message", [
    (("--answer", "w5 w6"), "is 2 tokens"),
    (("--corrupted", "w1 w9 w3"), "same batch and number of positions"),
    (("--per", "layer"), "--per must be one of"),
])
def test_bad_input_exits_2_with_the_fix(model_dir, args, message):
    options = {"--clean": CLEAN, "--corrupted": CORRUPTED, "--answer": "w5", "--wrong": "w6"}
    options.update(dict(zip(args[::2], args[1::2])))
    result = invoke(str(model_dir), *[part for pair in options.items() for part in pair])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
