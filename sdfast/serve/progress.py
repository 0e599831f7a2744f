"""A1111's /sdapi/v1/progress answer for one worker: the running job's step, ETA and live preview (one encode per step)."""
from __future__ import annotations

import base64
import time

from sdfast.runtime.images import png_bytes


class ProgressView:
    def __init__(self, worker):
        self.worker = worker
        self._previews: dict = {}  # (job id, step) -> the base64 PNG, so polls between two steps encode it once

    def answer(self, skip_current_image: bool = False) -> dict:
        stats = self.worker.stats
        job = stats.current
        fraction = job.step / job.total_steps if job and job.total_steps else 0.0
        elapsed = time.monotonic() - stats.current_started if job else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        current_image = None
        if job is not None and not skip_current_image:
            preview = self.worker.preview()  # the latest x0 through the family's latent-to-RGB map: no VAE call
            if preview is not None:
                key = (job.id, preview[0])
                if key not in self._previews:
                    self._previews.clear()
                    self._previews[key] = base64.b64encode(png_bytes(preview[1], None)).decode()
                current_image = self._previews[key]
        return {"progress": fraction, "eta_relative": eta, "current_image": current_image, "textinfo": None,
                "state": {"skipped": False, "interrupted": stats.interrupted, "job": f"job {job.id}" if job else "",
                          "job_count": stats.queued + (1 if job else 0), "job_timestamp": "0", "job_no": 0,
                          "sampling_step": job.step if job else 0, "sampling_steps": job.total_steps if job else 0}}

    def started_at(self) -> float | None:
        """When the running job started, as wall-clock time (comparable across processes), or None when idle."""
        stats = self.worker.stats
        return time.time() - (time.monotonic() - stats.current_started) if stats.current is not None else None
