"""A1111-style prompts: emphasis parsing, 75-token chunks, comma backtrack, BREAK, emphasis math, padding."""
import numpy as np
import pytest

from sdfast.errors import RequestError
from sdfast.export.builtin_tokenizer import write_tokenizer_files
from sdfast.runtime.prompts import (
    PromptChunks,
    apply_emphasis,
    pad_pair,
    pad_to_chunks,
    parse_prompt_attention,
    tokenize_weighted,
)
from sdfast.runtime.tokenizer import PromptTokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> PromptTokenizer:
    """The built-in models' CLIP tokenizer, converted to tokenizer.json by transformers as the exporter does it (no export)."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("prompt-tokenizer")
    vocab_path, merges_path = write_tokenizer_files(directory / "clip")
    clip = transformers.CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path))
    clip.save_pretrained(directory / "converted")
    return PromptTokenizer(directory / "converted" / "tokenizer.json", clip.bos_token_id, clip.eos_token_id, clip.pad_token_id, 77)


def one(tokenizer, word: str) -> int:
    """The id of a word that is a single token of CLIP's vocabulary."""
    ids = tokenizer.tokens(word)
    assert len(ids) == 1, (word, ids)
    return ids[0]


# --- parse_prompt_attention: A1111's documented examples, then the rules one by one --------------

A1111_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1],
         ["hill", 0.55], [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]],
    ),
]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES)
def test_a1111_documented_examples(text, expected):
    assert parse_prompt_attention(text) == [tuple(pair) for pair in expected]  # exact floats, as A1111 prints them


@pytest.mark.parametrize("text, expected", [
    ("", [("", 1.0)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("(word:1.5)", [("word", 1.5)]),
    ("(word : 0.25 )", [("word ", 0.25)]),  # spaces around the weight, as A1111 >= 1.6 allows
    ("((word:1.5))", [("word", 1.5 * 1.1)]),
    ("(a [b] c)", [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1.1)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("a) b] c:1.2) d", [("a) b] c:1.2) d", 1.0)]),  # closers that close nothing are text
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("(a:1.5]", [("a:1.5]", 1.1)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a break b, BREAKING", [("a break b, BREAKING", 1.0)]),  # lowercase or inside a word: text
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # inside brackets A1111 scales it: no longer a separator
])
def test_parse_rules(text, expected):
    parsed = parse_prompt_attention(text)
    assert [fragment for fragment, _ in parsed] == [fragment for fragment, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected], rel=1e-12)


def test_parse_rejects_a_weight_that_is_no_number():
    with pytest.raises(RequestError, match="1.2.3"):
        parse_prompt_attention("(word:1.2.3)")


# --- tokenize_weighted: chunks -------------------------------------------------------------------

PLAIN = [
    "",
    "a red apple on a table",
    "Portrait of an OLD man, oil painting, highly detailed!!  8k   uhd",
    "ratio 16:9, unknownwordzz",
    " ".join(["apple"] * 75),  # exactly one full chunk
]


@pytest.mark.parametrize("prompt", PLAIN)
def test_plain_prompt_is_what_encode_gives(tokenizer, prompt):
    chunks = tokenize_weighted(tokenizer, prompt)
    assert chunks.ids.shape == (1, 77) and chunks.ids.dtype == np.int64
    assert chunks.ids[0].tolist() == tokenizer.encode(prompt).ids.tolist()
    assert chunks.weights.dtype == np.float32 and np.all(chunks.weights == 1.0)
    assert chunks.token_count == len(tokenizer.tokens(prompt))


def test_empty_prompt_is_one_chunk(tokenizer):
    chunks = tokenize_weighted(tokenizer, "")
    assert chunks.chunks == 1 and chunks.token_count == 0
    assert chunks.ids[0, :2].tolist() == [tokenizer.bos_id, tokenizer.eos_id]
    assert np.all(chunks.ids[0, 2:] == tokenizer.pad_id)


@pytest.mark.parametrize("count, expected_chunks", [(76, 2), (100, 2), (150, 2), (151, 3), (160, 3)])
def test_long_prompt_splits_into_chunks_of_75(tokenizer, count, expected_chunks):
    apple = one(tokenizer, "apple")
    chunks = tokenize_weighted(tokenizer, " ".join(["apple"] * count))
    assert chunks.ids.shape == (expected_chunks, 77) and chunks.weights.shape == (expected_chunks, 77)
    assert chunks.token_count == count
    assert np.all(chunks.ids[:, 0] == tokenizer.bos_id) and np.all(chunks.ids[:, 76] == tokenizer.eos_id)
    for index in range(expected_chunks):
        in_chunk = min(75, count - 75 * index)
        assert np.all(chunks.ids[index, 1:1 + in_chunk] == apple)
        assert np.all(chunks.ids[index, 1 + in_chunk:76] == tokenizer.pad_id)
    assert np.all(chunks.weights == 1.0)


def test_weights_follow_their_tokens_across_chunks(tokenizer):
    apple, red = one(tokenizer, "apple"), one(tokenizer, "red")
    prompt = "(red:1.5) " + " ".join(["apple"] * 80) + " [red]"
    chunks = tokenize_weighted(tokenizer, prompt)
    assert chunks.chunks == 2 and chunks.token_count == 82
    assert chunks.ids[0, 1] == red and chunks.weights[0, 1] == np.float32(1.5)
    assert np.all(chunks.weights[0, 2:] == 1.0) and np.all(chunks.weights[0, 0] == 1.0)
    # chunk 1: the last 6 apples, then red at 1/1.1, then padding at 1.0
    assert chunks.ids[1, 1:7].tolist() == [apple] * 6 and chunks.ids[1, 7] == red
    assert chunks.weights[1, 7] == np.float32(1 / 1.1)
    assert np.all(np.delete(chunks.weights[1], 7) == 1.0)


def test_comma_backtrack_moves_the_words_after_the_last_comma(tokenizer):
    apple, red, comma = one(tokenizer, "apple"), one(tokenizer, "red"), tokenizer.token_id(",</w>")
    assert comma is not None  # the built-in vocabulary has CLIP's byte-level ",</w>"
    prompt = " ".join(["apple"] * 70) + ", " + " ".join(["red"] * 10)  # comma = 71st token, 81 tokens
    chunks = tokenize_weighted(tokenizer, prompt)
    assert chunks.chunks == 2 and chunks.token_count == 81
    assert chunks.ids[0, 1:72].tolist() == [apple] * 70 + [comma]
    assert np.all(chunks.ids[0, 72:76] == tokenizer.pad_id) and chunks.ids[0, 76] == tokenizer.eos_id
    assert chunks.ids[1, 1:11].tolist() == [red] * 10 and chunks.ids[1, 11] == tokenizer.eos_id
    # without backtracking, the chunk is cut at exactly 75 tokens
    plain = tokenize_weighted(tokenizer, prompt, comma_backtrack=0)
    assert plain.ids[0, 72:76].tolist() == [red] * 4 and plain.ids[1, 1:7].tolist() == [red] * 6


def test_comma_backtrack_only_looks_back_so_far(tokenizer):
    red = one(tokenizer, "red")
    prompt = " ".join(["apple"] * 40) + ", " + " ".join(["red"] * 50)  # comma 35 tokens before the cut
    chunks = tokenize_weighted(tokenizer, prompt)
    assert chunks.ids[0, 42:76].tolist() == [red] * 34  # chunk 0 is full: nothing moved
    shorter = tokenize_weighted(tokenizer, prompt, comma_backtrack=40)
    assert np.all(shorter.ids[0, 42:76] == tokenizer.pad_id) and shorter.ids[1, 1:51].tolist() == [red] * 50


def test_no_comma_token_means_no_backtrack(tokenizer, monkeypatch):
    prompt = " ".join(["apple"] * 70) + ", " + " ".join(["red"] * 10)
    expected = tokenize_weighted(tokenizer, prompt, comma_backtrack=0).ids
    monkeypatch.setattr(tokenizer, "token_id", lambda token: None)
    assert tokenize_weighted(tokenizer, prompt).ids.tolist() == expected.tolist()


def test_break_starts_a_new_chunk(tokenizer):
    prompt = "a red apple BREAK on a table"
    chunks = tokenize_weighted(tokenizer, prompt)
    assert chunks.chunks == 2
    assert chunks.token_count == len(tokenizer.tokens("a red apple")) + len(tokenizer.tokens("on a table"))
    assert chunks.ids[0].tolist() == tokenizer.encode("a red apple").ids.tolist()
    assert chunks.ids[1].tolist() == tokenizer.encode("on a table").ids.tolist()
    assert tokenize_weighted(tokenizer, "a red apple BREAK").chunks == 1  # nothing after it: no empty chunk
    leading = tokenize_weighted(tokenizer, "BREAK a red apple")  # as in A1111: an empty first chunk
    assert leading.ids.tolist() == [tokenizer.encode("").ids.tolist(), tokenizer.encode("a red apple").ids.tolist()]


def test_break_after_a_full_chunk_adds_no_empty_chunk(tokenizer):
    chunks = tokenize_weighted(tokenizer, " ".join(["apple"] * 75) + " BREAK red")
    assert chunks.chunks == 2 and chunks.ids[1, 1] == one(tokenizer, "red")


# --- apply_emphasis --------------------------------------------------------------------------------

def test_emphasis_with_unit_weights_leaves_hidden_untouched():
    hidden = np.random.default_rng(0).standard_normal((2, 77, 16)).astype(np.float32)
    out = apply_emphasis(hidden, np.ones((2, 77), dtype=np.float32))
    assert out is hidden


def test_emphasis_scales_tokens_and_restores_each_chunks_mean():
    rng = np.random.default_rng(1)
    hidden = (rng.standard_normal((2, 77, 16)) + 0.5).astype(np.float32)
    weights = np.ones((2, 77), dtype=np.float32)
    weights[1, 3] = 1.5
    weights[1, 5] = 1 / 1.1
    out = apply_emphasis(hidden, weights)
    assert out.dtype == np.float32 and out.shape == hidden.shape
    assert np.array_equal(out[0], hidden[0])  # unweighted chunk: bit-identical
    assert out[1].mean() == pytest.approx(hidden[1].mean(), rel=1e-5)
    scale = out[1, 0] / hidden[1, 0]  # the common renormalization factor
    np.testing.assert_allclose(out[1], hidden[1] * weights[1][:, None] * scale[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1, 3] / out[1, 7], 1.5 * hidden[1, 3] / hidden[1, 7], rtol=1e-4)
    reference = hidden[1] * weights[1][:, None]  # A1111's formula, written out
    reference = reference * (hidden[1].mean() / reference.mean())
    np.testing.assert_allclose(out[1], reference, rtol=1e-6, atol=1e-7)


def test_emphasis_keeps_float16():
    hidden = np.random.default_rng(2).standard_normal((1, 77, 8)).astype(np.float16) + np.float16(1)
    weights = np.ones((1, 77), dtype=np.float32)
    weights[0, 1] = 1.3
    out = apply_emphasis(hidden, weights)
    assert out.dtype == np.float16
    reference = hidden[0].astype(np.float32) * weights[0][:, None]  # A1111's formula in float32, then fp16's rounding
    reference = reference * (hidden[0].astype(np.float32).mean() / reference.mean())
    np.testing.assert_allclose(out[0].astype(np.float32), reference, rtol=1e-3, atol=1e-3)  # the weight and the rescale (0.4%) show


def test_emphasis_checks_shapes():
    with pytest.raises(ValueError):
        apply_emphasis(np.zeros((2, 77, 8), np.float32), np.ones((1, 77), np.float32))


# --- padding cond and uncond to the same chunk count -----------------------------------------------

def test_pad_to_chunks_appends_empty_prompt_chunks(tokenizer):
    long = tokenize_weighted(tokenizer, "(red) " + " ".join(["apple"] * 160))
    short = tokenize_weighted(tokenizer, "ugly")
    padded = pad_to_chunks(short, long.chunks, tokenizer)
    empty = tokenize_weighted(tokenizer, "")
    assert isinstance(padded, PromptChunks) and padded.chunks == 3 and padded.token_count == short.token_count
    assert np.array_equal(padded.ids[0], short.ids[0])
    assert np.array_equal(padded.ids[1:], np.repeat(empty.ids, 2, axis=0))
    assert padded.ids.dtype == np.int64 and padded.weights.dtype == np.float32 and np.all(padded.weights == 1.0)
    assert pad_to_chunks(long, long.chunks, tokenizer) is long
    with pytest.raises(ValueError):
        pad_to_chunks(long, 1, tokenizer)
    first, second = pad_pair(short, long, tokenizer)
    assert first.chunks == second.chunks == 3 and second is long
    assert np.array_equal(first.ids, padded.ids)


def test_pad_other_than_eos_puts_eos_right_after_the_tokens(tokenizer):
    """SD 2.x tokenizers pad with 0: each chunk is [BOS, tokens, EOS, pad...], as diffusers' tokenizer lays out a prompt."""
    zero_pad = PromptTokenizer(tokenizer.path, tokenizer.bos_id, tokenizer.eos_id, 0, 77)
    for prompt in PLAIN:
        assert tokenize_weighted(zero_pad, prompt).ids[0].tolist() == zero_pad.encode(prompt).ids.tolist()
    chunks = tokenize_weighted(zero_pad, " ".join(["apple"] * 80))
    assert chunks.ids[1, :7].tolist() == [zero_pad.bos_id] + [one(zero_pad, "apple")] * 5 + [zero_pad.eos_id]
    assert np.all(chunks.ids[1, 7:] == 0) and chunks.ids[0, 76] == zero_pad.eos_id
    padded = pad_to_chunks(tokenize_weighted(zero_pad, "apple"), 2, zero_pad)
    assert padded.ids[1].tolist() == tokenize_weighted(zero_pad, "").ids[0].tolist()
