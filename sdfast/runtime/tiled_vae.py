"""Tiled VAE decode and encode: the image in overlapping tiles through a static tile graph, the seams blended.

For memory on large images: the VAE's activations grow with the image (SDXL's decoder holds about 4.5 GiB at
1024x1024), a tile's do not. Tiles overlap by a quarter of their side (diffusers' tile_overlap_factor); the last tile
of a row or column is moved back to end at the edge, so every tile has the graph's static shape. Where tiles overlap
their outputs are averaged with linear ramps (weights (k + 0.5) / overlap across the overlap), so no seam is a cut. An
image the size of one tile is one tile: the untiled result. The VAE's group norms and its mid-block attention see one
tile at a time, so a tiled image differs slightly from the untiled one (as diffusers' and A1111's tiled VAEs do).
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Origins of tiles of ``tile`` cells covering [0, length), ``tile - overlap`` apart, the last ending at ``length``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def axis_weights(starts: list[int], tile: int) -> list[np.ndarray]:
    """Per tile, its blending weights along one axis [tile]: ramps where it overlaps its neighbours, 1 elsewhere."""
    weights = []
    for index, start in enumerate(starts):
        weight = np.ones(tile, dtype=np.float32)
        if index > 0:  # overlap with the previous tile: rise across it
            overlap = starts[index - 1] + tile - start
            weight[:overlap] = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        if index < len(starts) - 1:  # overlap with the next tile: fall across it
            overlap = start + tile - starts[index + 1]
            weight[tile - overlap:] = np.minimum(weight[tile - overlap:], (np.arange(overlap, 0, -1, dtype=np.float32) - 0.5) / overlap)
        weights.append(weight)
    return weights


def blend_tiles(run: Callable[[np.ndarray], tuple[np.ndarray, ...]], source: np.ndarray, tile: tuple[int, int], scale: float,
                overlap: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """``run`` over overlapping tiles of ``source`` [B, C, H, W] (one row at a time), its outputs blended.

    ``tile``: the tile's (height, width) in source cells; ``scale``: output cells per source cell (8 for a decoder,
    1/8 for an encoder); ``overlap``: cells shared by neighbouring tiles. Returns each output of ``run`` [B, C', H x
    scale, W x scale].
    """
    height, width = source.shape[2:]
    rows, cols = tile_starts(height, tile[0], overlap[0]), tile_starts(width, tile[1], overlap[1])
    out_tile = (round(tile[0] * scale), round(tile[1] * scale))
    row_weights = axis_weights([round(r * scale) for r in rows], out_tile[0])
    col_weights = axis_weights([round(c * scale) for c in cols], out_tile[1])
    results, total = None, np.zeros((round(height * scale), round(width * scale)), dtype=np.float32)
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            weight = row_weights[i][:, None] * col_weights[j][None, :]  # weight: [h', w']
            y, x = round(top * scale), round(left * scale)
            total[y:y + out_tile[0], x:x + out_tile[1]] += weight
            for b in range(source.shape[0]):
                outputs = run(source[b:b + 1, :, top:top + tile[0], left:left + tile[1]])
                if results is None:
                    results = [np.zeros((source.shape[0], o.shape[1], *total.shape), dtype=np.float32) for o in outputs]
                for result, output in zip(results, outputs):
                    result[b, :, y:y + out_tile[0], x:x + out_tile[1]] += output[0] * weight
    return tuple(result / total for result in results)


def tiled_decode(engine, latent: np.ndarray) -> np.ndarray:
    """The decoder's input [B, C, h, w] (already unscaled) through the tile graph ``engine`` -> images [B, 3, 8h, 8w]."""
    tile = tuple(engine.info.input("latent").shape[2:])
    factor = engine.info.outputs[0].shape[2] / tile[0]
    (images,) = blend_tiles(lambda part: engine.run({"latent": part}), latent, tile, factor, (tile[0] // 4, tile[1] // 4))
    return images


def tiled_encode(engine, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images [B, 3, H, W] in [-1, 1] through the encoder's tile graph -> the posterior's (mean, std) [B, C, H/8, W/8]."""
    tile = tuple(engine.info.input("image").shape[2:])
    factor = engine.info.outputs[0].shape[2] / tile[0]
    mean, std = blend_tiles(lambda part: tuple(engine.run({"image": part})), image, tile, factor, (tile[0] // 4, tile[1] // 4))
    return mean, std
