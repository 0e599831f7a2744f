"""A1111-style prompt encoding through one CLIP text-encoder engine: 75-token chunks, (word:1.2) emphasis, clip skip.

A family module holds one of these per text encoder (SD 1.x and 2.x one, SDXL two) and turns their outputs into the
denoiser's named conditioning arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdfast.runtime.backends import Engine
from sdfast.runtime.device_loop import check_finite
from sdfast.runtime.prompts import PromptChunks, apply_emphasis, pad_pair, tokenize_weighted
from sdfast.runtime.tokenizer import PromptTokenizer


@dataclass
class EncodedPrompt:
    """One prompt's embeddings: every chunk's tokens concatenated, [chunks * 77, D], and the encoder's pooled output."""

    hidden: np.ndarray  # [C * 77, D]
    chunks: int
    pooled: np.ndarray | None = None  # [P]: the first chunk's pooled projection (A1111), when the engine has a second output


class PromptEncoder:
    """One tokenizer and its text-encoder engine (inputs input_ids [N, 77] and clip_skip [1]; outputs [N, 77, D] and,
    for SDXL's second encoder, the pooled projection [N, P])."""

    def __init__(self, tokenizer: PromptTokenizer, engine: Engine, max_chunks: int, label: str = "text encoder"):
        self.tokenizer, self.engine, self.max_chunks, self.label = tokenizer, engine, max_chunks, label

    def encode_pair(self, prompt: str, negative_prompt: str, use_cfg: bool, clip_skip: int,
                    warnings: list[str]) -> tuple[EncodedPrompt, EncodedPrompt | None]:
        """(cond, uncond) with A1111's chunking and emphasis; with guidance both have the same number of chunks."""
        prompts = [tokenize_weighted(self.tokenizer, prompt)]
        if use_cfg:
            prompts.append(tokenize_weighted(self.tokenizer, negative_prompt))
        for index, label in enumerate(("prompt", "negative prompt")[: len(prompts)]):
            if prompts[index].chunks > self.max_chunks:
                warnings.append(
                    f"{label} has {prompts[index].token_count} tokens, {prompts[index].chunks} chunks of 75; this engine takes "
                    f"{self.max_chunks} chunks (export --max-prompt-chunks): the rest was dropped"
                )
                prompts[index] = PromptChunks(prompts[index].ids[: self.max_chunks], prompts[index].weights[: self.max_chunks], -1)
        if use_cfg:
            prompts = list(pad_pair(prompts[0], prompts[1], self.tokenizer))
        hidden, *rest = self.run(np.concatenate([p.ids for p in prompts]), clip_skip)  # hidden: [total chunks, 77, D]
        encoded, first = [], 0
        for chunk_list in prompts:
            chunks = apply_emphasis(hidden[first : first + chunk_list.chunks], chunk_list.weights)  # chunks: [C, 77, D]
            pooled = rest[0][first] if rest else None  # emphasis leaves the pooled output alone, as A1111
            encoded.append(EncodedPrompt(chunks.reshape(-1, chunks.shape[-1]), chunk_list.chunks, pooled))  # [C * 77, D]
            first += chunk_list.chunks
        return encoded[0], (encoded[1] if use_cfg else None)

    def run(self, rows: np.ndarray, clip_skip: int) -> list[np.ndarray]:
        """rows [N, 77] of token ids -> each output for every row ([N, 77, D], then [N, P] where the engine pools),
        through the engine's fixed batch (the last group padded)."""
        per_call = self.engine.info.input("input_ids").shape[0]
        skip = np.asarray([clip_skip], dtype=np.int64)
        groups = []
        for first in range(0, len(rows), per_call):
            group = rows[first : first + per_call]
            padded = np.concatenate([group, np.repeat(group[-1:], per_call - len(group), axis=0)])  # the engine's fixed batch
            outputs = self.engine.run({"input_ids": padded, "clip_skip": skip})
            groups.append([check_finite(self.label, output)[: len(group)] for output in outputs])
        return [np.concatenate(parts) for parts in zip(*groups)]
