"""``actscope decode`` and ``actscope examples`` through typer's CliRunner."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

import actscope
from actscope.cli import common
from actscope.cli.main import app
from actscope.explain.decode import decode
from actscope.zoo.lm import held_out_corpus, tiny_lm

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(common.console, "_width", 400)  # no folded table cells; restored exactly after


@pytest.fixture(scope="module")
def model_dir():
    return tiny_lm("relu")


@pytest.fixture(scope="module")
def run_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "profiled"
    actscope.profile(model_dir, held_out_corpus(12), sites="blocks.*.mlp.post", out=out, k=4)
    return out


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_decode_prints_the_units_tokens(model_dir):
    result = invoke("decode", model_dir, "--site", "blocks.1.mlp.post[17]", "--top", "3")
    assert result.exit_code == 0, result.output
    expected = decode(actscope.load(model_dir), "blocks.1.mlp.post[17]", top=3)
    for token, score in zip(expected.token, expected.score):
        assert f"{token} ({score:+.2f})" in result.output
    assert "1 units" in result.output


@pytest.mark.parametrize(("site", "message"), [
    ("blocks.7.mlp.post", "unknown site"),
    ("blocks.0.mlp.post[999]", "out of range"),
    ("blocks.0.attn.z", "MLP neuron site"),
])
def test_decode_bad_site_or_unit_exits_2(model_dir, site, message):
    result = invoke("decode", model_dir, "--site", site)
    assert result.exit_code == 2
    assert message in result.output


def test_decode_writes_a_new_run_directory(model_dir, tmp_path):
    out = tmp_path / "decoded"
    result = invoke("decode", model_dir, "--site", "blocks.0.mlp.post[1,2]", "--top", "2", "--out", out)
    assert result.exit_code == 0, result.output
    written = actscope.open_run(out).to_pandas("decode")
    expected = decode(actscope.load(model_dir), "blocks.0.mlp.post[1,2]", top=2).to_pandas()
    assert written.token_id.tolist() == expected.token_id.tolist() and len(written) == 8


def test_decode_into_a_profiled_run_adds_the_agreement(model_dir, run_dir, tmp_path):
    result = invoke("decode", model_dir, "--site", "blocks.1.mlp.post", "--top", "5", "--out", run_dir, "--show", "3")
    assert result.exit_code == 0, result.output
    assert "agreement" in result.output and "253 more units" in result.output
    run = actscope.open_run(run_dir)
    agreement = run.to_pandas("decode_agreement")
    assert len(agreement) == 256 and (agreement.examples == 4).all()
    assert {"neurons", "examples", "decode"} <= set(run.tables)
    other = tmp_path / "other"
    actscope.profile(tiny_lm("silu"), held_out_corpus(2), sites="blocks.0.mlp.post", out=other, k=1)
    refused = invoke("decode", model_dir, "--site", "blocks.0.mlp.post[0]", "--out", other)
    assert refused.exit_code == 2 and "other weights" in refused.output


def test_examples_prints_highlighted_contexts(run_dir):
    result = invoke("examples", run_dir, "--site", "blocks.0.mlp.post", "--unit", "5", "--unit", "6", "--top", "2")
    assert result.exit_code == 0, result.output
    frame = actscope.open_run(run_dir).to_pandas("examples")
    for unit in (5, 6):
        best = frame[(frame.site == "blocks.0.mlp.post") & (frame.unit == unit) & (frame["rank"] == 0)].iloc[0]
        assert f"{best.value:.4g}" in result.output
    assert result.output.count("blocks.0.mlp.post") >= 4


@pytest.mark.parametrize(("args", "message"), [
    (("--site", "blocks.0.mlp.pots"), "Did you mean"),
    (("--site", "blocks.0.mlp.post", "--unit", "9999"), "no examples for unit"),
    (("--site", "blocks.0.attn.pattern"), "attention-pattern"),
])
def test_examples_unknown_site_or_unit_exits_2(run_dir, args, message):
    result = invoke("examples", run_dir, *args)
    assert result.exit_code == 2
    assert message in result.output
