"""The CPU's measured FMA ceiling: fma_peak.c, built with the machine's C compiler and run on every core.

The nominal peak (cores x clock x FMA units x lanes x 2) overstates what the cores sustain: AVX-512 lowers the clock,
and two vCPUs may share a core. The ceiling is what 12 independent FMA chains per thread reach, so a backend's
achieved fraction of it says how much of the arithmetic the hardware can do is used.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

OUTPUT = re.compile(r"^(\d+) threads: ([0-9.]+) GFLOP/s")


def measured_fma_gflops(threads: int, cache: Path) -> tuple[float | None, str]:
    """(median GFLOP/s of three runs on ``threads`` threads, how it was measured), or (None, why it was not)."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None, "no C compiler to build sdfast/bench/fma_peak.c"
    source = resources.files("sdfast.bench").joinpath("fma_peak.c").read_bytes()
    # built with -march=native: the binary is this CPU's (a cache shared between machines must not hand it to another)
    binary = cache / f"fma_peak-{hashlib.sha256(source + _cpu_identity()).hexdigest()[:12]}"
    if not binary.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        # the source and the binary under names of this process's own, the binary renamed into place: another process
        # (a parallel test, a second bench) may be running or building the same binary
        source_path = cache / f"fma_peak.{os.getpid()}.c"
        source_path.write_bytes(source)
        partial = binary.with_name(f"{binary.name}.{os.getpid()}.partial")
        try:
            built = subprocess.run([compiler, "-O3", "-march=native", "-pthread", str(source_path), "-o", str(partial)],
                                   capture_output=True, text=True)
            if built.returncode:
                first = (built.stderr.strip().splitlines() or ["?"])[0]
                return None, f"fma_peak.c did not build here ({first})"
            os.replace(partial, binary)
        finally:
            source_path.unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
    figures = []
    for _ in range(3):
        try:
            ran = subprocess.run([str(binary), str(threads)], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as error:
            return None, f"fma_peak did not run ({type(error).__name__})"
        match = OUTPUT.match(ran.stdout.strip())
        if ran.returncode or not match:
            return None, f"fma_peak exited {ran.returncode}"
        figures.append(float(match.group(2)))
    median = sorted(figures)[1]
    return median, f"measured: {threads} threads x 12 independent FMA chains (sdfast/bench/fma_peak.c), median of 3 runs"


def _cpu_identity() -> bytes:
    """The CPU's model name and flags, as /proc/cpuinfo gives them (empty elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return b""
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))})).encode()
