"""A small, deterministic CLIP-style BPE vocabulary for the built-in random-weight models.

Real model folders bring their own tokenizer; this one only has to be a valid CLIP tokenizer
(byte-level alphabet, ``</w>`` word ends, ``<|startoftext|>`` and ``<|endoftext|>`` last, as in CLIP).
"""
from __future__ import annotations

import json
from pathlib import Path

# Words that get whole-word tokens; anything else is still encodable, byte by byte.
_WORDS = """
a an the of on in at with and or by for to from under over near behind beside into
photo photograph portrait painting oil watercolor sketch drawing render illustration digital art artwork
red orange yellow green blue purple pink black white gray grey brown golden silver
apple table chair cat dog horse astronaut man woman girl boy child old young person people face eyes hair
city street house castle mountain mountains river lake sea ocean beach forest tree trees flower flowers garden
sky sun moon stars night day sunset sunrise cloud clouds rain snow fog light shadow
car ship boat train robot dragon bird fish lion tiger wolf bear fox owl
riding standing sitting walking flying running holding wearing looking
highly detailed intricate sharp focus cinematic lighting dramatic studio soft volumetric
beautiful cute epic fantasy futuristic ancient medieval modern vintage realistic photorealistic
8k 4k hd uhd masterpiece best quality high low resolution trending artstation concept
blurry blur noise noisy watermark text signature jpeg artifacts ugly deformed bad anatomy cropped
lowres worst duplicate extra fingers hands mutated disfigured out frame
style by greg rutkowski van gogh monet anime manga cartoon 3d octane unreal engine
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte-to-printable-character table, which CLIP's BPE also uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[str] = []
    for word in sorted(set(_WORDS)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merged = current + piece
            if merged not in vocab:
                merges.append(f"{current} {piece}")
                vocab[merged] = len(vocab)
            current = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt (CLIP's format) and return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path
