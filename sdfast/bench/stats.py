"""Repeated timing: warm-up, then samples summarised as median, p90 and min-max."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Summary:
    median: float
    p90: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> "Summary":
        ordered = sorted(samples)
        # p90 by the nearest-rank method: the smallest sample with at least 90% of samples at or below it
        p90 = ordered[max(0, -(-9 * len(ordered) // 10) - 1)]
        return cls(statistics.median(ordered), p90, ordered[0], ordered[-1], len(ordered))


def time_ms(run: Callable[[], object], repeat: int, warmup: int = 1) -> Summary:
    """Milliseconds per call of ``run`` over ``repeat`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1e3)
    return Summary.of(samples)
