"""The run directory: atomic writes, exact round trips, errors with fixes, weight hashing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from actscope.errors import InputError, RunDirError
from actscope.store import (
    RunData,
    library_versions,
    now_iso,
    read_run,
    weight_hash,
    write_run,
)

MANIFEST = {
    "model": {"id": "tiny", "weight_hash": "ab" * 32},
    "plan": {"sites": ["blocks.0.mlp.post", "blocks.1.mlp.post"], "units": [[17, 42], None]},
    "config": {"batch_size": 4, "threshold": 0.5, "nested": {"flag": True, "name": "ünïcode"}},
}


def _tables() -> dict:
    return {
        "neurons": {
            "layer": np.array([0, 0, 1], dtype=np.int64),
            "unit": [0, 1, 2],
            "mean": np.array([0.5, np.nan, -1.25], dtype=np.float64),
            "frac": np.array([0.1, 0.2, np.nan], dtype=np.float32),
            "site": ["blocks.0.mlp.post", "blocks.0.mlp.post", "blocks.1.mlp.post"],
        },
        "layers": pa.table({"layer": pa.array([0, 1], pa.int32()), "dead": [3, 0]}),
    }


def _arrays() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "hist": torch.randn(3, 5, generator=gen),
        "hist_bf16": torch.randn(4, generator=gen).to(torch.bfloat16),
        "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def _state() -> dict:
    return {"moments": {"n": torch.tensor(12, dtype=torch.int64),
                        "sum": torch.linspace(-1, 1, 3, dtype=torch.float64) / 3},
            "steps": 7, "sites": ["blocks.0.mlp.post"]}


def _write(path: Path, **kwargs) -> Path:
    args = {"manifest": MANIFEST, "tables": _tables(), "arrays": _arrays(), "state": _state()}
    return write_run(path, **{**args, **kwargs})


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# --- round trip ---------------------------------------------------------------------------


def test_round_trip_is_exact(tmp_path):
    out = _write(tmp_path / "run")
    run = read_run(out)
    assert isinstance(run, RunData) and run.path == out
    for name, columns in _tables().items():
        expected = pa.table(columns) if isinstance(columns, dict) else columns
        assert run.table(name).schema == expected.schema
        pd.testing.assert_frame_equal(run.to_pandas(name), expected.to_pandas())
    assert run.table("neurons").column("mean").null_count == 0  # NaN stays NaN, not null
    assert np.isnan(run.to_pandas("neurons")["mean"][1])
    assert list(run.arrays) == list(_arrays())
    for name, tensor in _arrays().items():
        assert run.arrays[name].dtype == tensor.dtype
        assert torch.equal(run.arrays[name], tensor)
    state, expected_state = run.state(), _state()
    assert state["steps"] == 7 and state["sites"] == expected_state["sites"]
    assert torch.equal(state["moments"]["sum"], expected_state["moments"]["sum"])
    assert torch.equal(state["moments"]["n"], expected_state["moments"]["n"])


def test_manifest_is_complete_and_lists_contents(tmp_path):
    run = read_run(_write(tmp_path / "run"))
    assert run.manifest == {**MANIFEST, "status": "complete", "format": "actscope-run", "format_version": 1,
                            "tables": ["neurons", "layers"],
                            "arrays": ["hist", "hist_bf16", "counts"]}
    on_disk = json.loads((tmp_path / "run" / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk == run.manifest


def test_directory_holds_exactly_the_expected_files(tmp_path):
    out = _write(tmp_path / "run")
    assert sorted(os.listdir(out)) == ["arrays.safetensors", "layers.parquet", "manifest.json",
                                       "neurons.parquet", "state.pt"]
    assert _siblings(out) == ["run"]  # no temporary directory left behind


def test_run_without_arrays_or_state(tmp_path):
    out = write_run(tmp_path / "run", manifest={"model": "m"}, tables={"t": {"x": [1.5]}})
    assert sorted(os.listdir(out)) == ["manifest.json", "t.parquet"]
    run = read_run(out)
    assert run.arrays == {} and run.state() is None and run.manifest["arrays"] == []


def test_parquet_tables_are_plain_files_pandas_reads(tmp_path):
    out = _write(tmp_path / "run")
    frame = pd.read_parquet(out / "neurons.parquet")
    assert list(frame.columns) == ["layer", "unit", "mean", "frac", "site"]
    assert frame["site"].tolist()[2] == "blocks.1.mlp.post"


def test_tensor_columns_are_accepted(tmp_path):
    values = torch.tensor([0.5, -1.5, float("nan")], dtype=torch.bfloat16)
    out = write_run(tmp_path / "run", manifest={},
                    tables={"t": {"v": values, "i": torch.arange(3)}})
    frame = read_run(out).to_pandas("t")
    assert frame["i"].tolist() == [0, 1, 2] and frame["v"].dtype == np.float32
    np.testing.assert_array_equal(frame["v"].to_numpy(), [0.5, -1.5, np.nan])


def test_shared_memory_arrays_are_written(tmp_path):
    base = torch.arange(10, dtype=torch.float32)
    out = write_run(tmp_path / "run", manifest={}, tables={},
                    arrays={"a": base[:5], "b": base[5:], "whole": base})
    run = read_run(out)
    assert torch.equal(run.array("b"), torch.arange(5, 10, dtype=torch.float32))
    assert torch.equal(run.array("whole"), base)


# --- overwrite ----------------------------------------------------------------------------


def test_overwrite_refused_without_flag(tmp_path):
    out = _write(tmp_path / "run")
    with pytest.raises(RunDirError, match="already exists") as info:
        write_run(out, manifest={"second": True}, tables={})
    assert "--overwrite" in str(info.value) and "--out" in str(info.value)
    assert str(out) in str(info.value)
    assert "second" not in read_run(out).manifest
    assert _siblings(out) == ["run"]


def test_overwrite_replaces_a_run(tmp_path):
    out = _write(tmp_path / "run")
    write_run(out, manifest={"second": True}, tables={"only": {"x": [1]}}, overwrite=True)
    run = read_run(out)
    assert run.manifest["second"] is True and list(run.tables) == ["only"]
    assert sorted(os.listdir(out)) == ["manifest.json", "only.parquet"]
    assert _siblings(out) == ["run"]  # the old run is deleted, not left aside


def test_existing_empty_directory_is_used(tmp_path):
    (tmp_path / "run").mkdir()
    out = _write(tmp_path / "run")
    assert read_run(out).manifest["status"] == "complete"
    assert _siblings(out) == ["run"]


def test_non_run_directory_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not an actscope run") as info:
        _write(tmp_path / "mine", overwrite=True)
    assert "choose another --out" in str(info.value)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_file_at_target_is_refused(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        _write(tmp_path / "run")


def test_missing_parent_is_created(tmp_path):
    out = _write(tmp_path / "a" / "b" / "run")
    assert read_run(out).manifest["status"] == "complete"


# --- crashes leave nothing half-written ---------------------------------------------------


def _fail_after_first_table(monkeypatch):
    real = pq.write_table
    calls = []

    def flaky(table, where, *args, **kwargs):
        calls.append(where)
        if len(calls) > 1:
            raise OSError("disk full (simulated)")
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", flaky)
    return calls


def test_crash_mid_write_leaves_nothing(tmp_path, monkeypatch):
    calls = _fail_after_first_table(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path / "run")
    assert len(calls) == 2  # the first table really was written before the crash
    assert list(tmp_path.iterdir()) == []


def test_crash_mid_overwrite_keeps_previous_run(tmp_path, monkeypatch):
    out = _write(tmp_path / "run")
    before = sorted(os.listdir(out))
    _fail_after_first_table(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        write_run(out, manifest={"second": True}, tables=_tables(), overwrite=True)
    monkeypatch.undo()
    assert _siblings(out) == ["run"] and sorted(os.listdir(out)) == before
    run = read_run(out)
    assert "second" not in run.manifest
    assert torch.equal(run.arrays["counts"], _arrays()["counts"])


def test_interrupt_mid_write_cleans_up(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_directory_is_removed(tmp_path):
    stale, fresh = tmp_path / ".run.tmp-old", tmp_path / ".run.tmp-new"
    for leftover in (stale, fresh):
        leftover.mkdir()
        (leftover / "neurons.parquet").write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(stale, (two_days_ago, two_days_ago))
    _write(tmp_path / "run")
    assert _siblings(tmp_path / "run") == [".run.tmp-new", "run"]


# --- bad input to the writer --------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escape", "", ".hidden", "a/b"])
def test_bad_table_name_is_refused(tmp_path, name):
    with pytest.raises(RunDirError, match="invalid table name"):
        write_run(tmp_path / "run", manifest={}, tables={name: {"x": [1]}})
    assert list(tmp_path.iterdir()) == []


def test_non_string_column_name_is_refused(tmp_path):
    with pytest.raises(RunDirError, match="column names must be plain strings"):
        write_run(tmp_path / "run", manifest={}, tables={"t": {0: [1]}})


def test_two_dimensional_column_is_refused(tmp_path):
    with pytest.raises(RunDirError, match="must be 1-D"):
        write_run(tmp_path / "run", manifest={}, tables={"t": {"x": np.zeros((2, 2))}})


def test_ragged_columns_are_refused(tmp_path):
    with pytest.raises(RunDirError, match="same length"):
        write_run(tmp_path / "run", manifest={}, tables={"t": {"x": [1, 2], "y": [1]}})


def test_manifest_must_be_json(tmp_path):
    with pytest.raises(RunDirError, match="cannot be written as JSON"):
        write_run(tmp_path / "run", manifest={"bad": object()}, tables={})
    assert list(tmp_path.iterdir()) == []


def test_unsafe_state_is_refused_at_write_time(tmp_path):
    with pytest.raises(RunDirError, match="cannot be saved safely"):
        _write(tmp_path / "run", state={"model": nn.Linear(2, 2)})
    assert list(tmp_path.iterdir()) == []


# --- read errors --------------------------------------------------------------------------


def test_read_missing_directory(tmp_path):
    where = tmp_path / "nothing"
    with pytest.raises(RunDirError, match="no run directory at") as info:
        read_run(where)
    assert f"actscope profile ... --out {where}" in str(info.value)


def test_read_directory_without_manifest(tmp_path):
    with pytest.raises(RunDirError, match=r"is not an actscope run \(no manifest.json\)"):
        read_run(tmp_path)


def test_read_incomplete_run(tmp_path):
    out = _write(tmp_path / "run")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    with pytest.raises(RunDirError, match="did not finish") as info:
        read_run(out)
    assert "'running'" in str(info.value) and "--overwrite" in str(info.value)


def test_read_missing_table(tmp_path):
    out = _write(tmp_path / "run")
    (out / "layers.parquet").unlink()
    with pytest.raises(RunDirError, match="'layers' is listed in manifest.json") as info:
        read_run(out)
    assert "re-run" in str(info.value)


def test_read_corrupt_table(tmp_path):
    out = _write(tmp_path / "run")
    (out / "neurons.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(RunDirError, match="'neurons'.*cannot be read"):
        read_run(out)


def test_read_corrupt_manifest(tmp_path):
    out = _write(tmp_path / "run")
    (out / "manifest.json").write_text("{ truncated")
    with pytest.raises(RunDirError, match="manifest.json cannot be read"):
        read_run(out)


def test_read_missing_arrays_file(tmp_path):
    out = _write(tmp_path / "run")
    (out / "arrays.safetensors").unlink()
    with pytest.raises(RunDirError, match="arrays.safetensors cannot be read"):
        read_run(out)


def test_unknown_table_lists_available(tmp_path):
    run = read_run(_write(tmp_path / "run"))
    expected = "no table 'heads'; available tables: 'neurons', 'layers'"
    with pytest.raises(RunDirError, match=expected):
        run.table("heads")
    with pytest.raises(RunDirError, match="no array 'x'"):
        run.array("x")


def test_run_dir_error_is_an_input_error():
    assert issubclass(RunDirError, InputError)


def test_repr_is_short(tmp_path):
    text = repr(read_run(_write(tmp_path / "run")))
    assert "neurons" in text and "hist" in text and len(text) < 300


# --- weight hash --------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3).to(dtype)
        self.norm = nn.BatchNorm1d(3).to(dtype)


def _snapshot(module: nn.Module) -> dict:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def test_weight_hash_is_stable_and_leaves_module_unchanged():
    model = _Tiny()
    before = _snapshot(model)
    first = weight_hash(model)
    assert first == weight_hash(model) == weight_hash(_Tiny())
    assert len(first) == 64 and int(first, 16) >= 0
    after = _snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype
               for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_weight_hash_changes_with_one_parameter_element():
    model = _Tiny()
    base = weight_hash(model)
    with torch.no_grad():
        model.lin.weight[2, 1] += 1e-3
    assert weight_hash(model) != base


def test_weight_hash_changes_with_a_buffer():
    model = _Tiny()
    base = weight_hash(model)
    model.norm.running_mean[0] = 0.25
    assert weight_hash(model) != base


def test_weight_hash_depends_on_dtype_and_names():
    assert weight_hash(_Tiny()) != weight_hash(_Tiny(torch.float64))
    renamed = nn.Module()
    renamed.other = _Tiny().lin
    single = nn.Module()
    single.lin = _Tiny().lin
    assert weight_hash(renamed) != weight_hash(single)


def test_weight_hash_bfloat16():
    model = _Tiny(torch.bfloat16)
    before = _snapshot(model)
    base = weight_hash(model)
    assert base == weight_hash(_Tiny(torch.bfloat16)) and len(base) == 64
    assert all(torch.equal(before[k], v) for k, v in _snapshot(model).items())
    with torch.no_grad():
        model.lin.bias[0] += 1
    assert weight_hash(model) != base


def test_weight_hash_refuses_meta_tensors():
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    with pytest.raises(InputError, match="meta"):
        weight_hash(model)


# --- manifest helpers ---------------------------------------------------------------------


def test_library_versions():
    versions = library_versions()
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert versions["torch"] == torch.__version__ and versions["pyarrow"] == pa.__version__
    assert versions["numpy"] == np.__version__
    assert isinstance(versions["actscope"], str) and versions["actscope"]
    assert all(isinstance(v, str) for v in versions.values())


def test_now_iso_is_utc_and_parseable():
    from datetime import datetime, timezone

    stamp = datetime.fromisoformat(now_iso())
    assert stamp.tzinfo is not None and stamp.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 5


def test_import_is_light():
    code = ("import sys, actscope.store; "
            "print(sorted(m for m in ('pyarrow', 'pandas', 'safetensors') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.strip() == "[]"
