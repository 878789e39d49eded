"""Output paths, checked before anything heavy starts, and run directories that two runs never share."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from rtloop.errors import InputError


def check_writable(path: Path, option: str, directory: bool = False) -> None:
    """One line unless `path` (a file, or with directory=True a directory) can be created and written. Tries
    a real write in the nearest existing directory (permission bits do not stop root; a read-only or full
    filesystem does) and creates nothing that stays."""
    path = Path(path)
    if path.exists() and (path.is_dir() != directory):
        raise InputError(f"{option} {path}: is {'not ' if directory else ''}a directory")
    if path.exists() and not directory:
        try:
            with path.open("a"):
                pass
        except OSError as e:
            raise InputError(f"{option} {path}: cannot write: {e.strerror or e}") from None
        return
    parent = path if directory and path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{option} {path}: {parent} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".rtloop-write-check-"):
            pass
    except OSError as e:
        raise InputError(f"{option} {path}: cannot write in {parent}: {e.strerror or e}") from None


def new_run_dir(root: Path = Path("runs")) -> Path:
    """runs/<timestamp>/, created here and exclusively: a second run in the same second gets -2, -3, ..."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise InputError(f"{root}: 999 runs started in the second {stamp}; pass --trace")
