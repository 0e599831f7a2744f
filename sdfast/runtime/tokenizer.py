"""CLIP prompt tokenization with the tokenizers library, padded and truncated as diffusers does it.

The text normalization (NFC, whitespace runs to one space, lowercase) and the BPE are those of the engine's
tokenizer.json, which the exporter saves from transformers' CLIPTokenizer (tokenizers-backed in transformers 5: no
ftfy, no HTML unescaping), so the ids equal diffusers' (tests/test_tokenizer.py checks them on CLIP's real vocabulary).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdfast.errors import EngineError


@dataclass(frozen=True)
class EncodedPrompt:
    ids: np.ndarray  # [max_length] int64: BOS (not T5's), the tokens that fit, EOS, padding
    dropped_tokens: int  # tokens cut by truncation (0 when the prompt fits)


class PromptTokenizer:
    """tokenizer.json plus the special ids and length recorded in the manifest."""

    def __init__(self, path: Path, bos_id: int | None, eos_id: int, pad_id: int, max_length: int):
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # noqa: BLE001 - tokenizers raises plain Exceptions
            raise EngineError(f"cannot read tokenizer '{path}': {str(error).splitlines()[0]}") from None
        self._tokenizer.no_padding()  # sdfast pads and truncates itself, as diffusers asks transformers to
        self._tokenizer.no_truncation()
        self.path = Path(path)
        self.bos_id, self.eos_id, self.pad_id, self.max_length = bos_id, eos_id, pad_id, max_length

    def encode(self, prompt: str) -> EncodedPrompt:
        """[BOS], the tokens that fit, EOS, padding: CLIP's layout, or T5's (no BOS: ``bos_id`` None)."""
        tokens = self._tokenizer.encode(prompt, add_special_tokens=False).ids
        start = [] if self.bos_id is None else [self.bos_id]
        room = self.max_length - 1 - len(start)
        dropped = max(0, len(tokens) - room)
        ids = [*start, *tokens[:room], self.eos_id]
        ids += [self.pad_id] * (self.max_length - len(ids))
        return EncodedPrompt(ids=np.asarray(ids, dtype=np.int64), dropped_tokens=dropped)

    def tokens(self, text: str) -> list[int]:
        """The token ids of ``text``: no BOS/EOS, no padding, no truncation (as ``encode`` tokenizes before it wraps)."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def token_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (e.g. ``",</w>"``), or None when the vocabulary lacks it."""
        return self._tokenizer.token_to_id(token)
