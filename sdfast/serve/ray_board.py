"""What the Ray Serve replicas share through one actor, so that A1111's progress and interrupt and the Prometheus
metrics work across replicas: each replica's /sdapi/v1/progress answer and metrics, and a count of interrupts."""
from __future__ import annotations

import time

BOARD_NAME = "sdfast-board-{app}"  # one board per Serve application
REPORT_EVERY_S = 0.25  # how often a replica reports, and so how soon it sees an interrupt
STALE_S = 5.0  # a replica not heard from for this long (stopped, killed) is left out


class Board:
    """The replicas' reports (a Ray actor: ``ray.remote(Board)``)."""

    def __init__(self):
        self.reports: dict[str, tuple[float, dict, float | None, str]] = {}  # replica -> (seen, progress, started, metrics)
        self.interrupts, self.interrupted_at = 0, 0.0

    def report(self, replica: str, progress: dict, started: float | None, metrics: str) -> tuple[int, float]:
        """Store one replica's state; returns the interrupt count and the last interrupt's wall-clock time (a replica
        that sees the count grow interrupts its job, if that job started before the interrupt)."""
        self.reports[replica] = (time.monotonic(), progress, started, metrics)
        return self.interrupts, self.interrupted_at

    def interrupt(self) -> int:
        self.interrupts, self.interrupted_at = self.interrupts + 1, time.time()
        return self.interrupts

    def live(self) -> dict[str, tuple[dict, float | None, str]]:
        now = time.monotonic()
        self.reports = {replica: report for replica, report in self.reports.items() if now - report[0] < STALE_S}
        return {replica: report[1:] for replica, report in self.reports.items()}


def merged_progress(live: dict[str, tuple[dict, float | None, str]], skip_current_image: bool) -> dict | None:
    """A1111's progress answer over every replica: the job that started first (A1111 runs one at a time), the jobs of
    all replicas counted; None when no replica has reported."""
    if not live:
        return None
    running = sorted((started, replica) for replica, (_, started, _) in live.items() if started is not None)
    replica = running[0][1] if running else next(iter(live))
    answer = {**live[replica][0], "state": dict(live[replica][0]["state"])}
    answer["state"]["job_count"] = sum(progress["state"]["job_count"] for progress, _, _ in live.values())
    answer["state"]["interrupted"] = any(progress["state"]["interrupted"] for progress, _, _ in live.values())
    if running:
        answer["state"]["job"] = f"{answer['state']['job']} on {replica}"
    if skip_current_image:
        answer["current_image"] = None
    return answer


def merged_metrics(texts: dict[str, str]) -> str:
    """The replicas' Prometheus expositions as one, each sample labelled with its replica; each family once, its
    samples together (as the text format asks)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, list[str]]] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created"):  # prometheus_client's creation times: one per replica says nothing merged
                continue
            kind = family.type
            help_text, _, lines = families.setdefault(family.name, (family.documentation, kind, []))
            for sample in family.samples:
                labels = {**sample.labels, "replica": replica}
                body = ",".join(f'{key}="{_escaped(value)}"' for key, value in labels.items())
                lines.append(f"{sample.name}{{{body}}} {_number(sample.value)}")
    out = []
    for name, (help_text, kind, lines) in families.items():
        shown = f"{name}_total" if kind == "counter" else name  # the text format names a counter by its samples
        help_line = str(help_text).replace("\\", "\\\\").replace("\n", "\\n")  # HELP escapes only these two
        out += [f"# HELP {shown} {help_line}", f"# TYPE {shown} {kind}", *lines]
    return "\n".join(out) + "\n"


def _escaped(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
