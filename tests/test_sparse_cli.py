"""``actscope sparsify`` and ``actscope generate`` on a tiny Llama saved with a word tokenizer."""
from __future__ import annotations

import random

import pytest
import torch
from typer.testing import CliRunner

import actscope
import actscope.sparse
from actscope.cli.main import app
from actscope.sparse import Calibration, calibrate
from conftest import word_tokenizer

WORDS = [f"w{i}" for i in range(60)]
runner = CliRunner()


def save_tiny_llama(path, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(["<pad>", "<bos>", "<unk>", *WORDS], bos="<bos>", pad_token="<pad>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse_cli")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(30)]
    (root / "data.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    return save_tiny_llama(root / "model"), root / "data.txt", docs


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_sparsify_writes_the_api_calibration_and_reports(workspace, tmp_path):
    model_dir, data, docs = workspace
    out = tmp_path / "cal.safetensors"
    result = run("sparsify", model_dir, "--data", data, "--sparsity", "0.5", "--method", "cats", "--out", out)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "sparsity" in text and "perplexity on held-out text (sparsity=0.5;" in text
    model = actscope.load(model_dir)
    saved = Calibration.load(out, model)
    direct = calibrate(model, docs[:24], method="cats", sparsity=0.5)  # the last 20 % (6 docs) are held out
    for key, value in direct.thresholds.items():
        assert torch.equal(saved.thresholds[key], value)
    assert f"{direct.expected_sparsity[0]:.4g}" in result.output
    report = actscope.sparse.evaluate(model, direct, docs[24:])
    assert f"dense {report.dense_ppl:.4f} → sparse {report.sparse_ppl:.4f}" in text


def test_sparsify_cett_takes_p_in_percent(workspace, tmp_path):
    model_dir, data, _ = workspace
    out = tmp_path / "cett.safetensors"
    result = run("sparsify", model_dir, "--data", data, "--p", "1", "--out", out)
    assert result.exit_code == 0, result.output
    saved = Calibration.load(out, actscope.load(model_dir))
    assert saved.method == "cett" and saved.settings["p"] == 0.01


@pytest.mark.parametrize("options,expected", [
    ([], {"allocation": "greedy", "projections": "all"}),
    (["--allocation", "uniform", "--projections", "mlp"], {"allocation": "uniform", "projections": "mlp"}),
])
def test_sparsify_teal_variants(workspace, tmp_path, options, expected):
    model_dir, data, _ = workspace
    out = tmp_path / "teal.safetensors"
    result = run("sparsify", model_dir, "--data", data, "--method", "teal", "--sparsity", "0.4", *options, "--out", out)
    assert result.exit_code == 0, result.output
    saved = Calibration.load(out, actscope.load(model_dir))
    assert {k: saved.settings[k] for k in expected} == expected
    text = " ".join(result.output.split())
    assert f"sparsity=0.4 {expected['allocation']} {expected['projections']}" in text
    if expected["projections"] == "all":
        assert saved.by_projection and "sparsity of each projection's input over the layers" in text
        rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") >= 4}
        for name in saved.settings["names"]:
            assert f"{saved.per_layer[f'sparsity {name}'].mean():.3f}" in rows[name]


@pytest.mark.parametrize("args,message", [
    (["--p", "1", "--method", "cats"], "takes a target sparsity and no p"),
    (["--sparsity", "0.5", "--method", "teal", "--allocation", "best"], "allocation must be one of greedy, uniform"),
    (["--sparsity", "0.5", "--method", "cats", "--projections", "all"], "allocation and projections are TEAL's options"),
    (["--sparsity", "1.5", "--method", "teal"], "sparsity must be a fraction"),
    (["--sparsity", "0.5", "--method", "dense"], "method must be one of"),
])
def test_sparsify_bad_options_exit_2(workspace, tmp_path, args, message):
    model_dir, data, _ = workspace
    result = run("sparsify", model_dir, "--data", data, *args, "--out", tmp_path / "x.safetensors")
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_generate_dense_and_sparse_side_by_side(workspace, tmp_path):
    model_dir, data, _ = workspace
    out = tmp_path / "core.safetensors"
    assert run("sparsify", model_dir, "--data", data, "--sparsity", "0.5", "--method", "core", "--out", out).exit_code == 0
    result = run("generate", model_dir, "--prompt", "w1 w2 w3 w4", "--calibration", out, "--max-new-tokens", "6")
    assert result.exit_code == 0, result.output
    assert "dense" in result.output and "sparse (core)" in result.output and "tokens/s" in result.output
    model = actscope.load(model_dir)
    inputs = model.tokenizer("w1 w2 w3 w4", return_tensors="pt")
    with torch.no_grad():
        ids = model.module.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    dense_text = model.tokenizer.decode(ids[0, 5:], skip_special_tokens=True)
    assert dense_text in " ".join(result.output.split())


def test_generate_refuses_another_models_calibration(workspace, tmp_path):
    model_dir, data, _ = workspace
    other = save_tiny_llama(tmp_path / "other", seed=1)
    out = tmp_path / "cal.safetensors"
    assert run("sparsify", model_dir, "--data", data, "--sparsity", "0.5", "--method", "teal", "--out", out).exit_code == 0
    result = run("generate", other, "--prompt", "w1 w2", "--calibration", out)
    assert result.exit_code == 2
    assert f"{out} was made for model 'model'" in " ".join(result.output.split())
