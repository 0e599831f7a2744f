"""This machine's CPU, its theoretical FLOP/s peak derived from the ISA, and a measured large-matmul figure."""
from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class CpuInfo:
    name: str
    vendor: str
    family: int
    model: int
    cores: int  # physical cores this process may use (logical CPUs where the OS does not say)
    ghz: float
    flags: frozenset[str]

    @classmethod
    def detect(cls, cpuinfo: str | None = None) -> "CpuInfo":
        if cpuinfo is None:
            try:
                cpuinfo = Path("/proc/cpuinfo").read_text()
            except OSError:
                cpuinfo = ""
        blocks = [dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines()))
                  for block in cpuinfo.split("\n\n") if block.strip()]
        fields = blocks[0] if blocks else {}  # the first processor's block describes the model
        name = fields.get("model name", platform.processor() or "unknown")
        nominal = re.search(r"@\s*([\d.]+)\s*GHz", name)
        ghz = float(nominal.group(1)) if nominal else float(fields.get("cpu MHz", 0) or 0) / 1000
        usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        # physical cores: hyperthreads of one core share its FMA units, so count (package, core) pairs
        pairs = {(b.get("physical id"), b.get("core id")) for b in blocks if b.get("processor", "").isdigit() and int(b["processor"]) in usable}
        cores = len(pairs) if pairs and all(None not in pair for pair in pairs) else len(usable)
        return cls(name, fields.get("vendor_id", ""), int(fields.get("cpu family", 0) or 0), int(fields.get("model", 0) or 0),
                   cores, ghz, frozenset(fields.get("flags", "").split()))


@dataclass(frozen=True)
class Peak:
    fp32_gflops: float
    bf16_gflops: float | None  # None where the CPU has no bf16 arithmetic
    int8_gops: float | None  # None without VNNI
    derivation: str

    def to_json(self) -> dict:
        return asdict(self)


def fma_units(cpu: CpuInfo) -> tuple[int, str]:
    """FMA pipes per core at the widest vector width, from the microarchitecture (the ISA flags cannot tell)."""
    if cpu.vendor == "AuthenticAMD":
        if cpu.family >= 0x1A:
            return 2, "Zen 5: two 512-bit FMA pipes"
        if cpu.family == 0x19 and "avx512f" in cpu.flags:
            return 1, "Zen 4: AVX-512 on two 256-bit FMA pipes, one 512-bit FMA per cycle"
        return 2, "Zen 1-3: two 256-bit FMA pipes"
    if "avx512f" in cpu.flags:
        return 2, "Intel Xeon with AVX-512: two 512-bit FMA units (ports 0+1 fused and port 5)"
    return 2, "two FMA units (assumed)"


def theoretical_peak(cpu: CpuInfo) -> Peak:
    """cores x GHz x FMA units x fp32 lanes x 2 FLOPs per FMA; bf16 doubles the lanes (vdpbf16ps), VNNI int8 quadruples them."""
    lanes = 16 if "avx512f" in cpu.flags else 8 if "avx2" in cpu.flags else 4
    isa = "AVX-512" if lanes == 16 else "AVX2" if lanes == 8 else "SSE"
    units, why = fma_units(cpu)
    fp32 = cpu.cores * cpu.ghz * units * lanes * 2
    has_bf16 = "avx512_bf16" in cpu.flags or "amx_bf16" in cpu.flags
    has_vnni = "avx512_vnni" in cpu.flags or "avx_vnni" in cpu.flags
    derivation = (f"{cpu.cores} cores x {cpu.ghz:.2f} GHz x {units} FMA/cycle x {lanes} fp32 lanes ({isa}) x 2 FLOP/FMA "
                  f"= {fp32:.0f} GFLOP/s fp32 [{why}; nominal clock, AVX-512 may run lower]")
    if has_bf16:
        derivation += "; bf16 x2 (avx512_bf16 dot products)" + (", AMX tiles not counted" if "amx_bf16" in cpu.flags else "")
    else:
        derivation += "; no bf16 arithmetic (no avx512_bf16 or amx_bf16: bf16 would be emulated)"
    if has_vnni:
        derivation += "; int8 x4 (VNNI vpdpbusd)"
    return Peak(round(fp32, 1), round(2 * fp32, 1) if has_bf16 else None, round(4 * fp32, 1) if has_vnni else None, derivation)


def measured_sgemm_gflops(n: int = 2048, repeat: int = 5) -> float:
    """numpy's float32 matmul (its BLAS, all threads) on n x n matrices: median GFLOP/s of ``repeat`` calls."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - started)
    return round(2 * n**3 / sorted(seconds)[len(seconds) // 2] / 1e9, 1)


# Dense fp16 tensor-core peaks (no structured sparsity), TFLOP/s, from NVIDIA's data sheets. The most specific name
# comes first: nvidia-smi says "NVIDIA H100 PCIe" for the PCIe part and "NVIDIA H100 80GB HBM3" for the SXM one.
GPU_FP16_DENSE_TFLOPS = (
    ("H200", 989.4),  # H200 SXM data sheet: 1,979 with sparsity
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM
    ("A100", 312.0),
    ("L40S", 362.05),
    ("L40", 181.05),
    ("L4", 121.0),
    ("A10G", 70.0),  # AWS's A10G: fp16 tensor dense as AWS states it
    ("A10", 125.0),
    ("RTX 4090", 165.2),  # fp16 with fp32 accumulate, which cuBLAS and cuDNN use for fp16 convolutions
)


def gpu_fp16_peak_tflops(gpu_name: str | None) -> float | None:
    """The dense fp16 tensor peak of a GPU named as nvidia-smi names it; None for a GPU not in the table."""
    for marker, tflops in GPU_FP16_DENSE_TFLOPS:  # whole words: "L4" is not in "NVIDIA L40"
        if gpu_name and re.search(rf"(?<![A-Za-z0-9]){re.escape(marker)}(?![A-Za-z0-9])", gpu_name, re.IGNORECASE):
            return tflops
    return None


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi, or None without one (or without nvidia-smi)."""
    import subprocess

    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = listing.stdout.strip().splitlines() if listing.returncode == 0 else []
    return lines[0].strip() if lines else None
