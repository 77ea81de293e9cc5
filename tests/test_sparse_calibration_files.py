"""Calibration files: a hand-edited or damaged file is refused with its fault named (exit 2 in
the CLI), and saving writes with the user's permissions and never replaces a user's file."""
from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch
from typer.testing import CliRunner

import actscope
from actscope.cli.main import app
from actscope.errors import InputError
from actscope.sparse import Calibration, calibrate
from test_sparse_cli import WORDS, save_tiny_llama

FIX = "recompute it with `actscope sparsify` or actscope.sparse.calibrate"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved with its tokenizer, and a real CATS calibration of it saved once."""
    root = tmp_path_factory.mktemp("calibration_files")
    model_dir = save_tiny_llama(root / "model")
    model = actscope.load(model_dir)
    docs = [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(10)) for i in range(8)]
    path = calibrate(model, docs, method="cats", sparsity=0.5).save(root / "cats.safetensors")
    return model_dir, model, path


def read(path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["actscope"])
    return header, load_file(str(path))


def rewrite(source, target, edit) -> None:
    """Write ``source`` again as ``target`` after ``edit(header, tensors)`` changed them in place."""
    from safetensors.torch import save_file

    header, tensors = read(source)
    edit(header, tensors)
    save_file(tensors, str(target), metadata={"actscope": json.dumps(header)})


def as_method(method: str, **settings):
    """A cats file turned into ``method``'s shape (its tensors and settings), then ``settings``."""
    def edit(header, tensors):
        header["method"] = method
        for name in [n for n in tensors if n != "units"]:
            del tensors[name]
        for layer, units in zip(header["layers"], header["units"]):
            if method == "cett":
                tensors[f"{layer}.neuron"] = torch.full((units,), 0.01)
            elif method == "teal" and "names" in settings:  # over projections
                for name in settings["names"]:
                    tensors[f"{layer}.{name}"] = torch.tensor([0.1])
            elif method == "teal":
                tensors[f"{layer}.in"], tensors[f"{layer}.down"] = torch.tensor([0.1]), torch.tensor([0.1])
        header["settings"] = settings
    return edit


def drop(key):
    return lambda header, tensors: header.pop(key)


def setting(key, value):
    return lambda header, tensors: header.__setitem__(key, value)


def tensor(name, value):
    return lambda header, tensors: tensors.__setitem__(name, value)


def remove_tensor(name):
    return lambda header, tensors: tensors.pop(name)


CORRUPTIONS = {
    **{f"no {key}": (drop(key), f"its header has no '{key}'") for key in (
        "method", "family", "layers", "units", "expected_sparsity",
        "expected_weight_skipped", "per_layer", "settings")},
    "no model": (drop("model"), "its header's 'model' is None, expected {'name': the model's name, 'weight_hash': 64 hex digits}"),
    "no weight hash": (setting("model", {"name": "model"}), "its header's 'model' is {'name': 'model'}, expected"),
    "no format": (drop("format"), "is not a file actscope wrote (its 'actscope' header has format None, expected 'actscope-bound')"),
    "wrong format": (setting("format", "safetensors"), "(its 'actscope' header has format 'safetensors', expected 'actscope-bound')"),
    "older format": (setting("format", "actscope-sparse-calibration"),
                     "is a sparse calibration in an older actscope format ('actscope-sparse-calibration'), which this version no longer reads"),
    "wrong version": (setting("version", 7), "has format version 7; this actscope reads version 1: upgrade actscope, or recompute it"),
    "version as text": (setting("version", "1"), "has format version '1'; this actscope reads version 1"),
    "unknown method": (setting("method", "fast"), "header 'method' is 'fast', expected one of cats, teal, cett, core"),
    "layers not a list": (setting("layers", 2), "header 'layers' is 2, expected a list of distinct layer numbers ≥ 0"),
    "layers of text": (setting("layers", ["0", "1"]), "header 'layers' is ['0', '1'], expected a list of distinct"),
    "units not a list": (setting("units", {"0": 64}), "header 'units' is {'0': 64}, expected a list of unit counts ≥ 1"),
    "settings not an object": (setting("settings", [0.5]), "header 'settings' is [0.5], expected an object"),
    "per_layer not lists": (setting("per_layer", {"eps": 3}), "header 'per_layer' is {'eps': 3}, expected an object of"),
    "sparsity not a fraction": (setting("expected_sparsity", [0.5, 1.5]), "header 'expected_sparsity' is [0.5, 1.5], expected a list of fractions in [0, 1]"),
    "sparsity too short": (setting("expected_sparsity", [0.5]), "header 'expected_sparsity' has 1 entries for 2 layers ([0, 1])"),
    "skipped too long": (setting("expected_weight_skipped", [0.1, 0.1, 0.1]), "header 'expected_weight_skipped' has 3 entries for 2 layers"),
    "units too short": (setting("units", [64]), "header 'units' has 1 entries for 2 layers"),
    "per_layer too short": (setting("per_layer", {"eps": [0.1]}), "header 'per_layer.eps' has 1 entries for 2 layers"),
    "missing threshold": (remove_tensor("1.act"), "tensor '1.act' is missing (a cats calibration holds '{layer}.act' for layers [0, 1], and 'units')"),
    "extra tensor": (tensor("2.act", torch.tensor([0.1])), "it has an extra tensor '2.act' (a cats calibration holds '{layer}.act' for layers [0, 1], and 'units')"),
    "wrong shape": (tensor("0.act", torch.tensor([0.1, 0.2])), "tensor '0.act' has shape [2], expected [1]"),
    "scalar shape": (tensor("0.act", torch.tensor(0.1)), "tensor '0.act' has shape [], expected [1]"),
    "nan": (tensor("0.act", torch.tensor([math.nan])), "tensor '0.act' holds nan; thresholds are finite and ≥ 0"),
    "inf": (tensor("1.act", torch.tensor([math.inf])), "tensor '1.act' holds inf; thresholds are finite and ≥ 0"),
    "negative": (tensor("0.act", torch.tensor([-0.5])), "tensor '0.act' holds -0.5; thresholds are finite and ≥ 0"),
    "int dtype": (tensor("0.act", torch.tensor([1])), "tensor '0.act' has dtype int64, expected a floating-point dtype"),
    "units tensor disagrees": (tensor("units", torch.tensor([64, 32])), "tensor 'units' is [64, 32], the header says [64, 64]"),
    "units of another model": (lambda h, t: (h.update(units=[32, 32]), t.update(units=torch.tensor([32, 32]))),
                               "it covers MLP layers [0, 1] of [32, 32] units, model 'model' has layers [0, 1] of [64, 64] units"),
    "cett without p": (as_method("cett", c=1.0), "settings 'p' is missing, a cett calibration needs it (a fraction > 0: the allowed perplexity increase)"),
    "cett wrong shape": (lambda h, t: (as_method("cett", p=0.01)(h, t), t.__setitem__("1.neuron", torch.full((32,), 0.1))),
                         "tensor '1.neuron' has shape [32], expected [64]"),
    "teal sparsity text": (as_method("teal", sparsity="half", allocation="uniform", projections="mlp"),
                           "settings 'sparsity' is 'half', expected a fraction in [0, 1)"),
    "teal of an older actscope": (as_method("teal", sparsity=0.5),
                                  "settings 'allocation' is missing, a teal calibration needs it (greedy or uniform)"),
    "teal without names": (as_method("teal", sparsity=0.5, allocation="greedy", projections="all"),
                           "settings 'names' is None, expected the list of the blocks' projection names"),
    "teal of other projections": (as_method("teal", sparsity=0.5, allocation="greedy", projections="all", names=["attn.c_attn", "mlp.c_fc"]),
                                  "it has thresholds for projections ['attn.c_attn', 'mlp.c_fc'], model 'model' has ['self_attn.q_proj',"),
    "teal projection missing": (lambda h, t: (as_method("teal", sparsity=0.5, allocation="uniform", projections="all",
                                                        names=["self_attn.q_proj"])(h, t), t.pop("1.self_attn.q_proj")),
                                "tensor '1.self_attn.q_proj' is missing (a teal calibration holds '{layer}.self_attn.q_proj' for layers"),
    "core alpha 0": (as_method("core", sparsity=0.5, alpha=0, beta=0.5), "settings 'alpha' is 0, expected a fraction in (0, 1]"),
    "core beta 2": (as_method("core", sparsity=0.5, alpha=0.4, beta=2), "settings 'beta' is 2, expected a fraction in (0, 1]"),
    "core tensor": (lambda h, t: (as_method("core", alpha=0.4, beta=0.5)(h, t), t.__setitem__("0.act", torch.tensor([0.1]))),
                    "it has an extra tensor '0.act' (a core calibration holds only 'units')"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_file_is_refused_with_its_fault(saved, tmp_path, case):
    _, model, path = saved
    edit, message = CORRUPTIONS[case]
    target = tmp_path / "edited.safetensors"
    rewrite(path, target, edit)
    with pytest.raises(InputError) as error:
        Calibration.load(target, model)
    text = " ".join(str(error.value).split())
    assert text.startswith(str(target)), text
    assert message in text, text
    assert FIX in text, text


def test_the_untouched_file_still_loads(saved, tmp_path):
    """The rewrite itself changes nothing: a copy made without an edit loads."""
    _, model, path = saved
    rewrite(path, tmp_path / "copy.safetensors", lambda header, tensors: None)
    assert Calibration.load(tmp_path / "copy.safetensors", model).method == "cats"


runner = CliRunner()


@pytest.mark.parametrize("case", ["no layers", "nan", "cett without p"])
def test_generate_with_a_corrupt_file_exits_2(saved, tmp_path, case):
    model_dir, _, path = saved
    edit, message = CORRUPTIONS[case]
    target = tmp_path / "edited.safetensors"
    rewrite(path, target, edit)
    result = runner.invoke(app, ["generate", str(model_dir), "--prompt", "w1 w2", "--calibration", str(target), "-n", "2"])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


# -- saving ------------------------------------------------------------------------------------
def test_saved_file_follows_the_umask(saved, tmp_path):
    _, model, path = saved
    cal = Calibration.load(path, model)
    old = os.umask(0o022)
    try:
        written = cal.save(tmp_path / "out.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


@pytest.mark.parametrize("content", [b"my own notes\n", None])
def test_overwrite_never_replaces_a_users_file(saved, tmp_path, content):
    """Neither a text file nor a safetensors file without an actscope header is replaced."""
    from safetensors.torch import save_file

    _, model, path = saved
    cal = Calibration.load(path, model)
    target = tmp_path / "data.safetensors"
    if content is None:
        save_file({"weights": torch.ones(3)}, str(target))
    else:
        target.write_bytes(content)
    before = target.read_bytes()
    with pytest.raises(InputError) as error:
        cal.save(target, overwrite=True)
    text = " ".join(str(error.value).split())
    assert f"{target} exists and is not a file actscope wrote" in text
    assert "it is not replaced, even with overwrite" in text
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.safetensors"]


def test_overwrite_replaces_an_actscope_calibration(saved, tmp_path):
    _, model, path = saved
    cal = Calibration.load(path, model)
    target = tmp_path / "cal.safetensors"
    rewrite(path, target, setting("expected_sparsity", [0.0, 0.0]))  # ours, but different
    cal.save(target, overwrite=True)
    assert list(Calibration.load(target, model).expected_sparsity) == list(cal.expected_sparsity)


@pytest.mark.parametrize("where,message", [
    ("foreign", "exists and is not a file actscope wrote"),
    ("under a file", "is a file, not a folder; choose another --out"),
])
def test_sparsify_cli_refuses_the_out_path_before_loading_the_model(tmp_path, where, message):
    """The model directory does not exist: the --out check must come first to be seen."""
    (tmp_path / "data.txt").write_text("w1 w2 w3\nw4 w5 w6\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("mine\n", encoding="utf-8")
    out = tmp_path / "notes.txt" if where == "foreign" else tmp_path / "notes.txt" / "cal.safetensors"
    result = runner.invoke(app, ["sparsify", str(tmp_path / "no-model"), "--data", str(tmp_path / "data.txt"),
                                 "--sparsity", "0.5", "--out", str(out), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine\n"
