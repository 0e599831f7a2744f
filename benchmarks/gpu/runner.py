"""The GPU check's machinery: timed stages that report failure and let the next one run, logged commands, the summary.

A stage is a function of the running ``Check``; it returns its figures as a dict, or raises. Every command it
runs goes through ``Check.sh``, which logs the command and its output and enforces what is left of the stage's
time budget and of the whole check's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


class StageError(Exception):
    """A stage's one-line failure: the command's last meaningful line, or what was missing; with what it did measure."""

    def __init__(self, message: str, figures: dict | None = None):
        super().__init__(message)
        self.figures = figures or {}


class StageTimeout(StageError):
    pass


@dataclass
class StageResult:
    name: str
    status: str  # ok, failed, timeout, skipped
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    error: str = ""
    commands: list[str] = field(default_factory=list)


_MARKERS = ("Error", "error:", "FAILED", "failed")


def _error_line(text: str) -> str | None:
    """The last error-looking line of ``text``, or None."""
    for line in reversed([line.strip() for line in text.strip().splitlines() if line.strip()]):
        if any(marker in line for marker in _MARKERS) and not line.startswith("Traceback"):
            return line[:300]
    return None


def failure_line(stderr: str, stdout: str) -> str:
    """What went wrong, in one line: an error line of stderr (a traceback's last), else of stdout (pytest's summary),
    else the last line of either."""
    found = _error_line(stderr) or _error_line(stdout)
    if found:
        return found
    lines = [line.strip() for line in (stderr.strip() or stdout.strip()).splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


class Check:
    """Runs stages in order within a total time budget, logging every command to one file."""

    def __init__(self, log_path: Path, env: dict[str, str], cwd: Path, total_budget_s: float | None):
        self.log = open(log_path, "a", buffering=1)
        self.env, self.cwd = env, cwd
        self.deadline = time.monotonic() + total_budget_s if total_budget_s else None
        self.results: list[StageResult] = []
        self._stage_deadline: float | None = None
        self._commands: list[str] = []

    def say(self, message: str) -> None:
        line = f"[gpu-check {time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def sh(self, command: list[str], *, env: dict[str, str] | None = None) -> str:
        """Run a command within the time left; its stdout, or StageError with its last meaningful line."""
        shown = " ".join(command)
        self._commands.append(shown)
        self.log.write(f"\n$ {shown}\n")
        left = None if self._stage_deadline is None else self._stage_deadline - time.monotonic()
        if left is not None and left <= 0:
            raise StageTimeout("no time left in this stage's budget")
        try:  # a session of its own: on a timeout the whole tree goes (peer workers, compilers, bench children)
            child = subprocess.Popen(command, cwd=self.cwd, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        except OSError as error:
            raise StageError(f"cannot run {command[0]}: {error.strerror or error}") from None
        try:
            stdout, stderr = child.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            stdout, stderr = child.communicate()
            self.log.write(stdout + stderr)
            raise StageTimeout(f"`{' '.join(command[:4])} ...` ran past the stage's budget ({left:.0f} s left)") from None
        self.log.write(stdout + stderr)
        if child.returncode:
            raise StageError(f"exit {child.returncode}: {failure_line(stderr, stdout)}")
        return stdout

    def run_stage(self, name: str, stage: Callable[["Check"], dict], budget_s: float) -> StageResult:
        now = time.monotonic()
        if self.deadline is not None and self.deadline - now < 5:
            result = StageResult(name, "skipped", error="the check's total time budget is spent")
        else:
            self._stage_deadline = now + (budget_s if self.deadline is None else min(budget_s, self.deadline - now))
            self._commands = []
            self.say(f"{name}: start (budget {self._stage_deadline - now:.0f} s)")
            self.log.write(f"\n===== {name} =====\n")
            try:
                result = StageResult(name, "ok", figures=stage(self) or {})
            except StageTimeout as error:
                result = StageResult(name, "timeout", error=str(error))
            except StageError as error:
                result = StageResult(name, "failed", error=str(error), figures=error.figures)
            except Exception as error:  # noqa: BLE001 - a bug in one stage must not stop the others
                self.log.write(traceback.format_exc())
                result = StageResult(name, "failed", error=f"{type(error).__name__}: {error}")
            result.seconds = round(time.monotonic() - now, 1)
            result.commands = list(self._commands)
        self.say(f"{name}: {result.status} in {result.seconds:.0f} s" + (f": {result.error}" if result.error else ""))
        self.results.append(result)
        return result

    def write(self, json_path: Path, header: dict) -> str:
        """Write the JSON record and return the summary table (Markdown), which the caller prints last."""
        record = {**header, "stages": [asdict(r) for r in self.results]}
        json_path.write_text(json.dumps(record, indent=2) + "\n")
        table = summary_table(self.results)
        json_path.with_suffix(".md").write_text(f"{header.get('title', 'GPU check')}\n\n{table}\n")
        return table


def summary_table(results: list[StageResult]) -> str:
    lines = ["| stage | status | s | figures or error |", "|---|---|---:|---|"]
    for r in results:
        shown = r.error if r.status != "ok" else "; ".join(f"{k} {_short(v)}" for k, v in r.figures.items() if k in _headline(r))
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {shown.replace('|', '/')} |")
    return "\n".join(lines)


def _headline(result: StageResult) -> list[str]:
    """The figures the table shows: those the stage named as its headline, else all of them."""
    return result.figures.get("_headline") or [k for k in result.figures if not k.startswith("_")]


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_short(v)}" for k, v in value.items())
    return str(value)


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")
