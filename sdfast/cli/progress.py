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


class LoadBars:
    """Pipeline.load's progress on stderr: the files hashed (bytes), then the engines created (components)."""

    _LABELS = {"verify": ("verifying", "B"), "load": ("loading engines", "engine")}

    def __init__(self):
        self.bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            label, unit = self._LABELS.get(stage, (stage, "it"))
            bar = self.bars[stage] = tqdm(total=total, desc=label, unit=unit, unit_scale=unit == "B", file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            self.close(stage)

    def close(self, stage: str | None = None) -> None:
        for name in [stage] if stage else list(self.bars):
            bar = self.bars.pop(name, None)
            if bar is not None:
                bar.close()
