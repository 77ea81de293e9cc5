"""The CLI against careless and hostile input: text that looks like markup prints as written, a
bad --out fails before any work, a full disk and a broken model are the user's to fix (exit 2),
and every number and range names the flag the user typed."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from actscope.cli.main import app
from actscope.zoo import tiny_lm

runner = CliRunner(env={"COLUMNS": "200"})


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def flat(text: str) -> str:
    return " ".join(text.split())


# -- user text is never read as markup ----------------------------------------------------------


def test_a_site_that_looks_like_markup_is_reported_as_written():
    result = invoke("profile", "--sites", "[/bold]x", "--max-tokens", "10")
    assert result.exit_code == 2, result.output
    assert "[/bold]x" in result.output and "internal error" not in result.output


def test_a_run_directory_with_brackets_gets_its_run_and_report(tmp_path):
    out = tmp_path / "q[/i]"
    result = invoke("profile", "--out", str(out), "--max-tokens", "40", "--sites", "blocks.0.mlp.post")
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file() and (out / "report.html").is_file()
    assert f"Run directory: {out}" in flat(result.output)


def test_sql_and_data_with_markup_print_as_written(tmp_path):
    out = tmp_path / "run"
    assert invoke("profile", "--out", str(out), "--max-tokens", "40", "--sites", "blocks.0.mlp.post", "--no-report").exit_code == 0
    result = invoke("query", str(out), "SELECT '[/b]bold [red]:cat:' AS \"[/i]\"")
    assert result.exit_code == 0, result.output
    assert "[/b]bold [red]:cat:" in result.output and "[/i]" in result.output
    result = invoke("query", str(out), "SELECT * FROM nothing_[/b]")
    assert result.exit_code == 2 and "nothing_[/b]" in result.output


# -- the flags the user typed ---------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--top-k", "0"], "--top-k must be at least 1, got 0"),
    (["--sites", "blocks.0-9.mlp.post"], "the range 0-9 goes beyond the model: all-MiniLM-L6-v2 has 6 blocks (0-5)"),
    (["--sites", "blocks.4-2.mlp.post"], "the range 4-2 is empty"),
])
def test_numbers_and_ranges_name_the_flag_and_the_model(args, message):
    result = invoke("profile", *args)
    assert result.exit_code == 2, result.output
    assert message in flat(result.output)


@pytest.mark.parametrize("content", ["\x00" * 64, "\x00\x01\x02\n\x1b\x7f\n", "\u200b\u202e\n\u2066\n"])
def test_data_of_nul_bytes_or_control_characters_is_refused(tmp_path, content):
    data = tmp_path / "data.txt"
    data.write_text(content)
    result = invoke("profile", "--data", str(data), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    assert "NUL bytes or other control characters" in flat(result.output)
    assert not (tmp_path / "run").exists()


# -- --out is checked before the first forward pass; a full disk is exit 2 --------------------------


def test_an_unwritable_out_fails_before_profiling():
    result = invoke("profile", "--out", "/proc/actscope/run", "--max-tokens", "40")
    assert result.exit_code == 2, result.output
    assert "is not writable" in flat(result.output) and "profiling" not in result.output


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KB tmpfs (needs root and mount; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_exit_2_and_leaves_nothing(small_disk):
    result = invoke("profile", "--out", str(small_disk / "run"), "--max-tokens", "200")
    assert result.exit_code == 2, result.output
    message = flat(result.output)
    assert "no space left" in message and "free there" in message and str(small_disk / "run") in message
    assert list(small_disk.iterdir()) == []


# -- a model whose own forward fails ------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_lm(tmp_path_factory):
    """A Llama directory whose config has more key/value heads than heads: it loads, and its
    forward pass raises."""
    import transformers

    source = tiny_lm("relu")
    directory = tmp_path_factory.mktemp("broken") / "broken-lm"
    config = transformers.AutoConfig.from_pretrained(source)
    config.num_key_value_heads = config.num_attention_heads * 2
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, directory / name)
    return directory


def test_a_model_whose_forward_fails_is_not_called_a_bug(broken_lm, tmp_path):
    result = invoke("profile", str(broken_lm), "--out", str(tmp_path / "run"), "--max-tokens", "20")
    assert result.exit_code == 2, result.output
    message = flat(result.output)
    assert "the model's own forward pass failed: RuntimeError: The size of tensor a" in message
    assert "not from actscope" in message and "bug in actscope" not in message
    assert not (tmp_path / "run").exists()


def test_an_error_inside_actscopes_own_hook_is_still_a_bug(tmp_path, monkeypatch):
    from actscope import trace

    def broken(*args, **kwargs):
        raise ValueError("a bug planted in the flattening")

    monkeypatch.setattr(trace, "flatten", broken)
    result = invoke("profile", "--out", str(tmp_path / "run"), "--max-tokens", "20", "--sites", "blocks.0.mlp.post")
    assert result.exit_code == 1, result.output
    assert "This is a bug in actscope" in flat(result.output) and "a bug planted" in result.output


def test_manifest_of_a_fresh_run_names_its_format(tmp_path):
    out = tmp_path / "run"
    assert invoke("profile", "--out", str(out), "--max-tokens", "20", "--no-report").exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["format"] == "actscope-run"
