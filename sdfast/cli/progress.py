"""Progress lines on stderr with elapsed time; library code reports through callbacks, the CLI prints."""
from __future__ import annotations

import sys
import time


class ElapsedLog:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {self.prefix}: {message}", file=sys.stderr, flush=True)
