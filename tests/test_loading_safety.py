"""Loading a model directory safely: no model code runs unless asked, and every broken file is
refused as bad input (exit 2) with the file at fault named."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import word_tokenizer
from typer.testing import CliRunner

import actscope
from actscope.cli.main import app

runner = CliRunner(env={"COLUMNS": "160"})


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny Llama directory as save_pretrained writes it (weights, config, tokenizer)."""
    from actscope.zoo.tiny import tiny_model

    module, _ = tiny_model("llama")
    directory = tmp_path_factory.mktemp("saved") / "tiny-llama"
    module.save_pretrained(directory)
    word_tokenizer(["<pad>", "a", "b"], pad_token="<pad>").save_pretrained(directory)
    return directory


@pytest.fixture
def model_dir(saved, tmp_path) -> Path:
    """A fresh copy of the tiny Llama directory for one test to damage."""
    return Path(shutil.copytree(saved, tmp_path / "model"))


@pytest.fixture(autouse=True)
def no_prompt(monkeypatch):
    """Fail if anything asks the terminal a question (transformers' "run the custom code? [y/N]")."""
    asked = []

    def refuse(prompt=""):
        asked.append(prompt)
        raise RuntimeError("input() was called")

    monkeypatch.setattr("builtins.input", refuse)
    yield
    assert asked == [], f"actscope let a prompt through: {asked}"


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def plant_custom_code(directory: Path, marker: Path, model_type: str = "evil") -> None:
    """Custom config/model code that creates ``marker`` as soon as it is imported."""
    (directory / "configuration_evil.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("the directory's code ran")
        from transformers import LlamaConfig

        class EvilConfig(LlamaConfig):
            model_type = "evil"
        """))
    (directory / "modeling_evil.py").write_text(textwrap.dedent("""
        from transformers import LlamaForCausalLM
        from .configuration_evil import EvilConfig

        class EvilForCausalLM(LlamaForCausalLM):
            config_class = EvilConfig
        """))
    edit_json(
        directory / "config.json",
        model_type=model_type,
        auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"},
    )


def weights_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


# --- model code shipped with the directory -------------------------------------------------------


def test_unknown_model_type_with_own_code_is_refused_and_the_code_never_runs(model_dir, tmp_path):
    marker = tmp_path / "marker"
    plant_custom_code(model_dir, marker)
    with pytest.raises(actscope.ModelLoadError) as error:
        actscope.load(model_dir)
    message = " ".join(str(error.value).split())
    assert "ships its own Python code" in message
    assert "AutoConfig=configuration_evil.EvilConfig" in message
    assert "AutoModelForCausalLM=modeling_evil.EvilForCausalLM" in message
    assert "configuration_evil.py, modeling_evil.py" in message
    assert "actscope does not run a model's own code unless asked" in message
    assert "trust_remote_code=True" in message and "--trust-remote-code" in message
    assert not marker.exists()


def test_with_stdin_closed_the_refusal_comes_at_once_and_trust_remote_code_runs_the_code(model_dir, tmp_path):
    """In a fresh process with no terminal (stdin closed): no prompt, a refusal; then, trusted, the
    directory's code runs (the marker appears) and its class is the model."""
    marker = tmp_path / "marker"
    plant_custom_code(model_dir, marker)
    script = textwrap.dedent(f"""
        import pathlib, actscope
        try:
            actscope.load({str(model_dir)!r})
        except actscope.ModelLoadError as error:
            print("refused:", "ships its own Python code" in str(error))
        print("marker after refusal:", pathlib.Path({str(marker)!r}).exists())
        model = actscope.load({str(model_dir)!r}, trust_remote_code=True)
        print("loaded:", type(model.module).__name__)
        """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run(
        [sys.executable, "-c", script], stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "refused: True" in proc.stdout
    assert "marker after refusal: False" in proc.stdout
    assert "loaded: EvilForCausalLM" in proc.stdout
    assert marker.read_text() == "the directory's code ran"


def test_known_model_type_with_own_code_loads_the_built_in_code_and_says_so_once(model_dir, tmp_path, caplog):
    marker = tmp_path / "marker"
    plant_custom_code(model_dir, marker, model_type="llama")
    with caplog.at_level(logging.WARNING, logger="actscope"):
        model = actscope.load(model_dir)
    assert type(model.module).__name__ == "LlamaForCausalLM"
    notes = [r.getMessage() for r in caplog.records if r.name == "actscope"]
    assert len(notes) == 1, notes
    note = " ".join(notes[0].split())
    assert "ships its own Python code" in note and "AutoConfig=configuration_evil.EvilConfig" in note
    assert "was not run" in note and "built-in 'llama' code" in note
    assert "trust_remote_code=True" in note
    assert not marker.exists()


def test_tokenizer_with_own_code_falls_back_to_the_built_in_tokenizer(model_dir, tmp_path, caplog):
    marker = tmp_path / "marker"
    (model_dir / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizerFast(PreTrainedTokenizerFast):\n    pass\n"
    )
    edit_json(model_dir / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizerFast"]})
    with caplog.at_level(logging.WARNING, logger="actscope"):
        model = actscope.load(model_dir)
    assert model.tokenizer is not None and type(model.tokenizer).__name__ != "EvilTokenizerFast"
    assert model.tokenizer("a b")["input_ids"] == [1, 2]
    notes = [" ".join(r.getMessage().split()) for r in caplog.records if r.name == "actscope"]
    assert len(notes) == 1, notes
    assert "tokenizer_config.json auto_map: AutoTokenizer=tokenization_evil.EvilTokenizerFast" in notes[0]
    assert "tokenization_evil.py" in notes[0] and "was not run" in notes[0]
    assert not marker.exists()


# --- damaged weight files ------------------------------------------------------------------------


def damaged_weights_message(directory: Path) -> str:
    with pytest.raises(actscope.ModelLoadError) as error:
        actscope.load(directory)
    return " ".join(str(error.value).split())


def test_truncated_safetensors_names_the_file_and_the_fix(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = damaged_weights_message(model_dir)
    assert "model.safetensors is damaged or truncated" in message
    assert "file not fully covered" in message  # safetensors' own words
    assert "re-download the weights" in message


def test_garbage_safetensors_names_the_file(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x07" * 4096)
    message = damaged_weights_message(model_dir)
    assert "model.safetensors is damaged or truncated" in message and "header" in message


def test_a_damaged_shard_is_named(saved, tmp_path):
    module = actscope.load(saved).module
    directory = tmp_path / "sharded"
    module.save_pretrained(directory, max_shard_size="40KB")
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 1 and (directory / "model.safetensors.index.json").exists()
    shards[-1].write_bytes(shards[-1].read_bytes()[:100])
    message = damaged_weights_message(directory)
    assert f"{shards[-1].name} is damaged or truncated" in message


class RunsCodeWhenUnpickled:
    """A pickle payload that creates a file when unpickled without weights_only."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_needs_code_is_refused_and_never_unpickled(model_dir, tmp_path):
    marker = tmp_path / "marker"
    state = weights_of(actscope.load(model_dir).module)
    (model_dir / "model.safetensors").unlink()
    torch.save({**state, "extra": RunsCodeWhenUnpickled(marker)}, model_dir / "pytorch_model.bin")
    message = damaged_weights_message(model_dir)
    assert "refusing pytorch_model.bin" in message
    assert "torch.load(weights_only=True) will not read it" in message
    assert "a pickle that would need to run arbitrary code to load" in message
    assert "actscope never loads such a pickle" in message
    assert "io.open" in message  # torch's reason: the global it would have had to call
    assert "convert it to safetensors" in message
    assert not marker.exists()


def test_plain_tensor_pickle_still_loads_and_unrelated_pickles_are_not_read(model_dir, tmp_path):
    expected = weights_of(actscope.load(model_dir).module)
    (model_dir / "model.safetensors").unlink()
    torch.save(expected, model_dir / "pytorch_model.bin")
    # Trainer writes training_args.bin, a pickle of a custom class: from_pretrained never reads it.
    torch.save(RunsCodeWhenUnpickled(tmp_path / "marker"), model_dir / "training_args.bin")
    loaded = weights_of(actscope.load(model_dir).module)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    assert not (tmp_path / "marker").exists()


def test_truncated_pytorch_bin_names_the_file(model_dir):
    state = weights_of(actscope.load(model_dir).module)
    (model_dir / "model.safetensors").unlink()
    weights = model_dir / "pytorch_model.bin"
    torch.save(state, weights)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = damaged_weights_message(model_dir)
    assert "pytorch_model.bin is damaged or truncated" in message and "re-download the weights" in message


# --- nonsense in config.json ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"hidden_size": "abc"}, ["hidden_size", "abc"]),
        ({"hidden_size": -4}, ["negative dimension"]),
        ({"intermediate_size": -3}, ["negative dimension"]),
        ({"num_key_value_heads": 3}, ["ignore_mismatched_sizes"]),
        ({"vocab_size": 0}, ["IndexError"]),
    ],
)
def test_nonsense_config_value_names_config_json(model_dir, changes, words):
    edit_json(model_dir / "config.json", **changes)
    with pytest.raises(actscope.ModelLoadError) as error:
        actscope.load(model_dir)
    assert "\n" not in str(error.value)  # transformers' multi-line messages are folded into one line
    message = str(error.value)
    assert "config.json" in message and "fix the value in config.json" in message
    assert "model.safetensors is damaged" not in message
    for word in words:
        assert word in message


def test_config_that_is_not_json_names_the_file_and_the_fix(model_dir):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(actscope.ModelLoadError) as error:
        actscope.load(model_dir)
    message = " ".join(str(error.value).split())
    assert "cannot read the config" in message and "config.json is not valid JSON" in message
    assert "line 1 column 2" in message and "re-download the model" in message


def test_config_that_is_not_an_object(model_dir):
    (model_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(actscope.ModelLoadError, match="config.json must hold a JSON object"):
        actscope.load(model_dir)


def test_damaged_tokenizer_names_the_file(model_dir):
    (model_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(actscope.ModelLoadError) as error:
        actscope.load(model_dir)
    message = " ".join(str(error.value).split())
    assert "cannot load the tokenizer" in message and "tokenizer.json is not valid JSON" in message
    assert "line 1 column 2" in message


def test_tokenizer_that_only_its_own_code_can_read_is_refused_with_the_fix(model_dir, monkeypatch):
    """When no built-in tokenizer can stand in for a shipped one, the refusal points at the flag."""
    import transformers

    (model_dir / "tokenization_evil.py").write_text("raise SystemExit('the tokenizer code ran')\n")
    edit_json(model_dir / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})

    def no_built_in_tokenizer(*args, **kwargs):
        assert kwargs["trust_remote_code"] is False
        raise ValueError("needs custom code")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_built_in_tokenizer)
    with pytest.raises(actscope.ModelLoadError) as error:
        actscope.load(model_dir)
    message = " ".join(str(error.value).split())
    assert "ships its own Python code for its tokenizer" in message
    assert "AutoTokenizer=tokenization_evil.EvilTokenizer; files: tokenization_evil.py" in message
    assert "(ValueError: needs custom code)" in message and "--trust-remote-code" in message


# --- the CLI: exit 2, the file named ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 10), "model.safetensors is damaged or truncated"),
        (lambda d: edit_json(d / "config.json", hidden_size="abc"), "fix the value in config.json"),
        (lambda d: plant_custom_code(d, d.parent / "marker"), "ships its own Python code"),
    ],
)
def test_cli_exits_2_naming_the_file(model_dir, damage, words):
    damage(model_dir)
    result = runner.invoke(app, ["sites", str(model_dir)])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
    assert "internal error" not in result.output
    assert not (model_dir.parent / "marker").exists()
