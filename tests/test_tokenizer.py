"""The lean runtime's tokenization equals transformers' CLIPTokenizer as diffusers calls it."""
import pytest

transformers = pytest.importorskip("transformers")

from sdfast.runtime.manifest import read_manifest
from sdfast.runtime.tokenizer import PromptTokenizer

PROMPTS = [
    "a red apple on a table",
    "",
    "Portrait of an OLD man, oil painting, highly detailed!!  8k   uhd",
    "ünïcödé and emoji 🍎 and tabs\tand\nnewlines",
    " ".join(["apple"] * 100),  # far beyond 77 tokens
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_transformers(tiny_engine, tiny_model, prompt):
    manifest = read_manifest(tiny_engine)
    info = manifest.tokenizer
    ours = PromptTokenizer(manifest.path(info["file"]), info["bos_id"], info["eos_id"], info["pad_id"], info["max_length"])
    reference = transformers.CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    expected = reference(prompt, padding="max_length", max_length=reference.model_max_length, truncation=True).input_ids
    assert ours.encode(prompt).ids.tolist() == expected


def test_truncation_counts_dropped_tokens(tiny_engine):
    manifest = read_manifest(tiny_engine)
    info = manifest.tokenizer
    tokenizer = PromptTokenizer(manifest.path(info["file"]), info["bos_id"], info["eos_id"], info["pad_id"], info["max_length"])
    encoded = tokenizer.encode(" ".join(["apple"] * 100))  # 'apple' is one token in the built-in vocabulary
    assert encoded.dropped_tokens == 100 - 75
    assert encoded.ids[-1] == info["eos_id"] and len(encoded.ids) == 77
