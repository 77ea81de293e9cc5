"""``actscope contrast`` end to end on a tiny saved model: the printed table, the run, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import actscope
from actscope.cli.main import app
from actscope.explain.contrast import contrast
from actscope.zoo.tiny import tiny_model
from conftest import word_tokenizer

runner = CliRunner(env={"COLUMNS": "200"})
WORDS = ["<pad>", "<s>"] + [f"w{i}" for i in range(126)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("contrast")
    module, _ = tiny_model("llama")
    module.save_pretrained(root / "model")
    word_tokenizer(WORDS, bos="<s>", pad_token="<pad>").save_pretrained(root / "model")
    generator = np.random.default_rng(0)
    for name, low in (("behaviour", 0), ("control", 60)):
        lines = [" ".join(f"w{low + i}" for i in generator.integers(0, 60, size=4 + n % 3)) for n in range(8)]
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def invoke(root, *extra: str):
    args = ["contrast", str(root / "model"), "--behaviour", str(root / "behaviour.txt"), "--control", str(root / "control.txt")]
    return runner.invoke(app, [*args, *extra], catch_exceptions=False)


def test_prints_the_ranking_and_writes_it_into_a_run(model_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke(model_dir, "--sites", "blocks.1.mlp.post,blocks.0.attn.z", "--top", "5", "--permutations", "200", "--out", str(out))
    assert result.exit_code == 0, result.output
    model = actscope.load(model_dir / "model")
    expected = contrast(model, str(model_dir / "behaviour.txt"), str(model_dir / "control.txt"),
                        "blocks.1.mlp.post,blocks.0.attn.z", n_permutations=200).to_table()
    assert "8 behaviour vs 8 control prompts" in result.output
    lines = [line for line in result.output.splitlines() if line.strip()[:1].isdigit() or line.lstrip("│ ")[:1].isdigit()]
    printed = [line.replace("│", " ").split() for line in lines]
    assert [row[:4] for row in printed] == [
        [str(expected["rank"][i]), expected["site"][i], expected["kind"][i], str(expected["index"][i])] for i in range(5)
    ]
    run = actscope.store.read_run(out)
    assert json.loads((out / "manifest.json").read_text())["kind"] == "contrast"
    stored = run.tables["contrast"].to_pydict()
    assert stored["site"] == list(expected["site"]) and stored["index"] == list(expected["index"])
    np.testing.assert_array_equal(stored["p_value"], expected["p_value"])


@pytest.mark.parametrize(("extra", "message"), [
    (["--top", "0"], "--top must be at least 1"),
    (["--sites", "blocks.9.mlp.post"], "unknown site"),
    (["--permutations", "0"], "n_permutations"),
    (["--rank-by", "p"], "rank_by must be one of"),
])
def test_bad_input_exits_2_with_the_fix(model_dir, extra, message):
    result = invoke(model_dir, *extra)
    assert result.exit_code == 2
    assert message in result.output.replace("\n", "")


def test_existing_run_needs_overwrite(model_dir, tmp_path):
    out = tmp_path / "run"
    assert invoke(model_dir, "--permutations", "20", "--out", str(out)).exit_code == 0
    again = invoke(model_dir, "--permutations", "20", "--out", str(out))
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert invoke(model_dir, "--permutations", "20", "--out", str(out), "--overwrite").exit_code == 0
