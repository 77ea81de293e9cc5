"""What the run writer must never do: delete a user's files, leave temporaries of dead writers,
write with odd permissions, or fail late and obscurely on an unwritable or full disk."""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from actscope.errors import InputError, RunDirError
from actscope.store import read_run, write_run
from actscope.store.files import StorageFullError, atomic_file, temp_name


def _write(path: Path, **kwargs) -> Path:
    args = {"manifest": {"model": "m"}, "tables": {"t": {"x": [1.0, 2.0]}}, "arrays": {"a": torch.ones(3)}}
    return write_run(path, **{**args, **kwargs})


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- overwrite replaces only actscope's own runs, and only what they hold ----------------------


@pytest.mark.parametrize("manifest", [
    {"manifest_version": 3, "name": "my extension"},  # a browser extension
    {"status": "complete", "format_version": 1, "tables": []},  # looks like a run, has no format name
    {"format": "actscope-run", "format_version": 99, "status": "complete"},
    "not json at all",
])
def test_overwrite_never_replaces_a_folder_whose_manifest_is_not_actscopes(tmp_path, manifest):
    folder = tmp_path / "webapp"
    folder.mkdir()
    (folder / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    (folder / "index.html").write_text("<h1>mine</h1>")
    before = _tree(folder)
    with pytest.raises(RunDirError, match="is not an actscope run") as info:
        _write(folder, overwrite=True)
    assert "even with --overwrite" in str(info.value) and "choose another --out" in str(info.value)
    assert _tree(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["webapp"]


def test_overwrite_refuses_a_run_holding_files_the_user_added_and_lists_them(tmp_path):
    run = _write(tmp_path / "run")
    (run / "notes.txt").write_text("my analysis")
    (run / "plots").mkdir()
    (run / "plots" / "a.png").write_bytes(b"png")
    before = _tree(run)
    with pytest.raises(RunDirError, match="also holds files actscope did not write") as info:
        _write(run, overwrite=True, manifest={"second": True})
    message = str(info.value)
    assert "notes.txt" in message and "plots/" in message and "move them out" in message
    assert _tree(run) == before and "second" not in read_run(run).manifest


def test_overwrite_replaces_a_run_with_its_report(tmp_path):
    from actscope.store.writer import REPORT_MARKER

    run = _write(tmp_path / "run")
    (run / "report.html").write_text(f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">{REPORT_MARKER}</head></html>')
    _write(run, overwrite=True, manifest={"second": True})
    assert read_run(run).manifest["second"] is True
    assert not (run / "report.html").exists()


def test_overwrite_keeps_a_report_html_the_user_wrote_into_a_run(tmp_path):
    run = _write(tmp_path / "run")
    (run / "report.html").write_text("<html>my own notes, named like the report</html>")
    with pytest.raises(RunDirError, match=r"did not write \(report.html\)"):
        _write(run, overwrite=True)
    assert (run / "report.html").read_text().startswith("<html>my own notes")


def test_manifest_records_the_format_name(tmp_path):
    manifest = read_run(_write(tmp_path / "run")).manifest
    assert (manifest["format"], manifest["format_version"]) == ("actscope-run", 1)


# -- the reader refuses what it cannot trust ---------------------------------------------------


def _edit_manifest(run: Path, **changes) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.update(changes)
    (run / "manifest.json").write_text(json.dumps(manifest))


def test_reader_refuses_an_unknown_format_version(tmp_path):
    run = _write(tmp_path / "run")
    _edit_manifest(run, format_version=99)
    with pytest.raises(RunDirError, match="format version 99") as info:
        read_run(run)
    assert "reads version 1" in str(info.value)


def test_reader_refuses_a_foreign_format_name(tmp_path):
    run = _write(tmp_path / "run")
    _edit_manifest(run, format="someone-else")
    with pytest.raises(RunDirError, match="says format 'someone-else'"):
        read_run(run)


@pytest.mark.parametrize("tables", [["../../x"], ["/etc/passwd"], ["t", 3], "t"])
def test_reader_refuses_table_names_outside_the_run(tmp_path, tables):
    outside = tmp_path / "x.parquet"
    pq.write_table(__import__("pyarrow").table({"secret": [1]}), outside)
    run = _write(tmp_path / "a" / "run")
    _edit_manifest(run, tables=tables)
    with pytest.raises(RunDirError, match="no paths"):
        read_run(run)


def test_reader_accepts_a_run_written_before_the_format_name(tmp_path):
    run = _write(tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["format"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert read_run(run).manifest["format_version"] == 1


# -- leftovers of killed writers ---------------------------------------------------------------


def test_temporary_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "run"
    script = (
        "import sys, time; from pathlib import Path; from actscope.store.files import atomic_directory\n"
        "with atomic_directory(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'neurons.parquet').write_bytes(b'partial'); print(tmp.name, flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    with child.stdout:
        name = child.stdout.readline().strip()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert (tmp_path / name).is_dir()  # kill -9 ran no cleanup
    _write(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_temporary_of_a_live_writer_is_left_alone(tmp_path):
    target = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / temp_name(target).replace(f"-{os.getpid()}-", f"-{sleeper.pid}-")
        live.mkdir()
        _write(target)
        assert live.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()


# -- permissions follow the umask --------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_every_file_and_folder_gets_the_umask_permissions(tmp_path, mask):
    old = os.umask(mask)
    try:
        run = _write(tmp_path / "run", state={"n": torch.tensor(1)})
        with atomic_file(tmp_path / "report.html") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(run.stat().st_mode) == 0o777 & ~mask
    files = [*run.iterdir(), tmp_path / "report.html"]
    assert len(files) == 5
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~mask for p in files}


# -- unwritable and full disks -----------------------------------------------------------------


def test_unwritable_target_is_refused_before_any_work(tmp_path, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(RunDirError, match="is not writable") as info:
        _write(tmp_path / "sub" / "run")
    assert "choose another --out" in str(info.value) and not (tmp_path / "sub").exists()


def test_read_only_file_system_is_refused(tmp_path):
    with pytest.raises(RunDirError, match="is not writable"):
        _write(Path("/proc/actscope-run"))


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError("IOError: No space left on device. Detail: [errno 28]"),  # pyarrow's form
])
def test_full_disk_is_an_input_error_with_the_space_and_nothing_is_left(tmp_path, monkeypatch, error):
    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(StorageFullError) as info:
        _write(tmp_path / "run")
    assert isinstance(info.value, InputError)
    message = str(info.value)
    assert "no space left" in message and str(tmp_path / "run") in message and "free there" in message
    assert "needed" in message and "choose another --out" in message
    assert list(tmp_path.iterdir()) == []


def test_torch_save_on_a_full_disk_is_recognised(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4544 vs 4432")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(StorageFullError, match="no space left"):
        _write(tmp_path / "run", state={"n": torch.tensor(1)})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB tmpfs (needs root and mount; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk(small_disk):
    with pytest.raises(StorageFullError, match="no space left"):
        _write(small_disk / "run", arrays={"big": torch.zeros(100_000)})
    assert list(small_disk.iterdir()) == []
