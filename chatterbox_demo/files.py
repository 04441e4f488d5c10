"""Writing files so that a crash, a full disk or a second process never leaves half of one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file (or directory) beside ``path``, then
    rename it over ``path``: readers see the old one or the whole new one. When ``write``
    fails, the temporary one is removed, ``path`` is left as it was, and the error
    propagates."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
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
    return path
