"""C kernels compiled on first use: the one place that finds a compiler, builds a package's
``.c`` file, caches it in ``$ACTSCOPE_CACHE/kernels`` and loads it with ctypes. Entry point:
:func:`compiled_library`; callers fall back to plain PyTorch when it returns None.

Kernels are plain C with no Python or torch headers, so they build in about a second with the
system's compiler. Builds use ``-march=native``, so the cached library's name carries a key of the
source, compiler, flags and the CPU's feature flags (a cache shared between machines never loads a
build for another instruction set), then the SHA-256 of the library's own bytes:
``<stem>-<key>-<sha256>.so``.

Loading a library runs its code (its constructors run inside ``dlopen``), so a cached library is
only as trustworthy as the directory it sits in. On POSIX, one is loaded only when

* the kernels directory, as opened (one descriptor, through which everything after is done, so
  renaming a path after the check cannot swap in another directory), is owned by this user and
  writable by no group or other user: then no one else (root aside) can add, rename or replace
  files in it. actscope creates it with mode 0700;
* the file, opened through that descriptor without following a link, is a regular file owned by
  this user and writable by no one else: then no one else can change its bytes;
* its SHA-256 equals the digest in its name. The digest sits in the name rather than in a sidecar
  file so that one ``os.replace`` publishes name and bytes together: there is never a library with
  a stale or missing record. It catches a torn or altered file; it is no signature (whoever can
  write the directory can name a file after its own digest), which is why the two checks above
  come first;
* and ``dlopen`` is given ``/proc/self/fd/N``, the descriptor that was checked and hashed, so the
  file loaded is the file checked. Without ``/proc`` (macOS, BSD) the path is loaded right after
  the checks: a short window that only someone who can write a parent of the cache could use.

The library is hashed once per process per kernel (the callers keep what this returns).

Every build happens in a fresh private directory (``tempfile.mkdtemp``: 0700, ours); a trusted
cache then receives a copy through a temporary sibling and ``os.replace``, so a half-written
library is never seen under its name. When the cache cannot be trusted (owned by someone else,
writable by group or others) or used (not a directory, permission denied, read-only file system,
disk full), nothing is read from or written to it: the private build is loaded and the cache is
left alone, with one warning per process that names the directory, the reason and the fix. That
keeps the fast kernels, safely, at the price of about a second of compiling per kernel per
process; the torch path is left for when no compiler works at all.

Without ``os.getuid`` or descriptor-relative calls (Windows) there are no owners to compare: the
owner and mode checks are skipped and libraries are found and loaded by path, as before; only the
digest is checked.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("actscope")

# Owners to compare and descriptor-relative calls to use them safely (False on Windows).
_POSIX = (hasattr(os, "getuid") and hasattr(os, "O_DIRECTORY") and os.listdir in os.supports_fd
          and {os.open, os.rename, os.unlink} <= os.supports_dir_fd)
# No link is followed to a library: a symlink in the cache is refused, not traced elsewhere.
_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_warned: set[str] = set()  # cache directories already warned about in this process
_held: list[int] = []  # descriptors of loaded libraries, open for the process's life: see load()
FIX = "set ACTSCOPE_CACHE to a directory only you can write"


def compiled_library(package: str, source_name: str, stem: str, flag_sets: Sequence[Sequence[str]], fallback: str) -> Any:
    """``package``'s ``source_name`` built (first flag set that compiles) and loaded, or None.

    ``stem`` names the cached library; ``fallback`` says what the caller does without it (for
    the log line). Never raises for a cache that cannot be used: see the module docstring.
    """
    source = resources.files(package).joinpath(source_name).read_bytes()
    compiler = find_compiler()
    if compiler is None:
        log.info("actscope: no C compiler found; %s", fallback)
        return None
    key = b"\0".join([source, compiler.encode(), repr(list(map(list, flag_sets))).encode(), cpu_flags()])
    prefix = f"{stem}-{hashlib.sha256(key).hexdigest()[:16]}-"
    cache = open_cache()
    try:
        found = find_cached(cache, prefix) if cache is not None else None
        if found is not None:
            return load(found, fallback)
        return fresh_library(compiler, source_name, source, prefix, flag_sets, cache, fallback)
    finally:
        if cache is not None:
            cache.close()


def find_compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def cache_dir() -> Path:
    return Path(os.environ.get("ACTSCOPE_CACHE", "~/.cache/actscope")).expanduser() / "kernels"


def cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as info:
            return next((line for line in info if line.startswith(b"flags")), b"")
    except OSError:
        return b""


# ---- directories that are checked once and then used through their descriptor -------------

@dataclass
class Directory:
    """A directory opened once; ``fd`` is None where descriptor-relative calls are missing."""

    path: Path
    fd: int | None

    @classmethod
    def open(cls, path: Path) -> Directory:
        if not _POSIX:
            if not path.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
            return cls(path, None)
        return cls(path, os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def distrust(self) -> str | None:
        return distrust(os.fstat(self.fd) if self.fd is not None else self.path.stat())

    def names(self) -> list[str]:
        return sorted(os.listdir(self.fd if self.fd is not None else self.path))

    def open_file(self, name: str, flags: int = os.O_RDONLY, mode: int = 0o700) -> int:
        if self.fd is None:
            return os.open(self.path / name, flags | _OPEN_FLAGS, mode)
        return os.open(name, flags | _OPEN_FLAGS, mode, dir_fd=self.fd)

    def replace(self, old: str, new: str) -> None:
        if self.fd is None:
            os.replace(self.path / old, self.path / new)
        else:
            os.replace(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def unlink(self, name: str) -> None:
        if self.fd is None:
            (self.path / name).unlink()
        else:
            os.unlink(name, dir_fd=self.fd)


def distrust(status: os.stat_result) -> str | None:
    """Why someone other than this user could change what ``status`` describes; None if no one can."""
    if not hasattr(os, "getuid"):
        return None  # no owners to compare (Windows): the old behaviour, as the module docstring says
    if status.st_uid != os.getuid():
        return f"it is owned by uid {status.st_uid}, not by you (uid {os.getuid()})"
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by group or others (mode {oct(stat.S_IMODE(status.st_mode))})"
    return None


def open_cache() -> Directory | None:
    """The kernels directory (created 0700), opened and trusted; None, said once, otherwise."""
    path = cache_dir()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass  # an existing one (or a file in the way) is judged as it is opened
    except OSError as error:
        warn_once(path, f"it cannot be created ({error.strerror or error})")
        return None
    try:
        directory = Directory.open(path)
        problem = directory.distrust()
    except OSError as error:
        warn_once(path, f"it cannot be used ({error.strerror or error})")
        return None
    if problem is not None:
        directory.close()
        warn_once(path, problem, f"run chmod go-w {path}, or {FIX}" if "writable" in problem else FIX)
        return None
    return directory


def warn_once(path: Path, reason: str, fix: str = FIX) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        log.warning(
            "actscope: not using the kernel cache %s: %s. Compiled kernels are built in a private "
            "temporary directory for each process instead (about a second each); to keep them between "
            "runs, %s.", path, reason, fix,
        )


# ---- find, check and load ------------------------------------------------------------------

def find_cached(cache: Directory, prefix: str) -> tuple[int, Path] | None:
    """The first library in ``cache`` named ``<prefix><sha256>.so`` that passes every check."""
    try:
        names = cache.names()
    except OSError as error:
        warn_once(cache.path, f"it cannot be listed ({error.strerror or error})")
        return None
    for name in names:
        if name.startswith(prefix) and name.endswith(".so"):
            found = open_verified(cache, name)
            if found is not None:
                return found
    return None


def open_verified(directory: Directory, name: str) -> tuple[int, Path] | None:
    """An open descriptor of ``name`` (and its path) if it is ours, writable by no one else, and
    hashes to the digest its name ends with; None, with the reason logged, otherwise."""
    try:
        fd = directory.open_file(name)
    except OSError as error:
        refuse(directory, name, f"it cannot be opened ({error.strerror or error})")
        return None
    try:
        status = os.fstat(fd)
        problem = distrust(status) if stat.S_ISREG(status.st_mode) else "it is not a regular file"
        if problem is None and file_digest(fd) != name[name.rfind("-") + 1:-len(".so")]:
            problem = "its bytes do not match the SHA-256 digest in its name"
    except OSError as error:
        problem = f"it cannot be read ({error.strerror or error})"
    if problem is None:
        return fd, directory.path / name
    os.close(fd)
    refuse(directory, name, problem)
    return None


def refuse(directory: Directory, name: str, problem: str) -> None:
    action = "skipped it"
    if problem.startswith("its bytes"):  # ours (distrust passed) and torn or altered: clear it away
        try:
            directory.unlink(name)
            action = "removed it"
        except OSError:
            pass
    log.warning("actscope: not loading %s: %s; %s (a verified build is used instead).", directory.path / name, problem, action)


def file_digest(fd: int) -> str:
    digest = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def load(found: tuple[int, Path], fallback: str) -> Any:
    fd, path = found
    # /proc/self/fd/N is the very file that was checked and hashed through fd.
    proc = f"/proc/self/fd/{fd}"
    try:
        lib = ctypes.CDLL(proc if os.path.exists(proc) else str(path))
    except OSError as error:
        os.close(fd)
        log.info("actscope: %s does not load (%s); %s", path.name, error, fallback)
        return None
    # glibc's dlopen hands back an already-loaded library whose name matches, so fd stays open for
    # the process's life: no other library can later be opened as the same /proc/self/fd/N.
    _held.append(fd)
    return lib


# ---- build ---------------------------------------------------------------------------------

def fresh_library(compiler: str, source_name: str, source: bytes, prefix: str, flag_sets: Sequence[Sequence[str]],
                  cache: Directory | None, fallback: str) -> Any:
    """Build privately, copy into ``cache`` if there is one, and load (from the cache when the copy
    landed: a private directory may sit on a noexec mount)."""
    try:
        with tempfile.TemporaryDirectory(prefix="actscope-kernel-", ignore_cleanup_errors=True) as tmp:
            private = Directory.open(Path(tmp))
            try:
                name = build(compiler, source_name, source, prefix, flag_sets, private)
                if name is None:
                    log.info("actscope: could not compile %s; %s", source_name, fallback)
                    return None
                published = cache is not None and publish(cache, name, private)
                found = (published and open_verified(cache, name)) or open_verified(private, name)
                return load(found, fallback) if found else None
            finally:
                private.close()
    except OSError as error:
        log.info("actscope: could not build %s (%s); %s", source_name, error, fallback)
        return None


def build(compiler: str, source_name: str, source: bytes, prefix: str, flag_sets: Sequence[Sequence[str]],
          private: Directory) -> str | None:
    """Compile in ``private`` with the first flag set that works; the library's name there, or None."""
    problem = private.distrust()
    if problem is not None:  # mkdtemp makes it ours and 0700, unless $TMPDIR's owner swapped it
        raise PermissionError(f"the private build directory {private.path}: {problem}")
    (private.path / source_name).write_bytes(source)
    for flags in flag_sets:
        # Relative names, run inside the directory: the bytes then do not depend on its random
        # name, so one source gives one library and one digest.
        command = [compiler, *flags, "-fPIC", "-shared", "-o", "kernel.so", source_name, "-lm"]
        if subprocess.run(command, capture_output=True, cwd=private.path).returncode == 0:
            # Read through the descriptor: what was checked above is what is named and published.
            fd = private.open_file("kernel.so")
            try:
                name = f"{prefix}{file_digest(fd)}.so"
            finally:
                os.close(fd)
            private.replace("kernel.so", name)
            return name
    return None


def publish(cache: Directory, name: str, private: Directory) -> bool:
    """Copy a private build into the trusted cache; False, said once, when the cache cannot take it."""
    fd = private.open_file(name)
    try:
        data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
    finally:
        os.close(fd)
    try:
        write_atomically(cache, name, data)
    except OSError as error:
        warn_once(cache.path, f"it cannot be written ({error.strerror or error})")
        return False
    return True


def write_atomically(directory: Directory, name: str, data: bytes) -> None:
    """Write through a temporary sibling and rename into place: a half-written library is never
    seen under its name (and a torn one would fail its digest)."""
    temporary = f".{name}.{os.urandom(6).hex()}.tmp"  # starts with a dot: never taken for a library
    fd = directory.open_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        directory.replace(temporary, name)
    except BaseException:
        try:
            directory.unlink(temporary)
        except OSError:
            pass
        raise
