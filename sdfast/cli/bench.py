"""sdfast bench: per-stage latency of every backend on one workload, with the CPU's peak beside it."""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from sdfast.errors import ConfigError

ALL_BACKENDS = ("cpu", "cuda", "tensorrt", "torch")
FORMATS = ("table", "md", "json", "csv")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine_dir", nargs="?", type=Path, help="an engine dir to measure (default: export --model first)")
    parser.add_argument("--model", help="export this first, cached: tiny (default), sd15, or a diffusers folder")
    parser.add_argument("--backends", default=",".join(ALL_BACKENDS),
                        help=f"comma-separated, from {', '.join(ALL_BACKENDS)}; unavailable ones are skipped with the reason (default: all)")
    parser.add_argument("--height", type=int, help="image height (with --model; with an engine dir it must match)")
    parser.add_argument("--width", type=int, help="image width (with --model; with an engine dir it must match)")
    parser.add_argument("--batch", type=int, help="images per call (with --model; with an engine dir it must match)")
    parser.add_argument("--steps", type=int, default=8, help="sampler steps of the end-to-end run (default 8)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per stage after one warm-up (default 5)")
    parser.add_argument("--format", default="table", choices=FORMATS, help="output format (default table)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here (the schema --merge reads)")
    parser.add_argument("--plot", type=Path, help="write a bar plot of per-stage latency by backend (PNG, needs matplotlib)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="measure nothing: show saved results (e.g. from two machines) side by side")


def run(args: argparse.Namespace) -> int:
    from sdfast.bench.report import BenchRun, merge, plot, render

    if args.merge:
        runs = merge([run for path in args.merge for run in BenchRun.load(path)])
    else:
        runs = [_measure(args)]
    if args.out:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(render(runs, "json") + "\n")
        except OSError as error:
            raise ConfigError(f"cannot write --out '{args.out}': {error.strerror or error}") from None
    if args.plot:
        _say(f"plot written to {plot(runs, args.plot)}")
    print(render(runs, args.format))
    return 0


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _check_args(args: argparse.Namespace) -> list[str]:
    if args.repeat < 1 or args.steps < 1:
        raise ConfigError("--repeat and --steps must be at least 1")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in ALL_BACKENDS]
    if unknown or not backends:
        raise ConfigError(f"unknown backend '{(unknown or [''])[0]}'; choose from {', '.join(ALL_BACKENDS)}")
    if args.engine_dir and args.model:
        raise ConfigError("give an engine dir or --model, not both")
    return list(dict.fromkeys(backends))


def backend_availability(name: str) -> tuple[bool, str]:
    """(usable here, why not) for a bench backend: sdfast's runtime backends, or diffusers itself ('torch')."""
    if name == "torch":
        missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
        return (not missing, f"{' and '.join(missing)} not installed (pip install 'sdfast[export]')" if missing else "")
    from sdfast.runtime.backends import get_backend

    return get_backend(name).available()


def _engines(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The engine dir to measure and, with --model, its twin without guidance (for the unguided U-Net step)."""
    from sdfast.runtime.manifest import read_manifest

    if args.engine_dir:
        manifest = read_manifest(args.engine_dir)
        geometry = manifest.geometry
        for key in ("height", "width", "batch"):
            wanted = getattr(args, key)
            if wanted is not None and wanted != geometry[key]:
                raise ConfigError(f"the engine dir was built for {key} {geometry[key]}, not {wanted}; export one at that size, or bench with --model")
        return args.engine_dir, None
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None:
        raise ConfigError("bench --model exports first and needs torch and diffusers (pip install 'sdfast[export]'); or pass an ENGINE_DIR")
    return _cached_engine(args, guidance=True), _cached_engine(args, guidance=False)


def _cached_engine(args: argparse.Namespace, guidance: bool) -> Path:
    from sdfast.bench.engines import cached_engine
    from sdfast.cli.progress import ElapsedLog

    return cached_engine(args.model or "tiny", args.height, args.width, args.batch or 1, guidance, _say, ElapsedLog("bench"))


def _measure(args: argparse.Namespace):
    from sdfast import __version__
    from sdfast.bench.hardware import CpuInfo, gpu_fp16_peak_tflops, gpu_name, measured_sgemm_gflops, theoretical_peak
    from sdfast.bench.report import BenchRun, Row
    from sdfast.runtime.manifest import read_manifest

    backends = _check_args(args)
    engines = _engines(args) if args.engine_dir else None  # an engine dir's geometry is checked before anything runs
    usable, skipped = [], []
    for name in backends:
        ok, why = backend_availability(name)
        (usable if ok else skipped).append(name if ok else {"backend": name, "reason": why})
    for skip in skipped:
        _say(f"skipping {skip['backend']}: {skip['reason']}")
    if not usable:
        raise ConfigError("no requested backend is available here: " + "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped))
    engine, unguided = engines or _engines(args)
    manifest = read_manifest(engine)

    cpu = CpuInfo.detect()
    peak = theoretical_peak(cpu)
    _say("measuring a large sgemm (numpy float32) and the FMA ceiling (and the int8 ceiling, for an int8 U-Net) ...")
    sgemm = measured_sgemm_gflops()
    from sdfast.bench.ceilings import measured_fma_gflops, measured_int8_gops
    from sdfast.export.builtin import cache_root
    from sdfast.runtime.int8_unet import INT8

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ceiling, ceiling_how = measured_fma_gflops(threads, cache_root() / "bench")
    int8 = {}  # the int8 ceiling, where an int8 U-Net will be measured against it
    if INT8 in manifest.components and "cpu" in usable:
        int8_ceiling, int8_how = measured_int8_gops(threads, cache_root() / "bench")
        int8 = {"int8_ceiling_gops": int8_ceiling, "int8_ceiling_how": int8_how}
    gpu = gpu_name()
    gpu_peak = gpu_fp16_peak_tflops(gpu)
    run = BenchRun(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command="sdfast bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        machine={"cpu": cpu.name, "cores": cpu.cores, "ghz": cpu.ghz, "platform": platform.platform(), "peak": peak.to_json(),
                 "sgemm_gflops": sgemm, "fma_ceiling_gflops": ceiling, "fma_ceiling_how": ceiling_how, **int8,
                 **({"gpu": gpu, "gpu_fp16_dense_tflops": gpu_peak} if gpu else {})},
        versions={"sdfast": __version__, "python": platform.python_version(), **_versions()},
        workload={"model": manifest.model_name, "height": manifest.geometry["height"], "width": manifest.geometry["width"],
                  "batch": manifest.geometry["batch"], "steps": args.steps, "repeat": args.repeat, "precision": manifest.data["precision"],
                  "engine": str(engine)},
        skipped=skipped,
    )
    for index, name in enumerate(usable, 1):
        _say(f"[{index}/{len(usable)}] {name}: load, stages x{args.repeat}, end to end at {args.steps} steps ...")
        command = [sys.executable, "-m", "sdfast.bench.measure", name, "--engine", str(engine), "--repeat", str(args.repeat),
                   "--steps", str(args.steps)]
        command += ["--peak-cpu", str(peak.fp32_gflops)]  # the measuring process picks the peak of where it ran
        if ceiling:
            command += ["--fma-ceiling", str(ceiling)]
        if int8.get("int8_ceiling_gops"):
            command += ["--int8-ceiling", str(int8["int8_ceiling_gops"])]
        if gpu_peak:
            command += ["--peak-gpu", str(gpu_peak * 1e3)]
        if unguided is not None and name != "torch":
            command += ["--unguided-engine", str(unguided)]
        child = subprocess.run(command, capture_output=True, text=True)
        try:
            answer = json.loads(child.stdout)
        except json.JSONDecodeError:
            tail = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
            answer = {"error": f"the measuring process died: {tail}"}
        if "error" in answer:
            _say(f"{name} failed: {answer['error']}")
            run.skipped.append({"backend": name, "reason": f"failed: {answer['error']}"})
            continue
        run.rows += [Row(backend=name, **row) for row in answer["rows"]]
        step = run.value(name, "unet_step_cfg") or run.value(name, "unet_step")
        _say(f"[{index}/{len(usable)}] {name}: U-Net step {step.median:.1f} ms" if step else f"{name}: done")
    return run


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("onnxruntime", "onnxruntime-gpu", "numpy", "torch", "diffusers", "tensorrt"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found
