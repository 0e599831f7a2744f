"""The GPU check: sdfast's kernels, GPU backends and device loop against the torch peers, on one NVIDIA GPU, in one run.

    python benchmarks/gpu/check.py [--part first|full] [--out DIR] [--work DIR] [--wheels DIR] [--budget S]
    python benchmarks/gpu/check.py --rehearse      # on a CPU machine: every CPU-side step, at the tiny model's size

Parts (each stage is timed; a stage that fails or overruns is reported and the next one still runs):
- first, needing no onnxruntime-gpu: the wheels, environment, kernels (CMake, for the GPU found), pytest -m gpu,
  the built-in models, and the torch peers (diffusers fp16 with SDPA, and with torch.compile): the figures sdfast
  must beat;
- full (the default): the same wheels, environment, kernels and tests (now with the cuda backend), fp16 and fp32
  engines, sdfast bench on cuda (tensorrt where installed) and torch at 20 and 50 steps, fp16 PSNR against the fp32
  CPU image, and every GPU peer with sdfast in one alternating run (the torch peers again, measured beside sdfast).
The machine needs no package registry: --wheels DIR installs the wheels found there (pip --no-index --target) and
puts them first on the path of every step. Results: DIR/gpu_check.json, DIR/gpu_check.md (the summary table,
printed last) and DIR/gpu_check.log (every command and its output).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import re
import shutil
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from runner import Check, StageError  # noqa: E402

# first: what needs no onnxruntime-gpu; full: everything, the torch peers measured inside the alternating GPU run
PART_STAGES = {
    "first": ("wheels", "environment", "kernels", "pytest_gpu", "models", "torch_peers"),
    "full": ("wheels", "environment", "kernels", "pytest_gpu", "models", "export", "bench", "fp16_psnr", "gpu_peers"),
}
# seconds each stage may take at most on an H200 machine (16 cores); the whole check is held to --budget besides
BUDGETS = {"wheels": 120, "environment": 60, "kernels": 150, "pytest_gpu": 180, "models": 150, "torch_peers": 300, "export": 360,
           "bench": 240, "fp16_psnr": 200, "gpu_peers": 360}


@dataclass
class Plan:
    """What the stages run: the real GPU workload, or its CPU rehearsal at the tiny model's size."""

    models: list[str]
    gpu_backend: str = "cuda"
    bench_backends: str = "cuda,tensorrt,torch"
    long_bench_backends: str = "cuda,tensorrt"
    torch_peers: str = "diffusers-cuda-fp16,diffusers-compile"
    gpu_peers: str = "gpu"
    steps: tuple[int, int] = (20, 50)
    psnr_steps: int = 10
    psnr_seeds: int = 2
    repeat: int = 5
    rounds: int = 5
    calls: int = 3

    @classmethod
    def rehearsal(cls) -> "Plan":
        return cls(models=["tiny"], gpu_backend="cpu", bench_backends="cpu,torch", long_bench_backends="cpu",
                   torch_peers="diffusers", gpu_peers="diffusers,sdfast-cpu", steps=(2, 3), psnr_steps=2, psnr_seeds=1,
                   repeat=1, rounds=1, calls=1)


class GpuCheck(Check):
    """The stages, in the order PART_STAGES gives; each records its figures and what later stages need."""

    def __init__(self, plan: Plan, work: Path, wheels: Path | None, **kwargs):
        super().__init__(**kwargs)
        self.plan, self.work, self.wheel_dir = plan, work, wheels
        self.gpu: dict = {}
        self.model_dirs: dict[str, str] = {}
        self.engines: dict[tuple[str, str], Path] = {}  # (model, precision) -> engine dir

    def python(self, *args: str) -> str:
        return self.sh([sys.executable, *args])

    def size(self, model: str) -> int:
        from sdfast.export.builtin import BUILTIN_MODELS

        return BUILTIN_MODELS[model].default_size  # the models stage made only built-in ones

    # --- part one: no onnxruntime-gpu needed ---

    def wheels(self) -> dict:
        """Install the wheels brought to this machine (pip --no-index --target), first on every later step's path."""
        if self.wheel_dir is None:
            return {"installed": "none asked for (--wheels)"}
        found = sorted(str(p) for p in self.wheel_dir.glob("*.whl"))
        if not found:
            raise StageError(f"--wheels {self.wheel_dir} holds no .whl file")
        self.sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
                 "--target", str(self.work / "site"), *found])
        importlib.invalidate_caches()  # the site folder is on this process's path from the start, empty until now
        return {"installed": [Path(p).name for p in found]}

    def environment(self) -> dict:
        figures: dict = {}
        try:
            query = self.sh(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"])
            name, driver, capability, memory = [f.strip() for f in query.strip().splitlines()[0].split(",")]
            self.gpu = {"name": name, "driver": driver, "compute_capability": capability, "memory": memory}
        except (StageError, ValueError, IndexError) as error:
            self.gpu = {"name": None, "why": str(error)}
        figures["gpu"] = self.gpu
        probe = ("import importlib, importlib.metadata as m, json, sys\nout = {}\n"
                 "for p in ('torch','diffusers','transformers','onnx','onnxruntime','onnxruntime-gpu','tensorrt','cupy-cuda13x',"
                 "'cupy-cuda12x','cuda-python','cuda-bindings','tokenizers','numpy','sdfast'):\n"
                 "    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: pass\n"
                 "try:\n    import torch; out['torch_cuda'] = torch.version.cuda; out['torch_sees_gpu'] = torch.cuda.is_available()\n"
                 "except Exception as e: out['torch_error'] = str(e)[:200]\n"
                 "try:\n    import onnxruntime as ort; out['ort_providers'] = ort.get_available_providers()\n"
                 "except Exception as e: out['ort_error'] = str(e)[:200]\n"
                 "sys.stdout.write(json.dumps(out))")
        figures["versions"] = json.loads(self.python("-c", probe))
        for tool in ("nvcc", "cmake"):
            if shutil.which(tool):
                figures[tool] = self.sh([tool, "--version"]).strip().splitlines()[-1 if tool == "nvcc" else 0]
        from sdfast.bench.hardware import gpu_fp16_peak_tflops

        figures["fp16_dense_peak_tflops"] = gpu_fp16_peak_tflops(self.gpu.get("name"))
        figures["_headline"] = ["gpu", "fp16_dense_peak_tflops"]
        return figures

    def kernels(self) -> dict:
        if not shutil.which("nvcc") or not shutil.which("cmake"):
            raise StageError("needs nvcc and cmake on the PATH")
        capability = (self.gpu.get("compute_capability") or "9.0").replace(".", "")  # no GPU (a rehearsal): the H200's
        build = self.work / "build"
        self.sh(["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", f"-DSDFAST_CUDA_ARCHITECTURES={capability}",
                 "-DSDFAST_BUILD_TESTS=OFF"])
        self.sh(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)])
        library = build / "libsdfast_kernels.so"
        if not library.is_file():
            raise StageError(f"CMake built no {library.name} (no CUDA compiler found by CMake?)")
        self.env["SDFAST_NATIVE_LIB"] = str(library)
        loaded = self.python("-c", "from sdfast.runtime.native import load_kernels; print(load_kernels() is not None)").strip()
        return {"architecture": f"sm_{capability}", "library_kib": library.stat().st_size // 1024, "loads": loaded == "True"}

    def pytest_gpu(self) -> dict:
        report = self.work / "pytest_gpu.xml"
        report.unlink(missing_ok=True)
        error = None
        try:
            self.python("-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={report}")
        except StageError as failed:
            error = failed
        if not report.is_file():
            raise error or StageError("pytest wrote no report")
        figures = junit_counts(report)
        if error is not None:
            raise StageError(f"{figures['failed']} failed: {'; '.join(figures['failures'][:3]) or error}", figures)
        if self.gpu.get("name") and not figures["passed"]:
            raise StageError(f"a GPU is here but every gpu test skipped: {'; '.join(figures['skip_reasons'])[:300]}", figures)
        return figures

    def models(self) -> dict:
        from sdfast.export.builtin import BUILTIN_MODELS

        figures = {}
        for model in self.plan.models:
            if model not in BUILTIN_MODELS:
                figures[model] = "not a built-in model yet"
                continue
            self.model_dirs[model] = self.python("-c", f"from sdfast.export.builtin import ensure_builtin; print(ensure_builtin({model!r}))").strip()
            figures[model] = self.model_dirs[model]
        if not self.model_dirs:
            raise StageError("no built-in model could be made", figures)
        return figures

    def torch_peers(self) -> dict:
        return self._peers(self.plan.torch_peers, "torch")

    # --- part two: onnxruntime-gpu (and TensorRT where installed) ---

    def export(self) -> dict:
        figures = {}
        for model in self.model_dirs:
            size = str(self.size(model))
            for precision in ("fp16", "fp32"):  # fp16 runs on the GPU; fp32 is the CPU reference of the PSNR
                out = self.work / "engines" / f"{model}-{size}-{precision}"
                self.python("-m", "sdfast", "export", "--model", model, "--height", size, "--width", size, "--precision", precision,
                            "--no-cpu-variant", "--out", str(out), "--force")
                self.engines[(model, precision)] = out
                manifest = json.loads((out / "manifest.json").read_text())
                parity = manifest["components"]["unet"].get("parity", {})
                figures[f"{model}_{precision}"] = {"unet_parity_max_rel": parity.get("max_rel"), "passed": parity.get("passed"),
                                                   "export_s": manifest["components"]["unet"].get("export_seconds")}
        return figures

    def bench(self) -> dict:
        figures = {}
        for model in self.model_dirs:
            engine = self._engine(model, "fp16")
            for steps, backends, repeat in ((self.plan.steps[0], self.plan.bench_backends, self.plan.repeat),
                                            (self.plan.steps[1], self.plan.long_bench_backends, max(1, self.plan.repeat // 2))):
                out = self.work / f"bench_{model}_{steps}.json"
                self.python("-m", "sdfast", "bench", str(engine), "--backends", backends, "--steps", str(steps),
                            "--repeat", str(repeat), "--format", "md", "--out", str(out))
                figures[f"{model}_{steps}_steps"] = bench_figures(json.loads(out.read_text()))
        return figures

    def fp16_psnr(self) -> dict:
        figures = {}
        for model in self.model_dirs:
            out = self.work / f"fp16_psnr_{model}.json"
            self.python(str(REPO / "benchmarks" / "fp16_psnr.py"), "--fp32", str(self._engine(model, "fp32")),
                        "--fp16", str(self._engine(model, "fp16")), "--backend", self.plan.gpu_backend,
                        "--steps", str(self.plan.psnr_steps), "--seeds", str(self.plan.psnr_seeds), "--out", str(out))
            figures[model] = json.loads(out.read_text())["psnr_db"]
        return figures

    def gpu_peers(self) -> dict:
        return self._peers(self.plan.gpu_peers, "gpu")

    # --- helpers ---

    def _engine(self, model: str, precision: str) -> Path:
        if (model, precision) not in self.engines:
            raise StageError(f"no {precision} engine of {model}: the export stage did not make it")
        return self.engines[(model, precision)]

    def _peers(self, peers: str, label: str) -> dict:
        if not self.model_dirs:
            raise StageError("no model: the models stage failed")
        figures, measured = {}, 0
        for model in self.model_dirs:
            size = str(self.size(model))
            out = self.work / f"peers_{label}_{model}.json"
            command = [str(REPO / "benchmarks" / "compare_peers.py"), "--model", model, "--height", size, "--width", size,
                       "--peers", peers, "--peer-python", sys.executable, "--rounds", str(self.plan.rounds),
                       "--calls", str(self.plan.calls), "--e2e-steps", str(self.plan.steps[0]), "--out", str(out)]
            if (model, "fp16") in self.engines:
                command += ["--gpu-engine", str(self.engines[(model, "fp16")])]
            if (model, "fp32") in self.engines:
                command += ["--engine", str(self.engines[(model, "fp32")])]
            self.python(*command)
            record = json.loads(out.read_text())
            figures[model] = {name: {"unet_ms": r["median_ms"], "e2e_ms": r.get("e2e", {}).get("median_ms"), "load_s": r["load_s"]}
                              for name, r in record["results"].items()}
            figures[f"{model}_not_run"] = record["not_run"]
            measured += len(record["results"])
        if not measured:
            raise StageError("no peer ran: " + "; ".join(f"{k}: {v}" for m in self.model_dirs for k, v in figures[f"{m}_not_run"].items()), figures)
        return figures


def junit_counts(report: Path) -> dict:
    """Counts, failing tests and skip reasons from pytest's JUnit XML."""
    root = ElementTree.parse(report).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failures, skips = [], {}
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            found = case.find(kind)
            if found is not None:
                failures.append(f"{case.get('name')}: {(found.get('message') or '').splitlines()[0][:160] if found.get('message') else kind}")
        skipped = case.find("skipped")
        if skipped is not None:
            reason = re.sub(r"^Skipped: ", "", skipped.get("message") or "")[:160]
            skips[reason] = skips.get(reason, 0) + 1
    total, skipped_n = int(suite.get("tests", 0)), sum(skips.values())
    return {"tests": total, "passed": total - len(failures) - skipped_n, "failed": len(failures), "skipped": skipped_n,
            "failures": failures, "skip_reasons": skips, "_headline": ["tests", "passed", "failed", "skipped"]}


BENCH_HEADLINE = ("unet_step_cfg", "unet_step_in_loop", "host_overhead_per_step", "host_queue_per_step", "end_to_end", "load",
                  "peak_device_memory", "unet_gflops", "unet_peak_fraction")


def bench_figures(run: dict) -> dict:
    """Per backend, the medians the issue asks for, from one sdfast bench JSON."""
    runs = run if isinstance(run, list) else [run]
    out: dict = {}
    for one in runs:
        for row in one["rows"]:
            if row["metric"] in BENCH_HEADLINE:
                out.setdefault(row["backend"], {})[row["metric"]] = row["median"]
        for skip in one.get("skipped", []):
            out.setdefault(skip["backend"], {})["not_run"] = skip["reason"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=tuple(PART_STAGES), default="full")
    parser.add_argument("--stages", help="comma-separated stages to run instead of a part's (run in the check's order: "
                                         f"{', '.join(BUDGETS)})")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="results folder (default ./gpu-check)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdfast-gpu-check"), help="models, engines and the build (default /tmp/sdfast-gpu-check)")
    parser.add_argument("--wheels", type=Path, help="a folder of wheels brought to this machine, installed first")
    parser.add_argument("--models", default="sd15,sd21,sdxl", help="built-in models to run, those that exist (default sd15,sd21,sdxl)")
    parser.add_argument("--budget", type=float, default=540, help="seconds the whole check may take (default 540)")
    parser.add_argument("--rehearse", action="store_true", help="on a CPU machine: the tiny model, the cpu backend, one repeat")
    args = parser.parse_args()

    plan = Plan.rehearsal() if args.rehearse else Plan(models=[m.strip() for m in args.models.split(",") if m.strip()])
    order = PART_STAGES[args.part]
    wanted = [s.strip() for s in args.stages.split(",")] if args.stages else list(order)
    unknown = [s for s in wanted if s not in BUDGETS]
    if unknown:
        parser.error(f"unknown stage '{unknown[0]}'; choose from {', '.join(BUDGETS)}")
    for folder in (args.out, args.work):
        folder.mkdir(parents=True, exist_ok=True)
    site = args.work / "site"
    env = {**os.environ, "SDFAST_CACHE": str(args.work / "cache"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(site), str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    sys.path[:0] = [str(site), str(REPO)]
    check = GpuCheck(plan, args.work, args.wheels, log_path=args.out / "gpu_check.log", env=env, cwd=REPO,
                     total_budget_s=None if args.rehearse else args.budget)
    started = _dt.datetime.now(_dt.timezone.utc)
    for name in [s for s in BUDGETS if s in wanted]:
        check.run_stage(name, getattr(GpuCheck, name), BUDGETS[name])
    gpu = check.gpu.get("name") or "no GPU"
    header = {"title": f"### sdfast GPU check: {gpu}, part {args.part}{' (CPU rehearsal)' if args.rehearse else ''}, {started:%Y-%m-%d %H:%M} UTC",
              "date": started.isoformat(timespec="seconds"), "command": "python benchmarks/gpu/check.py " + " ".join(sys.argv[1:]),
              "machine": {"gpu": check.gpu, "platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "plan": plan.__dict__}
    table = check.write(args.out / "gpu_check.json", header)
    print("\n" + header["title"] + "\n\n" + table, flush=True)
    return 0 if all(r.status == "ok" for r in check.results) else 1


if __name__ == "__main__":
    sys.exit(main())
