"""Files already verified: a file's sha256 is remembered with its stat stamp, so an unchanged file is not hashed again.

The stamp is (device, inode, size, mtime_ns, ctime_ns): any write or replacement changes the ctime, which no user can set.
As git's index does for "racily clean" files, a record is trusted only when the file's ctime is well before the moment it
was hashed, so a write in the same clock tick as the hash is never missed. The records live in
``$SDFAST_CACHE/verified-files.json``; a cache that cannot be read or written is simply not used. Silent corruption on
disk keeps the stamp: ``sdfast info --verify`` hashes every file again.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

RACY_NS = 2_000_000_000  # a file changed less than this before its hash was taken is hashed again next time
MAX_RECORDS = 4096


def cache_path() -> Path:
    return Path(os.environ.get("SDFAST_CACHE", Path.home() / ".cache" / "sdfast")) / "verified-files.json"


def _stamp(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


class VerifiedFiles:
    """sha256 by resolved path, valid while the file's stamp is unchanged."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_path()
        self.records: dict[str, dict] = {}
        self.changed = False
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
            self.records = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            pass

    def known(self, path: Path, stat: os.stat_result) -> str | None:
        """The remembered sha256 of ``path`` when its stamp is the one it was hashed with, and not racy; else None."""
        record = self.records.get(str(path.resolve()))
        if not isinstance(record, dict) or record.get("stamp") != _stamp(stat):
            return None
        if stat.st_ctime_ns > int(record.get("hashed_ns", 0)) - RACY_NS:
            return None
        return record.get("sha256")

    def remember(self, path: Path, stat: os.stat_result, sha256: str) -> None:
        self.records[str(path.resolve())] = {"stamp": _stamp(stat), "sha256": sha256, "hashed_ns": time.time_ns()}
        self.changed = True

    def save(self) -> None:
        """Write the records atomically (the newest MAX_RECORDS); an unwritable cache is left as it is."""
        if not self.changed:
            return
        newest = sorted(self.records.items(), key=lambda item: item[1].get("hashed_ns", 0))[-MAX_RECORDS:]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            partial.write_text(json.dumps(dict(newest)), encoding="utf-8")
            os.replace(partial, self.path)
        except OSError:
            pass
