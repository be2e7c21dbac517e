"""Storage both caches share (the reference cache, the prepared data): crash-safe writes, per-writer temporary
names, a lock per folder. A reader sees the old file or the new one, never half of one; a killed writer's
temporary file is recognised and removed, a live writer's never.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .errors import DpoLeanError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` crash-safe (:func:`write_whole`), creating parent directories."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DpoLeanError(f"cannot write {path}: {e.strerror or e}; check that the directory can be created") from None
    write_whole(path, lambda tmp: tmp.write_bytes(data), "", "check free space and that the directory is writable")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating parent directories."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


# ---------------------------------------------------------------- one folder, several writers


@contextmanager
def locked(directory: Path, what: str, fix: str, lock_file: str = ".lock"):
    """An exclusive lock on ``directory`` (its ``lock_file``) between processes (torchrun ranks, shards, a sweep's
    runs): one checks or updates it at a time. The folder is created; if it cannot be, a one-line error naming
    ``what`` and the ``fix``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / lock_file, "a+")
    except OSError as e:
        raise DpoLeanError(f"cannot create {what} {directory}: {e.strerror or e}; {fix}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def hold(path: Path):
    """Open ``path`` with a shared lock, held while the returned handle is open (at the latest until the process
    ends, when the kernel drops it): a sign to :func:`remove_unless_held` that a live process still reads it."""
    handle = open(path, "rb")
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle


def remove_unless_held(path: Path, *with_it: Path) -> bool:
    """Remove ``path``, then ``with_it``, unless a live process holds ``path`` (:func:`hold`); True if they are gone.
    Call it under the folder's lock, which readers hold while they open and hold a file."""
    try:
        with open(path, "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            path.unlink()
    except FileNotFoundError:
        pass
    for p in with_it:
        p.unlink(missing_ok=True)
    return True


_TEMP = re.compile(r"\.(?P<final>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.tmp")


def host() -> str:
    """This machine's name as it appears in temporary file names."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def temporary_path(final: Path) -> Path:
    """Where this process writes ``final`` before renaming it: ``.<name>.<host>.<pid>.tmp`` beside it, a name no
    other writer shares."""
    return final.parent / f".{final.name}.{host()}.{os.getpid()}.tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def remove_stale_temporaries(directory: Path) -> None:
    """Remove temporary files left by writers of this host that are gone (killed mid-write). Another live
    process's file, and any other host's, is left alone: that writer may be in the middle of it."""
    for tmp in Path(directory).glob(".*.tmp"):
        m = _TEMP.fullmatch(tmp.name)
        if m and m["host"] == host() and (int(m["pid"]) == os.getpid() or not _alive(int(m["pid"]))):
            tmp.unlink(missing_ok=True)


def write_whole(final: Path, write: Callable[[Path], None], what: str, fix: str = "") -> Path:
    """``write(tmp)`` under this process's temporary name, fsync, then rename to ``final``: the file exists whole
    or not at all (every crash-safe write of the project goes through here). An OSError becomes a one-line error
    naming ``what`` (may be empty) and the ``fix``."""
    tmp = temporary_path(final)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as e:
        reason = str(e.strerror or e).replace("\n", " ")
        raise DpoLeanError(f"cannot write {what + ' ' if what else ''}{final}: {reason}" + (f"; {fix}" if fix else "")) from None
    finally:
        tmp.unlink(missing_ok=True)
    return final
