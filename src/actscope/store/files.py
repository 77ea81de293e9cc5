"""Writing what actscope owns: atomically, with the user's permissions, leaving nothing behind.

Everything actscope writes (run directories, reports, calibrations, …) first goes into a hidden
sibling ``.NAME.tmp-<pid>-<host>-<random>`` and appears by one rename, so a reader sees the
old version, nothing, or the complete new one. The temporary's name says which process made it:
the next write of the same target removes those of processes that are gone (a ``kill -9``),
and any older than a day. Finished files and directories get the permissions the user's umask
gives a new file (``0o666 & ~umask``, directories ``0o777 & ~umask``), whatever the library that
wrote them chose (``mkdtemp`` makes ``0o700``, ``mkstemp`` ``0o600``).

A full disk is the user's to fix, not a bug: :func:`storage_error` turns it into an
:class:`~actscope.errors.InputError` that names the path, the free space and what was needed.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from actscope.errors import InputError, RunDirError

STALE_SECONDS = 24 * 3600
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# .NAME.tmp-<pid>-<host>-<random> (ours since this version) or .NAME.old-<random> (a replaced run)
_LEFTOVER = re.compile(r"\.(?:tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]+|tmp-.*|old-[0-9a-f]+)$")
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FULL_TEXTS = ("no space left on device", "disk quota exceeded")


class StorageFullError(InputError):
    """The file system ran out of space (or quota) while actscope wrote to it."""


def temp_name(target: Path) -> str:
    """The hidden temporary sibling's name for ``target`` (see the module docstring)."""
    return f".{target.name}.tmp-{os.getpid()}-{_HOST}-{secrets.token_hex(4)}"


def remove_leftovers(target: Path) -> None:
    """Remove the temporaries (and replaced runs) of earlier writes of ``target`` whose process is
    gone, and any a day old; leave those of live processes alone."""
    prefix = f".{target.name}."
    try:
        siblings = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    cutoff = time.time() - STALE_SECONDS
    for leftover in siblings:
        match = _LEFTOVER.fullmatch(leftover.name[len(target.name) + 1:])
        if match is None:
            continue
        try:
            dead = match["pid"] is not None and match["host"] == _HOST and not _alive(int(match["pid"]))
            if dead or leftover.lstat().st_mtime < cutoff:
                remove_path(leftover)
        except OSError:
            continue


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_path(path: Path) -> None:
    """Delete a file, link or directory tree; nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def user_umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(mask)
    return mask


def give_user_mode(root: Path) -> None:
    """chmod ``root`` (a file, or a directory and everything in it) to what the umask gives."""
    mask = user_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if root.is_dir():
        for folder, dirs, files in os.walk(root):
            for name in files:
                os.chmod(os.path.join(folder, name), file_mode)
            for name in dirs:
                os.chmod(os.path.join(folder, name), dir_mode)
        os.chmod(root, dir_mode)
    else:
        os.chmod(root, file_mode)


def check_writable(target: Path, what: str = "--out") -> None:
    """Refuse (exit 2) a target whose folder cannot be written, before any long work: the nearest
    existing folder must take a new entry (a read-only file system or a folder of someone else's
    fails here, not after an hour of profiling)."""
    folder = target if target.is_dir() else target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise RunDirError(f"cannot write {target}: {folder} is a file, not a folder; choose another {what}")
    try:
        probe = tempfile.mkdtemp(prefix=".actscope-probe-", dir=folder)
    except OSError as error:
        raise RunDirError(f"cannot write {target}: {folder} is not writable ({error.strerror or error}); "
                          f"choose another {what} or fix the folder's permissions") from None
    os.rmdir(probe)


@contextmanager
def atomic_file(target: Path, *, size_hint: int = 0, tidy: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``target``'s content to; on success it replaces
    ``target`` in one rename, with the user's permissions; on any failure it is removed.
    ``tidy=False`` skips listing the folder for earlier writes' leftovers (a caller writing many
    files into one folder clears them once, not once per file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if tidy:
        remove_leftovers(target)
    tmp = target.parent / temp_name(target)
    try:
        yield tmp
        _fsync(tmp)
        give_user_mode(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)
    except BaseException as error:
        remove_path(tmp)
        _reraise(error, target, size_hint)


@contextmanager
def atomic_directory(target: Path, *, size_hint: int = 0) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; on success it takes ``target``'s place (an
    existing ``target`` is renamed aside first and deleted last, so it is restored if the swap
    fails); on any failure the temporary is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = target.parent / temp_name(target)
    tmp.mkdir()
    try:
        yield tmp
        _fsync(tmp)
        give_user_mode(tmp)
        _swap_into_place(tmp, target)
    except BaseException as error:
        remove_path(tmp)
        _reraise(error, target, size_hint)


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
    else:
        old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync(target.parent)


def _reraise(error: BaseException, target: Path, size_hint: int) -> None:
    translated = storage_error(error, target, size_hint)
    if translated is error:
        raise error
    raise translated from None


def storage_error(error: BaseException, target: Path, size_hint: int = 0) -> BaseException:
    """``error`` as a :class:`StorageFullError` when the disk (or quota) was full, else itself."""
    if not isinstance(error, Exception) or isinstance(error, InputError) or not is_disk_full(error):
        return error
    try:
        free = shutil.disk_usage(_existing(target)).free
    except OSError:
        free = None
    room = f"{_size(free)} free there" if free is not None else "its free space is unknown"
    need = f", about {_size(size_hint)} needed" if size_hint else ""
    return StorageFullError(
        f"cannot write {target}: no space left on its file system ({room}{need}); nothing was written. "
        "Free some space or choose another --out on a disk with room"
    )


def is_disk_full(error: BaseException) -> bool:
    """An OS error for a full disk or quota, also as libraries report it (pyarrow raises
    OSError with the text only; torch's zip writer raises RuntimeError "unexpected pos")."""
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
        return True
    text = str(error).lower()
    return any(phrase in text for phrase in _FULL_TEXTS) or (isinstance(error, RuntimeError) and "unexpected pos" in text)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(count: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"  # pragma: no cover


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk; best effort where a platform
    cannot open directories (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
