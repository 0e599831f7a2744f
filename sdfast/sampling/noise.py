"""Gaussian noise bit-compatible with ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))``.

Reimplements PyTorch's CPU ``normal_`` kernel (aten/src/ATen/native/cpu/DistributionTemplates.h):
a Mersenne Twister (mt19937) stream, 24-bit float uniforms, Box-Muller over blocks of 16 values
with the tail block recomputed; tensors with fewer than 16 values use the 53-bit double path.
"""
from __future__ import annotations

import math

import numpy as np

_BLOCK = 16


class TorchCompatibleGenerator:
    """A CPU random stream that reproduces ``torch.Generator("cpu").manual_seed(seed)`` draw for draw."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        legacy_state = np.random.RandomState(self.seed & 0xFFFFFFFF).get_state()  # init_genrand, as torch's mt19937
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": legacy_state[1], "pos": 624}}
        self._cached_double_normal: float | None = None

    def _uint32(self, count: int) -> np.ndarray:
        return self._bits.random_raw(count).astype(np.uint64)

    def _uniform_float32(self, count: int) -> np.ndarray:
        """torch's uniform_real_distribution<float>: the low 24 bits of one 32-bit draw, times 2^-24."""
        return ((self._uint32(count) & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)).astype(np.float32)

    def _uniform_float64(self) -> float:
        """torch's uniform_real_distribution<double>: 53 bits of two 32-bit draws (first is high)."""
        high, low = (int(v) for v in self._uint32(2))
        return (((high << 32) | low) & ((1 << 53) - 1)) * 2.0**-53

    def _normal_double(self) -> float:
        """torch's normal_distribution<double>: Box-Muller that caches its second value."""
        if self._cached_double_normal is not None:
            value, self._cached_double_normal = self._cached_double_normal, None
            return value
        u1 = self._uniform_float64()
        u2 = self._uniform_float64()
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_double_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """Standard normal float32 array of ``shape``, equal to torch.randn with this generator."""
        count = int(np.prod(shape, dtype=np.int64))
        if count < _BLOCK:
            return np.array([self._normal_double() for _ in range(count)], dtype=np.float32).reshape(shape)
        values = self._uniform_float32(count)
        whole = count - count % _BLOCK
        values[:whole] = _box_muller_blocks(values[:whole])
        if count % _BLOCK:
            values[count - _BLOCK :] = _box_muller_blocks(self._uniform_float32(_BLOCK))
        return values.reshape(shape)


def _box_muller_blocks(uniforms: np.ndarray) -> np.ndarray:
    """torch's normal_fill_16: in each block of 16, values j and j+8 become one Box-Muller pair."""
    blocks = uniforms.reshape(-1, 2, _BLOCK // 2)  # [n, 2, 8]: first halves feed the radius, second halves the angle
    radius = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - blocks[:, 0]))
    theta = (np.float32(2.0 * math.pi) * blocks[:, 1]).astype(np.float32)
    out = np.empty_like(blocks)
    out[:, 0] = radius * np.cos(theta)
    out[:, 1] = radius * np.sin(theta)
    return out.reshape(-1)


def randn(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`` in numpy."""
    return TorchCompatibleGenerator(seed).randn(tuple(shape))
