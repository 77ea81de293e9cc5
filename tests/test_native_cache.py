"""The kernel cache loads only what this user built: a library planted in a shared cache, owned by
someone else or whose bytes differ from the digest in its name is never loaded, and a cache path
that cannot be used falls back to a private build with one warning, never an exception.

Each test compiles the real sparse kernel with a cheap flag set (a fraction of a second) and
checks it against a product written here.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import pytest
import torch

from actscope import native
from actscope.sparse import kernels

PACKAGE, SOURCE, STEM = "actscope.sparse", "_kernels.c", "sparse_rows"
FLAGS = (["-pthread", "-O1"],)  # cheap to compile; its own cache name, apart from the real kernel's
WARNING = "not using the kernel cache"
# A shared library whose constructor runs inside dlopen() and leaves a marker file behind: if it
# is ever loaded, the marker says so.
PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *path = getenv("ACTSCOPE_TEST_MARKER");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
"""

pytestmark = pytest.mark.skipif(native.find_compiler() is None or not hasattr(os, "getuid"),
                                reason="needs a C compiler and POSIX owners")


@pytest.fixture(scope="module")
def planted_bytes(tmp_path_factory) -> bytes:
    build = tmp_path_factory.mktemp("planted")
    (build / "planted.c").write_text(PLANTED_C)
    subprocess.run([native.find_compiler(), "-fPIC", "-shared", "-o", "planted.so", "planted.c"], cwd=build, check=True)
    return (build / "planted.so").read_bytes()


@pytest.fixture(autouse=True)
def fresh_process(tmp_path, monkeypatch):
    """Each test starts like a new process: nothing warned yet, its own private temporary root."""
    monkeypatch.setattr(native, "_warned", set())
    private = tmp_path / "private-tmp"
    private.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    monkeypatch.setenv("ACTSCOPE_TEST_MARKER", str(tmp_path / "marker"))
    return private


@pytest.fixture
def compiles(monkeypatch) -> list:
    """The compiler commands native.py runs, in order."""
    commands = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):
        commands.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(native.subprocess, "run", counting_run)
    return commands


def kernel_prefix() -> str:
    """``<stem>-<key>-`` as native.py names the kernel: the key hashes source, compiler, flags, CPU."""
    source = resources.files(PACKAGE).joinpath(SOURCE).read_bytes()
    key = b"\0".join([source, native.find_compiler().encode(), repr(list(map(list, FLAGS))).encode(), native.cpu_flags()])
    return f"{STEM}-{hashlib.sha256(key).hexdigest()[:16]}-"


def kernel_name(library: bytes) -> str:
    """The name under which native.py would load ``library``: the prefix, then its SHA-256."""
    return f"{kernel_prefix()}{hashlib.sha256(library).hexdigest()}.so"


def request_kernel():
    return native.compiled_library(PACKAGE, SOURCE, STEM, FLAGS, "the test falls back")


def assert_real_kernel(lib) -> None:
    """``lib`` is the sparse kernel: its dot_rows equals x @ w[index].T written out here."""
    assert lib is not None
    kernels._declare(lib)
    g = torch.Generator().manual_seed(0)
    x, w, index = torch.randn(3, 40, generator=g), torch.randn(9, 40, generator=g), torch.tensor([7, 0, 3])
    out = torch.empty(3, 3)
    kernels._call(lib.actscope_dot_rows, x, w, index, out, 40)
    naive = torch.tensor([[sum(float(x[i, j]) * float(w[r, j]) for j in range(40)) for r in index.tolist()] for i in range(3)])
    assert torch.allclose(out, naive, rtol=1e-4, atol=1e-4)


def cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "actscope" and WARNING in r.getMessage()]


def plant(directory: Path, library: bytes, uid: int | None = None) -> Path:
    path = directory / kernel_name(library)
    path.write_bytes(library)
    path.chmod(0o755)
    if uid is not None:
        os.chown(path, uid, -1)
    return path


@pytest.mark.parametrize("sharing", ["world-writable", "another user's"])
def test_a_library_planted_in_a_shared_cache_is_never_loaded(tmp_path, monkeypatch, caplog, planted_bytes, fresh_process, sharing):
    if sharing == "another user's" and os.getuid() != 0:
        pytest.skip("chown to another user needs root")
    shared = tmp_path / "shared"
    (shared / "kernels").mkdir(parents=True)
    for directory in (shared, shared / "kernels"):
        directory.chmod(0o777 if sharing == "world-writable" else 0o755)
    planted = plant(shared / "kernels", planted_bytes)
    if sharing == "another user's":
        os.chown(shared / "kernels", 12345, -1)
    monkeypatch.setenv("ACTSCOPE_CACHE", str(shared))
    with caplog.at_level(logging.INFO, logger="actscope"):
        first, second = request_kernel(), request_kernel()
    assert not (tmp_path / "marker").exists(), "the planted library was loaded: its constructor ran"
    assert_real_kernel(first)
    assert_real_kernel(second)
    [message] = cache_warnings(caplog)  # once per process, though the kernel was asked for twice
    assert str(shared / "kernels") in message
    reason = "writable by group or others (mode 0o777)" if sharing == "world-writable" else "owned by uid 12345, not by you (uid 0)"
    assert reason in message
    assert "set ACTSCOPE_CACHE to a directory only you can write" in message
    assert sorted(p.name for p in (shared / "kernels").iterdir()) == [planted.name]  # nothing written there
    assert list(fresh_process.iterdir()) == []  # the private build is gone once loaded


def test_a_library_owned_by_another_user_is_not_loaded(tmp_path, monkeypatch, caplog, planted_bytes, compiles):
    if os.getuid() != 0:
        pytest.skip("chown to another user needs root")
    monkeypatch.setenv("ACTSCOPE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "kernels").mkdir(parents=True, mode=0o700)
    planted = plant(tmp_path / "cache" / "kernels", planted_bytes, uid=12345)
    with caplog.at_level(logging.INFO, logger="actscope"):
        lib = request_kernel()
    assert not (tmp_path / "marker").exists(), "the library owned by uid 12345 was loaded: its constructor ran"
    assert_real_kernel(lib)
    assert len(compiles) == 1  # built afresh instead
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and planted.name in r.getMessage()]
    assert len(refusals) == 1 and "owned by uid 12345, not by you (uid 0)" in refusals[0]
    assert planted.exists()  # not ours to delete


def test_a_library_whose_bytes_differ_from_its_digest_is_rebuilt(tmp_path, monkeypatch, planted_bytes, compiles):
    monkeypatch.setenv("ACTSCOPE_CACHE", str(tmp_path / "cache"))
    assert_real_kernel(request_kernel())
    [cached] = (tmp_path / "cache" / "kernels").iterdir()
    # Swap in other bytes under the same name (a new file: the loaded one stays mapped intact).
    swap = cached.with_name("swap")
    swap.write_bytes(planted_bytes)
    swap.chmod(0o700)
    os.replace(swap, cached)
    lib = request_kernel()
    assert not (tmp_path / "marker").exists(), "a library that does not match its digest was loaded"
    assert_real_kernel(lib)
    assert len(compiles) == 2  # rebuilt
    [rebuilt] = (tmp_path / "cache" / "kernels").iterdir()
    assert rebuilt.name == kernel_name(rebuilt.read_bytes())


@pytest.mark.parametrize("layout", ["cache is a file", "kernels is a file"])
def test_a_cache_path_that_is_not_a_directory_falls_back_with_one_message(tmp_path, monkeypatch, caplog, layout):
    root = tmp_path / "cache"
    if layout == "cache is a file":
        root.write_text("not a directory")
    else:
        root.mkdir()
        (root / "kernels").write_text("not a directory")
    monkeypatch.setenv("ACTSCOPE_CACHE", str(root))
    with caplog.at_level(logging.INFO, logger="actscope"):
        assert_real_kernel(request_kernel())
        assert_real_kernel(request_kernel())
    [message] = cache_warnings(caplog)
    assert str(root / "kernels") in message and "Not a directory" in message
    assert "set ACTSCOPE_CACHE to a directory only you can write" in message


def test_the_stats_and_sparse_kernels_survive_a_cache_path_that_is_a_file(tmp_path, monkeypatch, caplog):
    """The callers get a working kernel and one warning, not an internal error."""
    from actscope.stats import fused

    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("ACTSCOPE_CACHE", str(tmp_path / "file"))
    kernels.library.cache_clear()
    fused.library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="actscope"):
            assert kernels.library() is not None and fused.library() is not None
        x, w, index = torch.randn(2, 8), torch.randn(4, 8), torch.tensor([3, 1])
        assert torch.allclose(kernels.dot_rows(x, w, index), x @ w[index].T, rtol=1e-5, atol=1e-6)
        assert len(cache_warnings(caplog)) == 1
    finally:
        kernels.library.cache_clear()
        fused.library.cache_clear()


def test_a_full_disk_keeps_the_kernel_and_says_so_once(tmp_path, monkeypatch, caplog):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setenv("ACTSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "write_atomically", no_space)
    with caplog.at_level(logging.INFO, logger="actscope"):
        assert_real_kernel(request_kernel())
        assert_real_kernel(request_kernel())
    [message] = cache_warnings(caplog)
    assert str(tmp_path / "cache" / "kernels") in message and "No space left on device" in message
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []


def test_a_private_cache_is_reused_without_compiling(tmp_path, monkeypatch, caplog, compiles):
    monkeypatch.setenv("ACTSCOPE_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="actscope"):
        assert_real_kernel(request_kernel())
        [cached] = (tmp_path / "cache" / "kernels").iterdir()
        stamp = cached.stat().st_mtime_ns
        assert_real_kernel(request_kernel())
    assert len(compiles) == 1  # the second request loaded the cached build
    assert cached.stat().st_mtime_ns == stamp
    assert cached.name == kernel_name(cached.read_bytes())
    assert stat.S_IMODE((tmp_path / "cache" / "kernels").stat().st_mode) == 0o700
    assert stat.S_IMODE(cached.stat().st_mode) & 0o022 == 0
    assert cache_warnings(caplog) == []
