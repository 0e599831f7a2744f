"""AUTOMATIC1111-style prompts for SD 1.x: emphasis syntax, prompts beyond 77 tokens, BREAK.

The behaviour of the A1111 web UI's ``modules/prompt_parser.py`` (``parse_prompt_attention``) and
``modules/sd_hijack_clip.py`` (``tokenize_line`` and the "Original" emphasis), re-implemented with
python and numpy only:

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.5)``
  multiplies it by 1.5; nesting multiplies. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal
  characters; a bracket left open is closed at the end of the prompt; a ``)`` or ``]`` that closes
  nothing is literal text.
* ``BREAK`` (uppercase, a word of its own) ends the current 75-token chunk.
* A prompt longer than 75 tokens becomes several chunks of ``[BOS] + 75 tokens + [EOS]``; each
  chunk goes through the text encoder on its own and the hidden states are concatenated along the
  token axis (``[1, chunks * 77, D]``), which the U-Net's cross-attention accepts at any length.
  When a chunk fills up and a comma came within its last 20 tokens, the words after that comma move
  to the next chunk (A1111's ``comma_padding_backtrack``).
* The weights scale the encoder's hidden states token by token; each chunk's mean is then restored
  (``apply_emphasis``).

Chunks are padded with the tokenizer's pad id (A1111 pads SD 1.x chunks with EOS; diffusers' SD 1.x
tokenizers use EOS as their pad token, so the two agree there): a plain prompt of at most 75 tokens
gives exactly the ids of ``PromptTokenizer.encode``, that is, what diffusers feeds the text encoder.

Not covered (out of scope): prompt editing ``[from:to:when]``, alternation ``[a|b]``, composable
diffusion ``AND``, textual-inversion embeddings, and the other emphasis modes ("None",
"No norm"). Differences from A1111: the weights of one chunk are normalized per prompt (A1111 takes
the mean over all prompts of a batch, which is the same when they are identical); ``token_count``
counts real prompt tokens (A1111 counts 75 for every chunk but the last); an emphasis weight that
is not a number (``(word:1.2.3)``) is a ``RequestError`` here (a Python exception in A1111).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from sdfast.errors import RequestError
from sdfast.runtime.tokenizer import PromptTokenizer

ROUND_MULTIPLIER = 1.1  # ( ... )
SQUARE_MULTIPLIER = 1 / 1.1  # [ ... ]
COMMA_TOKEN = ",</w>"
MAX_WEIGHT = 1e4  # beyond this a weight only produces inf/NaN embeddings
BREAK = "BREAK"
_BREAK_WEIGHT = -1.0  # the weight that marks a BREAK fragment in parse_prompt_attention's output

# One lexical piece of a prompt. Only '\\' and ':' start two alternatives each; the longer one
# (an escape, a weight ':1.3)') is tried first.
_PIECE = re.compile(
    r"""
    (?P<escaped>\\[()\[\]\\])                    # \( \) \[ \] \\ : the character itself
    | (?P<backslash>\\)                          # any other backslash: dropped
    | (?P<weight>:\s*(?P<value>[+-]?[.\d]+)\s*\))  # ':1.3)' closes a '(' with an explicit weight
    | (?P<open>[(\[])
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.X,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True, eq=False)
class PromptChunks:
    """One prompt as text-encoder chunks of ``tokenizer.max_length`` (77) ids each."""

    ids: np.ndarray  # [chunks, 77] int64: BOS, 75 tokens or padding, EOS
    weights: np.ndarray  # [chunks, 77] float32: each token's emphasis; 1.0 for BOS, EOS and padding
    token_count: int  # prompt tokens, without BOS/EOS/padding

    @property
    def chunks(self) -> int:
        return int(self.ids.shape[0])


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into (fragment, weight) pairs, as A1111's parser does.

    BREAK comes out as ``("BREAK", -1.0)``; adjacent fragments of equal weight are merged; an empty
    prompt gives ``[("", 1.0)]``.

    >>> parse_prompt_attention('an (important) word')
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    fragments: list[list] = []  # [text, weight], mutable while brackets close
    open_round: list[int] = []  # index into fragments where each open '(' starts
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for piece in _PIECE.finditer(text):
        kind = piece.lastgroup  # the outer group: "weight" for ":1.3)"
        if kind == "escaped":
            fragments.append([piece.group()[1], 1.0])
        elif kind == "backslash":
            fragments.append(["", 1.0])
        elif piece.group() == "(":
            open_round.append(len(fragments))
        elif piece.group() == "[":
            open_square.append(len(fragments))
        elif kind == "weight" and open_round:
            try:
                factor = float(piece.group("value"))
            except ValueError:
                raise RequestError(f"prompt emphasis weight '{piece.group('value')}' is not a number") from None
            if not abs(factor) <= MAX_WEIGHT:  # in Python floats: a float32 cast of 1e39 would warn before refusing
                raise RequestError(f"prompt emphasis weight '{piece.group('value')}' is beyond {MAX_WEIGHT:g}")
            scale_from(open_round.pop(), factor)
        elif piece.group() == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif piece.group() == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # text, or a closing bracket / weight that closes nothing, taken literally
            for index, part in enumerate(_BREAK_SPLIT.split(piece.group())):
                if index:
                    fragments.append([BREAK, _BREAK_WEIGHT])
                fragments.append([part, 1.0])

    for start in open_round:  # brackets left open close at the end, in the order they opened
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    if not all(abs(weight) <= MAX_WEIGHT for _, weight in fragments):  # in Python floats, before any float32 cast overflows
        raise RequestError(f"prompt emphasis multiplies a weight beyond {MAX_WEIGHT:g} (too many nested brackets?)")
    merged: list[list] = []
    for fragment in fragments or [["", 1.0]]:
        if merged and merged[-1][1] == fragment[1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return [(fragment_text, weight) for fragment_text, weight in merged]


def tokenize_weighted(tokenizer: PromptTokenizer, text: str, comma_backtrack: int = 20) -> PromptChunks:
    """Parse, tokenize and chunk ``text``; each token carries its fragment's weight.

    ``comma_backtrack``: when a chunk is full and a comma is among its last ``comma_backtrack``
    tokens, the tokens after that comma start the next chunk (0 turns this off; so does a
    vocabulary without a ``,</w>`` token).
    """
    room = tokenizer.max_length - 2
    comma = tokenizer.token_id(COMMA_TOKEN)
    done: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in ids of the chunk's last comma
    token_count = 0

    def close_chunk() -> None:
        nonlocal ids, weights, last_comma
        done.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for fragment, weight in parse_prompt_attention(text):
        if fragment == BREAK and weight == _BREAK_WEIGHT:
            close_chunk()
            continue
        for token in tokenizer.tokens(fragment):
            if comma is not None and token == comma:
                last_comma = len(ids)
            elif len(ids) == room and comma_backtrack > 0 and last_comma >= 0 and room - last_comma <= comma_backtrack:
                cut = last_comma + 1
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                del ids[cut:], weights[cut:]
                close_chunk()
                ids, weights = moved_ids, moved_weights
            if len(ids) == room:
                close_chunk()
            ids.append(token)
            weights.append(weight)
            token_count += 1
    if ids or not done:
        close_chunk()

    # [BOS, tokens, EOS, pad...] as diffusers' tokenizer lays out one prompt (A1111 puts EOS last; the same when pad is EOS)
    all_ids = [[tokenizer.bos_id, *chunk, tokenizer.eos_id, *[tokenizer.pad_id] * (room - len(chunk))] for chunk, _ in done]
    all_weights = [[1.0, *chunk, *[1.0] * (room - len(chunk)), 1.0] for _, chunk in done]
    weights_array = np.asarray(all_weights, dtype=np.float32)  # every weight within MAX_WEIGHT: parse_prompt_attention checked
    return PromptChunks(ids=np.asarray(all_ids, dtype=np.int64), weights=weights_array, token_count=token_count)


def pad_to_chunks(prompt: PromptChunks, count: int, tokenizer: PromptTokenizer) -> PromptChunks:
    """``prompt`` with empty-prompt chunks (``[BOS, EOS, pad...]``, weights 1.0) appended up to ``count`` chunks.

    A1111's "pad prompt/negative prompt": cond and uncond of equal length share one U-Net batch.
    """
    missing = count - prompt.chunks
    if missing < 0:
        raise ValueError(f"cannot pad a prompt of {prompt.chunks} chunks to {count}")
    if missing == 0:
        return prompt
    empty = np.full((missing, tokenizer.max_length), tokenizer.pad_id, dtype=np.int64)
    empty[:, 0], empty[:, 1] = tokenizer.bos_id, tokenizer.eos_id
    return PromptChunks(
        ids=np.concatenate([prompt.ids, empty]),
        weights=np.concatenate([prompt.weights, np.ones(empty.shape, dtype=np.float32)]),
        token_count=prompt.token_count,
    )


def pad_pair(first: PromptChunks, second: PromptChunks, tokenizer: PromptTokenizer) -> tuple[PromptChunks, PromptChunks]:
    """Both prompts padded (``pad_to_chunks``) to the chunk count of the longer one."""
    count = max(first.chunks, second.chunks)
    return pad_to_chunks(first, count, tokenizer), pad_to_chunks(second, count, tokenizer)


def apply_emphasis(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's "Original" emphasis on one prompt's encoder output.

    ``hidden``: [chunks, 77, D] (each chunk encoded on its own), ``weights``: [chunks, 77]. Per
    chunk: ``z * w`` token by token, then rescaled so that the chunk's mean is what it was. Chunks
    whose weights are all 1.0 are left untouched; when no chunk is weighted, ``hidden`` itself is
    returned. The result has ``hidden``'s dtype (the arithmetic is float32).
    """
    hidden = np.asarray(hidden)
    weights = np.asarray(weights, dtype=np.float32)
    if hidden.ndim != 3 or weights.shape != hidden.shape[:2]:
        raise ValueError(f"emphasis needs hidden [chunks, tokens, D] and weights [chunks, tokens], got {hidden.shape} and {weights.shape}")
    weighted = [index for index in range(len(weights)) if not np.all(weights[index] == 1.0)]
    if not weighted:
        return hidden
    out = hidden.copy()
    for index in weighted:
        z = hidden[index].astype(np.float32)
        original_mean = z.mean()
        z = z * weights[index][:, None]
        new_mean = z.mean()
        if new_mean != 0:  # A1111 would divide by zero here (all weights 0); keep the scaled values
            z = z * (original_mean / new_mean)
        out[index] = z.astype(hidden.dtype)
    return out
