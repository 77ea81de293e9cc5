"""The CLI end to end on MiniLM, and exit code 2 with the fix for every kind of bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from actscope.cli.main import app

runner = CliRunner(env={"COLUMNS": "160"})


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_profile_end_to_end_on_minilm(tmp_path):
    out = tmp_path / "run"
    result = invoke("profile", "--out", str(out), "--max-tokens", "400", "--batch-size", "16")
    assert result.exit_code == 0, result.output
    assert "blocks.5.mlp.post" in result.output
    assert "activation ratio" in result.output
    assert f"Run directory: {out}" in result.output.replace("\n", "")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["data"]["tokens"] == 400
    assert manifest["model"]["name"] == "all-MiniLM-L6-v2"


def test_profile_user_text_file_and_sites(tmp_path):
    data = tmp_path / "notes.txt"
    data.write_text("first line of text\nsecond line, a little longer than the first\n")
    out = tmp_path / "run"
    result = invoke("profile", "--data", str(data), "--sites", "blocks.0.attn.pattern,blocks.0.mlp.pre[0:10]", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "heads.parquet").exists()
    assert json.loads((out / "manifest.json").read_text())["data"]["documents"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profile", "--data", "missing.txt"], "does not exist"),
        (["profile", "--sites", "blocks.1.mlp.psot"], "Did you mean: blocks.1.mlp.post"),
        (["profile", "--data", "{empty}"], "no text documents"),
        (["profile", "--data", "{odd}"], "supported"),
        (["profile", "{noconfig}"], "no config.json"),
        (["profile", "org/name"], "nothing was downloaded"),
        (["profile", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["profile", "--data", "{jsonl}", "--column", "body"], "text"),
        (["sites", "{noconfig}"], "no config.json"),
        (["profile", "--device", "tpu9"], "unknown device"),
        (["profile", "--max-tokens", "0"], "--max-tokens must be at least 1"),
    ],
)
def test_bad_input_exits_2_with_the_fix(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "data.xyz").write_text("x")
    (tmp_path / "rows.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "noconfig").mkdir()
    paths = {"empty": tmp_path / "empty.txt", "odd": tmp_path / "data.xyz", "noconfig": tmp_path / "noconfig", "jsonl": tmp_path / "rows.jsonl"}
    args = [a.format(**paths) if "{" in a else a for a in args] + (["--out", str(tmp_path / "out")] if args[0] == "profile" else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_exits_2(tmp_path):
    result = runner.invoke(app, ["profile", "--device", "cuda", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no CUDA GPU" in result.output


def test_existing_run_needs_overwrite(tmp_path):
    out = tmp_path / "run"
    assert invoke("profile", "--out", str(out), "--max-tokens", "50").exit_code == 0
    again = runner.invoke(app, ["profile", "--out", str(out), "--max-tokens", "50"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert invoke("profile", "--out", str(out), "--max-tokens", "60", "--overwrite").exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["data"]["tokens"] == 60


def test_sites_and_env_commands():
    result = invoke("sites", "--match", "blocks.0.*")
    assert result.exit_code == 0
    assert "blocks.0.mlp.post" in result.output and "1536" in result.output
    assert "blocks.1.mlp.post" not in result.output
    result = invoke("env")
    assert result.exit_code == 0 and "torch" in result.output and "bert" in result.output


def test_console_script_runs_as_a_process(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, "-m", "actscope.cli.main", "profile", "--data", str(tmp_path / "nope.txt")],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "nope.txt" in proc.stderr


def test_profile_a_users_causal_lm_directory(tmp_path):
    from actscope.zoo import held_out_corpus, tiny_lm

    data = tmp_path / "held_out.txt"
    data.write_text("\n".join(held_out_corpus(40)) + "\n")
    out = tmp_path / "run"
    result = invoke("profile", str(tiny_lm("relu")), "--data", str(data), "--sites", "blocks.*.mlp.post,logits", "--out", str(out))
    assert result.exit_code == 0, result.output
    layers = {row["site"]: row for row in __import__("actscope").open_run(out).layer_summary()}
    # A trained ReLU-gated model is sparse: few units are non-zero per token (Lazy Neuron).
    assert layers["blocks.1.mlp.post"]["activation_ratio_abs_gt_0"] < 0.3
    assert set(layers) == {"blocks.0.mlp.post", "blocks.1.mlp.post", "logits"}
