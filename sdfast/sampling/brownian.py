"""A numpy port of the Brownian tree behind diffusers' DPMSolverSDEScheduler (and k-diffusion's DPM++ SDE samplers).

diffusers draws that sampler's noise from ``torchsde.BrownianInterval(t0, t1, entropy=seed, tol=1e-6, pool_size=24,
halfway_tree=True)`` without Levy area (torchsde 0.2.6, _brownian/brownian_interval.py). It is a binary tree over
[t0, t1] whose nodes split at their midpoints, rounded to 6 decimals, until a queried time is a node edge. Each split
node seeds its Brownian-bridge draw from ``numpy.random.SeedSequence(entropy, spawn_key=(key, depth), pool_size=24)``,
key being the node's path from the root in binary, and draws it with ``torch.randn`` on a generator
manual_seed'ed with that state (sdfast.sampling.noise reproduces that stream). The increment over a node follows
from its parent's by the Brownian bridge; a query over several nodes sums their increments. This port repeats
that arithmetic in float32, step for step, so the same query times give torchsde's noise (to the last-bit rounding
of torch.randn that sdfast.sampling.noise allows). The tree depends only on the entropy, not on the order of the
queries; its cache only saves work.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import numpy as np

from sdfast.sampling.noise import TorchCompatibleGenerator


class _ReseededGenerator(TorchCompatibleGenerator):
    """``TorchCompatibleGenerator(seed)`` made cheaply: torchsde seeds a fresh torch generator for every draw.

    ``RandomState.seed`` is mt19937's init_genrand, as torch's manual_seed, and RandomState's full-range uint32
    draws are the raw stream, so one reseeded RandomState feeds TorchCompatibleGenerator's normals unchanged
    (it replaces the generator's ``_uint32`` source and resets its cached normal; the tests check the equality).
    """

    def __init__(self):
        self._legacy = np.random.RandomState(0)
        self._cached_double_normal = None

    def reseed(self, seed: int) -> "_ReseededGenerator":
        self.seed = int(seed)
        self._legacy.seed(self.seed & 0xFFFFFFFF)
        self._cached_double_normal = None
        return self

    def _uint32(self, count: int) -> np.ndarray:
        return self._legacy.randint(0, 2**32, size=count, dtype=np.uint32).astype(np.uint64)


class _Node:
    """An interval of the tree; split nodes also have a midpoint, children and their own seed."""

    __slots__ = ("start", "end", "parent", "is_left", "midway", "key", "depth", "w_seed", "left", "right")

    def __init__(self, start: float, end: float, parent: "_Node | None", is_left: bool | None):
        self.start, self.end, self.parent, self.is_left = start, end, parent, is_left
        self.midway: float | None = None


class BrownianInterval:
    """torchsde.BrownianInterval(t0, t1, size=shape, dtype=float32, entropy, tol, pool_size, halfway_tree=True)."""

    def __init__(self, t0: float, t1: float, shape: tuple[int, ...], entropy: int, tol: float = 1e-6, pool_size: int = 24):
        if t0 > t1:
            raise ValueError(f"Brownian interval start {t0} is after its end {t1}")
        digits = -int(math.log10(tol))
        self._round = lambda value: round(value, digits)
        self.shape, self.entropy, self.pool_size = tuple(shape), int(entropy), pool_size
        self._generator = _ReseededGenerator()
        self.root = _Node(self._round(t0), self._round(t1), None, None)
        self.root.key, self.root.depth = 0, 0
        w_seed = np.random.SeedSequence(entropy=self.entropy, pool_size=pool_size).generate_state(3)[0]
        self._root_w = self._randn(w_seed) * np.float32(math.sqrt(t1 - t0))
        self._cache: OrderedDict[_Node, np.ndarray] = OrderedDict()

    def _randn(self, seed) -> np.ndarray:
        """torch.randn(shape, generator=torch.Generator().manual_seed(seed)), float32."""
        return self._generator.reseed(seed).randn(self.shape)

    def __call__(self, ta: float, tb: float) -> np.ndarray:
        """W(tb) - W(ta), float32 array of ``shape``."""
        start, end = self.root.start, self.root.end
        ta, tb = min(max(float(ta), start), end), min(max(float(tb), start), end)
        if ta > tb:
            raise ValueError(f"Brownian query times must satisfy ta <= tb, not {ta} > {tb}")
        if ta == tb:
            return np.zeros(self.shape, dtype=np.float32)
        nodes: list[_Node] = []
        self._locate(self.root, self._round(ta), self._round(tb), nodes)
        w = self._increment(nodes[0])
        for node in nodes[1:]:
            w = w + self._increment(node)
        return w

    def _locate(self, node: _Node, ta: float, tb: float, out: list[_Node]) -> None:
        """Append the nodes that tile [ta, tb], splitting where the tree has no edge yet (torchsde _loc_inner)."""
        while not (ta == node.start and tb == node.end):
            if node.midway is None:
                self._split(node, tb if ta == node.start else ta)
            elif tb <= node.midway:
                node = node.left
            elif ta >= node.midway:
                node = node.right
            else:
                self._locate(node.left, ta, node.midway, out)
                node, ta = node.right, node.midway
        out.append(node)

    def _split(self, node: _Node, point: float) -> None:
        """Halve ``node``, then the half holding ``point``, until ``point`` is a midpoint (torchsde _split)."""
        while True:
            self._split_exact(node, 0.5 * (node.end + node.start))
            if point == node.midway:
                return
            node = node.right if point > node.midway else node.left

    def _split_exact(self, node: _Node, midway: float) -> None:
        node.midway = self._round(midway)
        if node.parent is not None:
            node.key = 2 * node.parent.key + (0 if node.is_left else 1)
            node.depth = node.parent.depth + 1
        seeds = np.random.SeedSequence(entropy=self.entropy, spawn_key=(node.key, node.depth), pool_size=self.pool_size)
        node.w_seed = seeds.generate_state(4)[0]
        node.left = _Node(node.start, self._round(midway), node, True)
        node.right = _Node(self._round(midway), node.end, node, False)

    def _increment(self, node: _Node) -> np.ndarray:
        """W over ``node``: a Brownian bridge between its parent's ends, in torchsde's float32 operation order."""
        if node.parent is None:
            return self._root_w
        if node in self._cache:
            self._cache.move_to_end(node)
            return self._cache[node]
        parent = node.parent
        w = self._increment(parent)  # [shape] float32
        h_reciprocal = 1 / (parent.end - parent.start)
        left_diff, right_diff = parent.midway - parent.start, parent.end - parent.midway
        mean = w * np.float32(left_diff) * np.float32(h_reciprocal)
        std = math.sqrt(left_diff * right_diff * h_reciprocal)
        left_w = mean + self._randn(parent.w_seed) * np.float32(std)
        out = left_w if node.is_left else w - left_w
        self._cache[node] = out
        if len(self._cache) > 45:  # torchsde's default LRU size
            self._cache.popitem(last=False)
        return out


class BrownianTreeNoiseSampler:
    """Unit-variance noise for the step sigma -> sigma_next from Brownian trees over [sigma_min, sigma_max].

    As diffusers' BrownianTreeNoiseSampler: one tree over the whole batch for an int ``seed``, or one tree per batch
    item for a list of seeds (each image then gets the noise it would get alone with its own seed).
    """

    def __init__(self, shape: tuple[int, ...], sigma_min: float, sigma_max: float, seed: int | Sequence[int]):
        t0, t1 = np.float32(sigma_min), np.float32(sigma_max)
        self._sign = 1.0 if t0 < t1 else -1.0
        low, high = min(t0, t1), max(t0, t1)
        if isinstance(seed, (int, np.integer)):
            self._batched, seeds, tree_shape = False, [int(seed)], tuple(shape)
        else:
            if len(seed) != shape[0]:
                raise ValueError(f"{len(seed)} noise sampler seeds for a batch of {shape[0]}")
            self._batched, seeds, tree_shape = True, [int(s) for s in seed], tuple(shape[1:])
        self._trees = [BrownianInterval(float(low), float(high), tree_shape, s) for s in seeds]

    def __call__(self, sigma: float, sigma_next: float) -> np.ndarray:
        t0, t1 = np.float32(sigma), np.float32(sigma_next)
        sign = self._sign * (1.0 if t0 < t1 else -1.0)
        low, high = float(min(t0, t1)), float(max(t0, t1))
        w = np.stack([tree(low, high) for tree in self._trees]) * np.float32(sign)
        w = w if self._batched else w[0]
        return w / np.sqrt(np.abs(np.float32(t1 - t0)))
