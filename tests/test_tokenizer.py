"""The built-in models tokenize with CLIP's real vocabulary, and the lean runtime's ids and chunks equal those of
transformers' CLIPTokenizer (as diffusers calls it) and of A1111's chunking over it."""
import itertools
import json
import math
from importlib.metadata import PackageNotFoundError

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from sdfast.cli import main
from sdfast.errors import ExportError
from sdfast.export import builtin_tokenizer
from sdfast.export.builtin import BUILTIN_MODELS, ensure_builtin
from sdfast.runtime.manifest import read_manifest
from sdfast.runtime.prompts import parse_prompt_attention, tokenize_weighted
from sdfast.runtime.tokenizer import PromptTokenizer

CORPUS = [
    "a red apple on a table",
    "",
    "   ",
    "Portrait of an OLD man, oil painting, highly detailed!!  8k   uhd",
    "ünïcödé, café crème brûlée, Ångström, naïve façade, Ægir, ø",  # accents
    "decomposed e\u0301 and composed é, ligature ﬁ, fullwidth ＡＢＣ１２, Ⅻ ½ ² µ",  # NFC and compatibility forms
    "東京の夜景, 水墨画の山, 한국어 프롬프트, 中文提示词",  # CJK
    "emoji 🍎🐱 👩🏽‍🚀 ❤️ 🇯🇵 and ✨sparkles✨",  # emoji, ZWJ sequences, flags, variation selectors
    "ΣΊΣΥΦΟΣ İstanbul STRASSE straße MiXeD CaSe",  # lowercasing beyond ASCII
    'punctuation: a.b,c;d!e?f — "quoted" \'single\' it\'s they\'re we\'ll @#$%^&*_+=~`|/ …',
    "commas,,, and ,leading and trailing, , , spaced",
    "tabs\tand\nnewlines\r\n and\u00a0nbsp\u3000ideographic\u2009thin\u200bzero-width  end ",  # whitespace oddities
    "numbers 1234567 3.14 16:9 1girl 2boys 8k 4K",
    "html &amp; entities &lt;3 <b>tags</b>",
    "special tokens <|startoftext|> inside <|endoftext|> the text",
    "(masterpiece:1.2), [blurry], \\(escaped\\) \\[too\\], ((nested)), (a [b] c), (word : 0.25 ), (unbalanced",
    "ratio (16:9), a:b, (x:1.5]",  # colons that are no weight
    "a cat BREAK a dog BREAK",
    "BREAK leading, (emphasis BREAK inside) and break lowercase, BREAKING",
    " ".join(["apple"] * 100),  # far beyond 77 tokens
]

# Words of a realistic long prompt, cycled to any length: words of one and of several tokens, accents, CJK, emoji, commas.
LONG_WORDS = (
    "masterpiece, best quality, a portrait of an élégant old woman in a café, oil painting by greg rutkowski, "
    "dramatic lighting, 東京 at night, 🍎 apple, highly detailed, intricate, sharp focus, 8k uhd, trending on "
    "artstation, volumetric fog, cinematic composition, bokeh, photorealistic skin texture, golden hour"
).split()
LENGTHS = [74, 75, 76, 77, 150, 300]
STYLES = ["plain", "commas", "comma-moves", "comma-at-cut", "emphasis", "break"]
# Leading one-token words that shift LONG_WORDS' commas against the 75-token cut: with 6, the last comma before the cut
# is the 72nd token and 3 tokens move to the next chunk; with 1, a comma is the 76th token (it arrives at a full chunk).
LEAD = {"comma-moves": 6, "comma-at-cut": 1}


@pytest.fixture(scope="module")
def runtime_tokenizer(tiny_engine) -> PromptTokenizer:
    """The lean runtime's tokenizer over the tiny engine's exported tokenizer.json."""
    manifest = read_manifest(tiny_engine)
    info = manifest.tokenizers["text_encoder"]
    return PromptTokenizer(manifest.path(info["file"]), info["bos_id"], info["eos_id"], info["pad_id"], info["max_length"])


@pytest.fixture(scope="module")
def clip_tokenizer(tiny_model):
    """transformers' CLIPTokenizer over the built-in model folder, as diffusers loads it."""
    return transformers.CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")


def diffusers_ids(clip, prompt: str) -> list[int]:
    """The 77 ids diffusers' StableDiffusionPipeline.encode_prompt feeds the text encoder."""
    return clip(prompt, padding="max_length", max_length=clip.model_max_length, truncation=True).input_ids


def a1111_chunks(clip, prompt: str, backtrack: int = 20) -> tuple[list[list[int]], list[list[float]], int]:
    """A1111's SD 1.x chunking (modules/sd_hijack_clip.py, ``tokenize_line``, "Original" emphasis) over CLIPTokenizer ids.

    Each parsed fragment is tokenized by transformers as A1111 does it (``truncation=False, add_special_tokens=False``);
    chunks are [BOS] + 75 tokens + [EOS], padded with EOS. Returns the chunks' ids, their weights and the token count.
    """
    parsed = parse_prompt_attention(prompt)  # checked against A1111's own examples in test_prompts.py
    tokenized = clip([text for text, _ in parsed], truncation=False, add_special_tokens=False).input_ids
    bos, eos, comma = clip.bos_token_id, clip.eos_token_id, clip.convert_tokens_to_ids(",</w>")
    chunk_ids, chunk_weights = [], []
    tokens, weights, last_comma, count = [], [], -1, 0

    def next_chunk():
        nonlocal tokens, weights, last_comma
        pad = 75 - len(tokens)
        chunk_ids.append([bos, *tokens, *[eos] * pad, eos])
        chunk_weights.append([1.0, *weights, *[1.0] * pad, 1.0])
        tokens, weights, last_comma = [], [], -1

    for fragment_ids, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in fragment_ids:
            if token == comma:
                last_comma = len(tokens)
            elif backtrack and len(tokens) == 75 and last_comma != -1 and len(tokens) - last_comma <= backtrack:
                moved_tokens, moved_weights = tokens[last_comma + 1:], weights[last_comma + 1:]
                tokens, weights = tokens[:last_comma + 1], weights[:last_comma + 1]
                next_chunk()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == 75:
                next_chunk()
            tokens.append(token)
            weights.append(weight)
            count += 1
    if tokens or not chunk_ids:
        next_chunk()
    return chunk_ids, chunk_weights, count


def long_prompt(clip, length: int, style: str) -> str:
    """A prompt of exactly ``length`` CLIP tokens in one of STYLES (the same words each time, for one length)."""
    words = [word.rstrip(",") for word in LONG_WORDS] if style == "plain" else list(LONG_WORDS)
    count = lambda text: len(clip(text, add_special_tokens=False).input_ids)  # noqa: E731
    chosen = ["a"] * LEAD.get(style, 0)
    for word in itertools.cycle(words):
        if count(" ".join(chosen + [word])) > length:
            break
        chosen.append(word)
    chosen += ["a"] * (length - count(" ".join(chosen)))  # 'a' is one token
    if style == "emphasis":  # every fifth word weighted; the text tokenizes to the same ids without the syntax
        chosen = [f"({word}:1.3)" if index % 10 == 3 else f"[{word}]" if index % 10 == 8 else word for index, word in enumerate(chosen)]
    if style == "break":
        chosen.insert(len(chosen) // 3, "BREAK")
    prompt = " ".join(chosen)
    assert a1111_chunks(clip, prompt)[2] == length, prompt  # BREAK and emphasis syntax are no tokens
    return prompt


# --- the vocabulary ---------------------------------------------------------------------------------------------------

def test_builtin_tokenizer_is_clips_vocabulary(tiny_model, clip_tokenizer):
    """Ids as stable-diffusion-v1-5's tokenizer/vocab.json has them (the example of transformers' CLIP docs)."""
    assert len(clip_tokenizer) == 49408
    assert clip_tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_tokenizer.convert_ids_to_tokens([0, 187, 188, 256, 512, 49405]) == ["!", "ÿ", "Ā", "!</w>", "in", "jekyll</w>"]
    assert clip_tokenizer.convert_tokens_to_ids([",</w>", "apple</w>"]) == [267, 3055]
    assert (clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, clip_tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert json.loads((tiny_model / "text_encoder" / "config.json").read_text())["vocab_size"] == 49408


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_every_builtin_text_encoder_takes_the_whole_vocabulary(name):
    model = BUILTIN_MODELS[name]
    encoders = [config for config in (model.text_encoder, getattr(model, "text_encoder_2", None)) if config]  # the refiner has only encoder 2
    assert encoders and all(config["vocab_size"] == builtin_tokenizer.CLIP_VOCAB_SIZE == 49408 for config in encoders)


def _missing_distribution(name):
    raise PackageNotFoundError(name)


class _WheelWithoutDataFile:
    version = "3.3.0"

    @staticmethod
    def locate_file(path):
        return f"/nonexistent/{path}"


@pytest.mark.parametrize("distribution", [_missing_distribution, lambda name: _WheelWithoutDataFile()], ids=["not-installed", "no-data-file"])
def test_missing_open_clip_is_one_clear_error(distribution, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(builtin_tokenizer, "distribution", distribution)
    with pytest.raises(ExportError, match=r"pip install --no-deps open-clip-torch==3\.3\.0"):
        builtin_tokenizer.write_tokenizer_files(tmp_path / "tokenizer")
    assert not (tmp_path / "tokenizer").exists()

    monkeypatch.setenv("SDFAST_CACHE", str(tmp_path / "cache"))  # a cache without a built tiny: it would be built
    with pytest.raises(ExportError, match="open-clip-torch"):
        ensure_builtin("tiny")
    assert not (tmp_path / "cache" / "models").exists()  # it stopped before building anything
    capsys.readouterr()
    assert main(["export", "--model", "tiny", "--out", str(tmp_path / "engine")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install --no-deps open-clip-torch==3.3.0" in err and "Traceback" not in err
    assert not (tmp_path / "engine").exists()


# --- ids: the runtime against transformers' CLIPTokenizer -------------------------------------------------------------

@pytest.mark.parametrize("prompt", CORPUS)
def test_ids_match_transformers(runtime_tokenizer, clip_tokenizer, prompt):
    assert runtime_tokenizer.encode(prompt).ids.tolist() == diffusers_ids(clip_tokenizer, prompt)
    assert runtime_tokenizer.tokens(prompt) == clip_tokenizer(prompt, add_special_tokens=False).input_ids


def test_truncation_counts_dropped_tokens(runtime_tokenizer):
    encoded = runtime_tokenizer.encode(" ".join(["apple"] * 100))  # 'apple' is one token in CLIP's vocabulary
    assert encoded.dropped_tokens == 100 - 75
    assert encoded.ids[-1] == runtime_tokenizer.eos_id and len(encoded.ids) == 77


# --- chunks: the runtime against A1111's chunking over CLIPTokenizer ids ----------------------------------------------

def assert_chunks_match_a1111(runtime_tokenizer, clip_tokenizer, prompt):
    expected_ids, expected_weights, expected_count = a1111_chunks(clip_tokenizer, prompt)
    chunks = tokenize_weighted(runtime_tokenizer, prompt)
    assert chunks.ids.tolist() == expected_ids
    np.testing.assert_array_equal(chunks.weights, np.asarray(expected_weights, dtype=np.float32))  # A1111's multipliers tensor
    assert chunks.token_count == expected_count
    return chunks


@pytest.mark.parametrize("prompt", CORPUS)
def test_corpus_chunks_match_a1111(runtime_tokenizer, clip_tokenizer, prompt):
    assert_chunks_match_a1111(runtime_tokenizer, clip_tokenizer, prompt)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("length", LENGTHS)
def test_long_prompt_chunks_match_a1111(runtime_tokenizer, clip_tokenizer, length, style):
    prompt = long_prompt(clip_tokenizer, length, style)
    chunks = assert_chunks_match_a1111(runtime_tokenizer, clip_tokenizer, prompt)
    if style == "plain":  # no comma, no BREAK: cut every 75 tokens, the first chunk is what diffusers truncates to
        assert chunks.chunks == math.ceil(length / 75)
        assert chunks.ids[0].tolist() == diffusers_ids(clip_tokenizer, prompt)
    without_syntax = prompt if style != "emphasis" else long_prompt(clip_tokenizer, length, "commas")  # the same words
    if length <= 75 and style != "break":  # one chunk: exactly diffusers' ids (of the text without emphasis syntax)
        assert chunks.ids.tolist() == [diffusers_ids(clip_tokenizer, without_syntax)]
    if style == "emphasis":
        assert chunks.ids.tolist() == tokenize_weighted(runtime_tokenizer, without_syntax).ids.tolist()
        assert (chunks.weights != 1.0).any()
