"""Files bound to a model's weights (actscope.store.bound), once for every kind: the round trip,
the one refusal for other weights, every file that is not the expected one, and the write rules
(atomic, the umask's permissions, never replacing a user's file or folder, a full disk)."""
from __future__ import annotations

import errno
import json
import os
import stat

import numpy as np
import pytest
import torch

import actscope
from actscope.errors import InputError
from actscope.metrics.cett import CettSparsity, CettThresholds, SparsitySweep, SweepRow, record_cett_curves, thresholds_for
from actscope.sparse import Calibration, calibrate
from actscope.store import weight_hash
from actscope.store.files import StorageFullError
from actscope.zoo.tiny import tiny_model

KINDS = {"sparse-calibration": Calibration, "cett-thresholds": CettThresholds, "cett-sparsity": CettSparsity}
REMAKE = {
    "sparse-calibration": "recompute it for this model with `actscope sparsify` or actscope.sparse.calibrate",
    "cett-thresholds": "recompute it for this model with actscope.metrics.cett.cett_sparsity or thresholds_for",
    "cett-sparsity": "recompute it for this model with actscope.metrics.cett.cett_sparsity",
}
NOUN = {"sparse-calibration": "sparse calibration", "cett-thresholds": "CETT threshold set",
        "cett-sparsity": "CETT sparsity result"}


def data() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (4, 10), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


@pytest.fixture(scope="module")
def llama():
    return actscope.wrap(tiny_model("llama")[0], name="tiny-llama")


@pytest.fixture(scope="module")
def other():
    return actscope.wrap(tiny_model("llama", seed=1)[0], name="other-llama")


@pytest.fixture(scope="module")
def results(llama):
    """One object of every kind, made from ``llama``."""
    curves = record_cett_curves(llama, data(), grid_points=16)
    thresholds = thresholds_for(curves, 0.05, llama)
    rows = (SweepRow("cett", 0.01, 0.05, 0.4, 0.009, 3, True, (0.6, 0.7), tuple(float(e) for e in thresholds.eps)),
            SweepRow("topk", 0.01, 40.0, 0.375, 0.008, 4, False, (0.625, 0.625)))
    sparsity = CettSparsity(
        objective="causal-lm", p=0.01, thresholds=thresholds, curves=curves, activation_ratio=np.array([0.6, 0.7]),
        dense_activation_ratio=np.array([1.0, 0.9]), sparsity=0.35, degradation=0.009, passes=3, total_passes=7,
        converged=True, sweep=SparsitySweep(rows), seconds={"calibration": 0.5, "search": 1.25},
    )
    return {"sparse-calibration": calibrate(llama, data(), method="teal", sparsity=0.5),
            "cett-thresholds": thresholds, "cett-sparsity": sparsity}


def raw(path) -> tuple[dict, dict]:
    """The header and tensors as safetensors itself reads them (not through actscope)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["actscope"])
    return header, load_file(str(path))


def flat(text: str) -> str:
    return " ".join(text.split())


def refusal(call) -> str:
    with pytest.raises(InputError) as error:
        call()
    return flat(str(error.value))


# -- the round trip ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_keeps_every_tensor_and_header_field(results, llama, tmp_path, kind):
    original = results[kind]
    path = original.save(tmp_path / "file.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.safetensors"]  # no temporary left behind
    header, tensors = raw(path)
    assert {key: header[key] for key in ("format", "version", "kind", "model")} == {
        "format": "actscope-bound", "version": 1, "kind": kind,
        "model": {"name": "tiny-llama", "weight_hash": weight_hash(llama.module)},
    }
    expected = original.to_bound()
    assert {k: v for k, v in header.items() if k not in ("format", "version", "kind", "model")} == expected.header
    assert sorted(tensors) == sorted(expected.tensors)
    for name, tensor in expected.tensors.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), name

    back = KINDS[kind].load(path, llama)
    again = back.to_bound()
    assert (again.kind, again.model_name, again.weight_hash, again.header) == (kind, "tiny-llama", expected.weight_hash, expected.header)
    for name, tensor in expected.tensors.items():
        assert again.tensors[name].dtype == tensor.dtype and torch.equal(again.tensors[name], tensor), name


def test_dtypes_are_kept_as_given(results, tmp_path):
    """Calibrations store float32 thresholds, CETT thresholds float64: safetensors, not actscope, says so."""
    _, calibration = raw(results["sparse-calibration"].save(tmp_path / "cal.safetensors"))
    _, cett = raw(results["cett-thresholds"].save(tmp_path / "cett.safetensors"))
    assert {t.dtype for name, t in calibration.items() if name != "units"} == {torch.float32}
    assert calibration["units"].dtype == torch.int64
    assert {t.dtype for t in cett.values()} == {torch.float64}


def test_loaded_objects_equal_the_saved_ones(results, llama, tmp_path):
    cal = Calibration.load(results["sparse-calibration"].save(tmp_path / "cal.safetensors"), llama)
    for name, value in results["sparse-calibration"].thresholds.items():
        assert torch.equal(cal.thresholds[name], value)
    sparsity = results["cett-sparsity"]
    back = CettSparsity.load(sparsity.save(tmp_path / "cett.safetensors"), llama)
    assert back.sweep.rows == sparsity.sweep.rows and back.seconds == sparsity.seconds and back.c == sparsity.c
    np.testing.assert_array_equal(back.curves.cett, sparsity.curves.cett)
    for site in sparsity.thresholds.sites:
        assert back.thresholds.thresholds[site].dtype == np.float64
        np.testing.assert_array_equal(back.thresholds.thresholds[site], sparsity.thresholds.thresholds[site])
    assert back.to_pandas().equals(sparsity.to_pandas())


def test_a_cett_sparsity_file_also_reads_as_its_thresholds(results, llama, tmp_path):
    path = results["cett-sparsity"].save(tmp_path / "cett.safetensors")
    thresholds = CettThresholds.load(path, llama)
    assert thresholds.to_pandas().equals(results["cett-thresholds"].to_pandas())


# -- the one refusal for other weights ---------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_another_models_file_is_refused_naming_both_models_and_hashes(results, llama, other, tmp_path, kind):
    path = results[kind].save(tmp_path / "file.safetensors")
    text = refusal(lambda: KINDS[kind].load(path, other))
    mine, theirs = weight_hash(llama.module)[:12], weight_hash(other.module)[:12]
    assert text == (f"{path} was made for model 'tiny-llama' (weight hash {mine}…), not for model 'other-llama' "
                    f"(weight hash {theirs}…); a {NOUN[kind]} is valid only for the weights it was computed on: "
                    f"{REMAKE[kind]}")


def test_a_changed_weight_is_another_model(results, tmp_path):
    module = tiny_model("llama")[0]
    path = results["cett-thresholds"].save(tmp_path / "cett.safetensors")
    with torch.no_grad():
        module.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert "was made for model 'tiny-llama'" in refusal(lambda: CettThresholds.load(path, actscope.wrap(module)))


# -- files that are not the expected one -------------------------------------------------------
@pytest.mark.parametrize("kind,reader,loader", [
    ("sparse-calibration", CettThresholds, "actscope.sparse.Calibration.load"),
    ("cett-thresholds", Calibration, "actscope.metrics.cett.CettThresholds.load"),
    ("cett-thresholds", CettSparsity, "actscope.metrics.cett.CettThresholds.load"),
    ("cett-sparsity", Calibration, "actscope.metrics.cett.CettSparsity.load"),
])
def test_another_kind_is_refused_naming_its_kind_and_loader(results, llama, tmp_path, kind, reader, loader):
    path = results[kind].save(tmp_path / "file.safetensors")
    text = refusal(lambda: reader.load(path, llama))
    assert text.startswith(f"{path} holds a {NOUN[kind]} (kind '{kind}'), not a {NOUN[reader.bound_kind]}; "
                           f"read it with {loader}"), text


def test_a_plain_safetensors_file_is_not_ours(llama, tmp_path):
    from safetensors.torch import save_file

    plain, other_header, not_json = (tmp_path / f"{name}.safetensors" for name in ("weights", "tagged", "text"))
    save_file({"w": torch.ones(3)}, str(plain))
    save_file({"w": torch.ones(3)}, str(other_header), metadata={"actscope": json.dumps({"format": "mine"})})
    save_file({"w": torch.ones(3)}, str(not_json), metadata={"actscope": "my notes"})
    assert refusal(lambda: Calibration.load(plain, llama)) == (
        f"{plain} is a safetensors file but not one actscope wrote (its metadata has no 'actscope' header); pass a "
        "sparse calibration saved with .save(), or recompute it with `actscope sparsify` or actscope.sparse.calibrate")
    assert refusal(lambda: CettThresholds.load(other_header, llama)).startswith(
        f"{other_header} is not a file actscope wrote (its 'actscope' header has format 'mine', expected 'actscope-bound')")
    assert refusal(lambda: CettSparsity.load(not_json, llama)).startswith(
        f"{not_json} is not a file actscope wrote (its 'actscope' header has format None, expected 'actscope-bound')")


@pytest.mark.parametrize("cut", ["half", "last bytes", "text"])
def test_a_damaged_file_is_refused(results, llama, tmp_path, cut):
    path = results["cett-thresholds"].save(tmp_path / "cett.safetensors")
    content = path.read_bytes()
    path.write_bytes({"half": content[:len(content) // 2], "last bytes": content[:-4], "text": b"my notes\n"}[cut])
    text = refusal(lambda: CettThresholds.load(path, llama))
    assert text.startswith(f"{path} cannot be read as a safetensors file ("), text
    assert text.endswith("it is damaged or not a CETT threshold set: recompute it with "
                         "actscope.metrics.cett.cett_sparsity or thresholds_for"), text


def test_a_directory_or_a_missing_path_is_refused(llama, tmp_path):
    old_layout = tmp_path / "cett"
    old_layout.mkdir()
    (old_layout / "cett.json").write_text("{}", encoding="utf-8")
    text = refusal(lambda: CettSparsity.load(old_layout, llama))
    assert text.startswith(f"{old_layout} is a directory; a CETT sparsity result is one .safetensors file: pass that file's path")
    assert "in the directory layout of an older actscope, which this version no longer reads" in text
    assert refusal(lambda: Calibration.load(tmp_path / "none.safetensors", llama)).startswith(
        f"{tmp_path / 'none.safetensors'} does not exist; pass the file a sparse calibration was saved to")


@pytest.mark.parametrize("problem,edit,message", [
    ("units", lambda h, t: t.__setitem__("blocks.0.mlp.post", torch.zeros(3, dtype=torch.float64)),
     "tensor 'blocks.0.mlp.post' has shape [3]; the model's blocks.0.mlp.post has 64 units"),
    ("nan", lambda h, t: t["blocks.1.mlp.post"].__setitem__(0, float("nan")), "tensor 'blocks.1.mlp.post' holds nan"),
    ("no eps", lambda h, t: h.pop("eps"), "its header has no 'eps'"),
    ("layers", lambda h, t: h.__setitem__("layers", [0]), "its header has 2 sites, 1 layers and 2 ε values"),
    ("extra", lambda h, t: t.__setitem__("blocks.5.mlp.post", torch.zeros(64, dtype=torch.float64)),
     "its tensors ['blocks.0.mlp.post', 'blocks.1.mlp.post', 'blocks.5.mlp.post'] are not its sites"),
    ("version", lambda h, t: h.__setitem__("version", 2),
     "has format version 2; this actscope reads version 1: upgrade actscope, or recompute it"),
])
def test_an_edited_cett_file_is_refused(results, llama, tmp_path, problem, edit, message):
    from safetensors.torch import save_file

    header, tensors = raw(results["cett-thresholds"].save(tmp_path / "cett.safetensors"))
    edit(header, tensors)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata={"actscope": json.dumps(header)})
    text = refusal(lambda: CettThresholds.load(path, llama))
    assert text.startswith(str(path)) and message in text, text
    assert "actscope.metrics.cett.cett_sparsity or thresholds_for" in text


def test_thresholds_without_a_weight_hash_are_not_saved(results, tmp_path):
    from dataclasses import replace

    unbound = replace(results["cett-thresholds"], weight_hash="")
    assert "it records no weight hash of the model it was made for" in refusal(lambda: unbound.save(tmp_path / "t.safetensors"))
    assert list(tmp_path.iterdir()) == []


# -- writing: never a user's file or folder, the umask, a full disk ----------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("content", [b"my own notes\n", None])
def test_a_users_file_is_never_replaced_even_with_overwrite(results, tmp_path, kind, content):
    from safetensors.torch import save_file

    target = tmp_path / "data.safetensors"
    if content is None:
        save_file({"weights": torch.ones(3)}, str(target))
    else:
        target.write_bytes(content)
    before = target.read_bytes()
    text = refusal(lambda: results[kind].save(target, overwrite=True))
    assert text == (f"{target} exists and is not a file actscope wrote, so it is not replaced, even with overwrite "
                    "(it may be your data); choose another path or remove that file yourself")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.safetensors"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_users_directory_is_never_replaced_even_with_overwrite(results, tmp_path, kind):
    """Before, CettThresholds.save(path, overwrite=True) deleted whatever folder was at path."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work\n", encoding="utf-8")
    text = refusal(lambda: results[kind].save(folder, overwrite=True))
    assert text == (f"{folder} is a directory; actscope saves a {NOUN[kind]} as one .safetensors file and never "
                    "replaces a directory, even with overwrite (it may hold your data): choose another path, e.g. "
                    f"{folder / (kind + '.safetensors')}")
    assert (folder / "thesis.tex").read_text(encoding="utf-8") == "years of work\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"] and sorted(os.listdir(folder)) == ["thesis.tex"]


def test_an_actscope_file_is_replaced_only_with_overwrite(results, llama, tmp_path):
    target = tmp_path / "file.safetensors"
    results["cett-thresholds"].save(target)
    before = target.read_bytes()
    assert refusal(lambda: results["sparse-calibration"].save(target)) == (
        f"{target} already exists; pass overwrite=True (--overwrite) or choose another path")
    assert target.read_bytes() == before
    results["sparse-calibration"].save(target, overwrite=True)  # another kind, still ours
    assert Calibration.load(target, llama).method == "teal"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.safetensors"]


def test_an_older_actscope_calibration_is_ours_to_replace(results, llama, tmp_path):
    from safetensors.torch import save_file

    target = tmp_path / "cal.safetensors"
    save_file({"units": torch.tensor([64, 64])}, str(target),
              metadata={"actscope": json.dumps({"format": "actscope-sparse-calibration", "version": 1})})
    assert "in an older actscope format ('actscope-sparse-calibration')" in refusal(lambda: Calibration.load(target, llama))
    results["sparse-calibration"].save(target, overwrite=True)
    assert Calibration.load(target, llama).method == "teal"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_a_saved_file_has_the_umasks_permissions(results, tmp_path, kind, umask, mode):
    """Before, CETT results were a mkdtemp directory (0o700) and calibrations followed the umask."""
    old = os.umask(umask)
    try:
        path = results[kind].save(tmp_path / "file.safetensors")
    finally:
        os.umask(old)
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == mode


@pytest.mark.parametrize("kind", KINDS)
def test_a_full_disk_leaves_no_temporary_and_the_old_file(results, tmp_path, monkeypatch, kind):
    import safetensors.torch

    target = tmp_path / "file.safetensors"
    results[kind].save(target)
    before = target.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as half:
            half.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(StorageFullError) as error:
        results[kind].save(target, overwrite=True)
    assert flat(str(error.value)).startswith(f"cannot write {target}: no space left on its file system")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.safetensors"]
