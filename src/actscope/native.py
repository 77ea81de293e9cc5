"""C kernels compiled on first use: the one place that finds a compiler, builds a package's
``.c`` file into ``$ACTSCOPE_CACHE/kernels`` atomically and loads it with ctypes.

Kernels are plain C with no Python or torch headers, so they build in about a second with the
system's compiler. Builds use ``-march=native``, so the cached library's name carries the source,
compiler, flags and the CPU's feature flags: a cache shared between machines never loads a build
for another instruction set. Callers fall back to plain PyTorch when this returns None.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("actscope")


def compiled_library(package: str, source_name: str, stem: str, flag_sets: Sequence[Sequence[str]], fallback: str) -> Any:
    """``package``'s ``source_name`` built (first flag set that compiles) and loaded, or None.

    ``stem`` names the cached library; ``fallback`` says what the caller does without it (for
    the log line).
    """
    source = resources.files(package).joinpath(source_name).read_bytes()
    compiler = find_compiler()
    if compiler is None:
        log.info("actscope: no C compiler found; %s", fallback)
        return None
    key = b"\0".join([source, compiler.encode(), repr(list(map(list, flag_sets))).encode(), cpu_flags()])
    target = cache_dir() / f"{stem}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if not target.exists() and not build(compiler, source_name, source, target, flag_sets):
        log.info("actscope: could not compile %s; %s", source_name, fallback)
        return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as error:
        log.info("actscope: %s does not load (%s); %s", target.name, error, fallback)
        return None


def find_compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def cache_dir() -> Path:
    root = Path(os.environ.get("ACTSCOPE_CACHE", "~/.cache/actscope")).expanduser()
    path = root / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(compiler: str, source_name: str, source: bytes, target: Path, flag_sets: Sequence[Sequence[str]]) -> bool:
    """Compile into a temporary sibling and rename into place: a half-written library is never loaded."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / source_name
        src.write_bytes(source)
        out = Path(tmp) / target.name
        for flags in flag_sets:
            command = [compiler, *flags, "-fPIC", "-shared", "-o", str(out), str(src), "-lm"]
            if subprocess.run(command, capture_output=True).returncode == 0:
                os.replace(out, target)
                return True
    return False


def cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as info:
            return next((line for line in info if line.startswith(b"flags")), b"")
    except OSError:
        return b""
