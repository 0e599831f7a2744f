"""CLIP's own BPE vocabulary (49408 tokens) for the built-in random-weight models.

The merges come from the data file that the ``open-clip-torch`` wheel ships (``open_clip/bpe_simple_vocab_16e6.txt.gz``,
OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz``); the vocabulary is assembled as CLIP's ``SimpleTokenizer`` assembles it
(openai/CLIP ``clip/simple_tokenizer.py``) and written as the vocab.json + merges.txt that transformers' ``CLIPTokenizer``
reads, so a built-in model folder tokenizes prompts exactly as a real SD 1.x folder does. ``open_clip`` itself is never
imported (it imports torch and torchvision): the file is found through the package metadata.
"""
from __future__ import annotations

import gzip
import json
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from sdfast.errors import ExportError

OPEN_CLIP_DISTRIBUTION = "open_clip_torch"
BPE_DATA_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
INSTALL_COMMAND = "pip install --no-deps open-clip-torch==3.3.0"  # --no-deps: its dependencies pull torchvision and timm
MERGE_COUNT = 49152 - 256 - 2  # CLIP keeps the file's first 48894 merges
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")  # the names transformers' CLIP files use, last in the vocabulary
CLIP_VOCAB_SIZE = 2 * 256 + MERGE_COUNT + len(SPECIAL_TOKENS)  # 49408


def bpe_data_path() -> Path:
    """The path of CLIP's BPE merges file inside the installed open-clip-torch wheel."""
    try:
        wheel = distribution(OPEN_CLIP_DISTRIBUTION)
    except PackageNotFoundError:
        raise ExportError(f"the built-in models use CLIP's vocabulary from open-clip-torch, which is not installed: {INSTALL_COMMAND}") from None
    path = Path(wheel.locate_file(BPE_DATA_FILE))
    if not path.is_file():
        raise ExportError(f"open-clip-torch {wheel.version} has no {BPE_DATA_FILE}; reinstall it: {INSTALL_COMMAND}")
    return path


def read_merges(path: Path) -> list[tuple[str, str]]:
    """The merges CLIP uses: lines 2 to 48895 of the file (the first line is a version header)."""
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise ExportError(f"cannot read CLIP's BPE merges from {path}: {error}; reinstall: {INSTALL_COMMAND}") from None
    merges = [tuple(line.split()) for line in lines[1:MERGE_COUNT + 1]]
    if len(merges) != MERGE_COUNT or any(len(merge) != 2 for merge in merges):
        raise ExportError(f"{path} does not hold CLIP's {MERGE_COUNT} BPE merges; reinstall: {INSTALL_COMMAND}")
    return merges


def build_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges (as merges.txt lines), in ``SimpleTokenizer.__init__``'s order.

    256 byte symbols (in ``bytes_to_unicode`` order, printable bytes first), the same with ``</w>``, one token per merge,
    then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte table, which CLIP's BPE also uses

    merges = read_merges(bpe_data_path())
    alphabet = list(bytes_to_unicode().values())
    symbols = [*alphabet, *(symbol + "</w>" for symbol in alphabet), *("".join(merge) for merge in merges), *SPECIAL_TOKENS]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ExportError(f"CLIP's vocabulary came out with {len(vocab)} distinct tokens, not {CLIP_VOCAB_SIZE}")
    return vocab, [" ".join(merge) for merge in merges]


def write_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt (the files of transformers' CLIP tokenizers) and return their paths."""
    vocab, merges = build_vocab_and_merges()
    directory.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as T5's SentencePiece vocabulary has them


def t5_tokenizer(vocab_size: int):
    """A T5-style tokenizer (Unigram over "▁"-prefixed words, "</s>" appended, "<pad>" = 0) for the built-in SD3 models
    with T5, whose own 32k SentencePiece vocabulary is not at hand: CLIP's whole-word tokens (the ``</w>`` ones, in
    merge order) as its pieces, plus the printable ASCII characters so that every prompt tokenizes. Random T5 weights
    give noise whatever the vocabulary; what matters is that ids, "</s>", padding and truncation behave as T5's do.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab, _ = build_vocab_and_merges()
    characters = [chr(c) for c in range(33, 127)]
    words = [token[: -len("</w>")] for token in vocab if token.endswith("</w>") and token[:-4].isascii() and token[:-4].isalnum()]
    room = vocab_size - len(T5_SPECIAL) - 2 * len(characters)
    pieces = [(token, 0.0) for token in T5_SPECIAL]
    pieces += [("\u2581" + c, -5.0) for c in characters] + [(c, -6.0) for c in characters]  # the fallbacks: always a parse
    pieces += [("\u2581" + word, -1.0 - index / room) for index, word in enumerate(dict.fromkeys(words)) if index < room]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" +", " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
