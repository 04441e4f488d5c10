"""Writing files so that a crash, a full disk or a second process never leaves half of one."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file (or directory) beside ``path``, then
    rename it over ``path``: readers see the old one or the whole new one. When ``write``
    fails, the temporary one is removed, ``path`` is left as it was, and the error
    propagates.

    The new data is flushed to the disk before the rename: otherwise a power cut can leave
    the rename done but the data not, an empty file where the old one was. A directory
    replacing an existing one takes two renames (Linux has no portable atomic swap): the
    old one is moved aside to ``.NAME.old<pid>`` and removed only once the new one is in
    place, so a crash between the two leaves both, never half of either."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove_abandoned(path)
    try:
        write(tmp)
        _flush(tmp)
        if tmp.is_dir() and path.is_dir():
            _swap_folder(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only folder never got the file in the first place
        raise
    _flush_folder(path.parent)  # the rename itself
    return path


def _remove_abandoned(path: Path) -> None:
    """Remove the ``.NAME.tmp<pid>`` left by a writer that was killed (SIGKILL, power cut)
    before it could clean up (:func:`is_abandoned`): hidden, it would otherwise hold its
    disk space for ever, and a full fine-tune's folder is gigabytes. When a
    ``.NAME.old<pid>`` is there too, a folder swap died between its renames and the
    temporary may be the only whole copy, so both are left for a person to look at."""
    siblings = list(path.parent.glob(f".{path.name}.*"))
    if any(_pid_suffix(p, ".old") is not None for p in siblings):
        return
    for sibling in siblings:
        pid = _pid_suffix(sibling, ".tmp")
        if pid is None or not is_abandoned(sibling, pid):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            try:
                sibling.unlink()
            except OSError:
                pass


def _pid_suffix(sibling: Path, kind: str) -> int | None:
    head, _, pid = sibling.name.rpartition(kind)
    return int(pid) if head and pid.isdigit() else None


# A writer in another container on a shared cache has its own process numbers, so its pid
# may look dead from here: only what has not changed for this long is taken for abandoned
# (the longest write, a static int8 compile, takes about ten minutes).
ABANDONED_AFTER_S = 3600.0


def is_abandoned(path: Path, pid: int) -> bool:
    """Whether ``path``, a temporary that process ``pid`` was writing, was left behind: that
    process is gone and the file has not changed for :data:`ABANDONED_AFTER_S`."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        pass
    except OSError:
        return False  # it exists, owned by someone else
    try:
        return time.time() - path.lstat().st_mtime > ABANDONED_AFTER_S
    except OSError:
        return False  # gone already


def _swap_folder(new: Path, path: Path) -> None:
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    # One left by an earlier run killed after its swap; had it died between the renames,
    # ``path`` would not exist and we would not be here.
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _flush(path: Path) -> None:
    """fsync a file, or every file in a directory and the directory itself."""
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file() and not child.is_symlink():
                _fsync(child)
        _flush_folder(path)
    else:
        _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_folder(folder: Path) -> None:
    try:
        _fsync(folder)
    except OSError:
        pass  # some file systems cannot fsync a directory; the data itself is on disk
