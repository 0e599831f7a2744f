"""A cached folder built once, however many processes ask for it at the same time (parallel tests, two exports)."""
from __future__ import annotations

import fcntl
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive file lock beside ``folder`` (``.<name>.lock``), held for the block: one process at a time makes it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def built_once(folder: Path, is_current: Callable[[], bool], build: Callable[[Path], None]) -> Path:
    """``folder``, built by ``build(staging)`` into a staging folder renamed into place, unless ``is_current()``.

    Under a file lock beside it: one process builds, the others wait and then find it current; a reader never sees a
    half-built folder, and no process removes a folder another has just put in place."""
    if is_current():
        return folder
    with folder_lock(folder):
        if is_current():
            return folder
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            build(staging)  # writes its 'done' marker last
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return folder
