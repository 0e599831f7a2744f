"""The CPU's measured ceilings, fp32 FMA (fma_peak.c) and int8 dot products (int8_peak.c), each built with the
machine's C compiler and run on every core.

The nominal peak (cores x clock x FMA units x lanes x 2) overstates what the cores sustain: AVX-512 lowers the clock,
and two vCPUs may share a core. A ceiling is what 12 independent chains of the instruction per thread reach, so a
backend's achieved fraction of it says how much of the arithmetic the hardware can do is used.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

OUTPUT = re.compile(r"^(\d+) threads: ([0-9.]+) G(?:FL)?OP/s \(([^;]+); ")
HARNESS = "peak_harness.h"  # the timing and threads both programs include


def measured_fma_gflops(threads: int, cache: Path) -> tuple[float | None, str]:
    """(median fp32 GFLOP/s of three runs on ``threads`` threads, how it was measured), or (None, why it was not)."""
    return _measured("fma_peak", threads, cache, "12 independent FMA chains")


def measured_int8_gops(threads: int, cache: Path) -> tuple[float | None, str]:
    """(median int8 GOP/s of three runs, how it was measured), or (None, why not): u8 x s8 products, VNNI where present."""
    return _measured("int8_peak", threads, cache, "12 independent u8 x s8 dot-product chains")


def _measured(program: str, threads: int, cache: Path, chains: str) -> tuple[float | None, str]:
    """Build ``program``.c for this CPU (once, cached) and run it three times on ``threads`` threads."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None, f"no C compiler to build sdfast/bench/{program}.c"
    package = resources.files("sdfast.bench")
    sources = {name: package.joinpath(name).read_bytes() for name in (f"{program}.c", HARNESS)}
    # built with -march=native: the binary is this CPU's (a cache shared between machines must not hand it to another)
    binary = cache / f"{program}-{hashlib.sha256(b''.join(sources.values()) + _cpu_identity()).hexdigest()[:12]}"
    if not binary.is_file():
        try:
            why = _build(compiler, program, sources, binary)
        except OSError as error:  # an unwritable cache, a compiler that cannot start: the ceiling is not measured
            why = f"{program}.c could not be built in {cache} ({error.strerror or error})"
        if why:
            return None, why
    figures = []
    for _ in range(3):
        try:
            ran = subprocess.run([str(binary), str(threads)], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as error:
            return None, f"{program} did not run ({type(error).__name__})"
        match = OUTPUT.match(ran.stdout.strip())
        if ran.returncode or not match:
            return None, f"{program} exited {ran.returncode}" if ran.returncode else f"{program} printed no rate"
        figures.append(float(match.group(2)))
    median = sorted(figures)[1]
    return median, f"measured: {threads} threads x {chains}, {match.group(3)} (sdfast/bench/{program}.c), median of 3 runs"


def _build(compiler: str, program: str, sources: dict[str, bytes], binary: Path) -> str:
    """Compile ``program``.c for this CPU into ``binary``; '' when built, else why not."""
    binary.parent.mkdir(parents=True, exist_ok=True)
    # built in a folder of this process's own, the binary renamed into place: another process (a parallel test, a
    # second bench) may be running or building the same binary
    build = Path(tempfile.mkdtemp(prefix=f"{program}.", dir=binary.parent))
    try:
        for name, text in sources.items():
            (build / name).write_bytes(text)
        built = subprocess.run([compiler, "-O3", "-march=native", "-pthread", str(build / f"{program}.c"), "-o",
                                str(build / program)], capture_output=True, text=True)
        if built.returncode:
            first = (built.stderr.strip().splitlines() or ["?"])[0]
            return f"{program}.c did not build here ({first})"
        os.replace(build / program, binary)
        return ""
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _cpu_identity() -> bytes:
    """The CPU's model name and flags, as /proc/cpuinfo gives them (empty elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return b""
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))})).encode()
