"""Files written into an export's staging dir: hashed for the manifest, and the tokenizers the lean runtime reads."""
from __future__ import annotations

import shutil
from pathlib import Path

from sdfast.errors import ExportError
from sdfast.runtime.manifest import sha256_file


def hashed(root: Path, paths: list[Path]) -> dict[str, dict]:
    """The manifest's file entries: path relative to ``root`` -> sha256 and size."""
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths}


def copy_tokenizer(tokenizer, source: Path, staging: Path, folder: str, text_length: int, t5: bool = False) -> dict:
    """A tokenizer.json for the lean runtime in ``staging/folder`` (converted by transformers if ``source`` has only
    vocab and merges), the original files beside it; returns the manifest's tokenizer entry. ``t5``: SD3's T5
    tokenizer, which has no BOS token."""
    target = staging / folder
    tokenizer.save_pretrained(target)
    for name in ("vocab.json", "merges.txt"):
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    special = {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    if not (target / "tokenizer.json").is_file():
        raise ExportError(f"could not produce tokenizer.json from {source}")
    missing = [key for key, value in special.items() if value is None and not (t5 and key == "bos_id")]
    if missing:
        raise ExportError(f"the tokenizer in {source} defines no {', '.join(missing)} token")
    return {
        "file": f"{folder}/tokenizer.json",
        "files": hashed(staging, sorted(p for p in target.iterdir() if p.is_file())),
        **{key: None if value is None else int(value) for key, value in special.items()},
        "max_length": text_length,
        **({"kind": "t5"} if t5 else {}),
    }
