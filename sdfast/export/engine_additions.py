"""Components added to an existing engine dir (a ControlNet, the int8 U-Nets): their files moved in beside the base's
and manifest.json rewritten once, atomically."""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path


def add_to_engine(manifest, entries: dict[str, dict], staging: Path) -> None:
    """Move components' files (a ControlNet's, the int8 U-Nets') beside the base's, then rewrite manifest.json atomically
    (a temporary file, a rename): all of ``entries`` (name -> manifest entry; None removes that component) change at
    once, or none."""
    from sdfast.runtime.files import shared_mode
    from sdfast.runtime.manifest import MANIFEST_NAME

    files = {}
    for entry in filter(None, entries.values()):
        files.update(entry["files"])
        for variant in entry.get("variants", {}).values():
            files.update(variant["files"])
    with open(manifest.root / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two exports into one engine dir: each reads the manifest the other wrote
        data = json.loads((manifest.root / MANIFEST_NAME).read_text(encoding="utf-8"))
        old = [data["components"][key] for key in entries if key in data["components"]]
        for relative in files:
            os.chmod(staging / relative, shared_mode())
            os.replace(staging / relative, manifest.root / relative)
        for key, entry in entries.items():
            if entry is None:
                data["components"].pop(key, None)
            else:
                data["components"][key] = entry
        handle, temporary = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=manifest.root)
        try:
            with os.fdopen(handle, "w") as file:
                file.write(json.dumps(data, indent=2) + "\n")
            os.chmod(temporary, shared_mode())
            os.replace(temporary, manifest.root / MANIFEST_NAME)
        except BaseException:
            for relative in files:  # the manifest still lists the old files: the new ones go
                (manifest.root / relative).unlink(missing_ok=True)
            raise
        finally:
            Path(temporary).unlink(missing_ok=True)
    for entry in old:  # the replaced components' files, now listed nowhere
        stale = set(entry["files"]) | {f for variant in entry.get("variants", {}).values() for f in variant["files"]}
        for relative in stale - set(files):
            manifest.path(relative).unlink(missing_ok=True)
