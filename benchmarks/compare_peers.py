"""sdfast against the peers on one workload: a denoiser step (U-Net; SD3: transformer), batch 2 with guidance (the CPU set at fp32, --peers gpu at fp16).

    python benchmarks/compare_peers.py [--height 256 --width 256] [--rounds 5] [--calls 2] [--e2e-steps 0]

Every system is loaded once in a process of its own (peer_worker.py), all in this process tree; then the
rounds alternate between them, so a noisy neighbour hurts every system alike. Peers:

- diffusers eager (fp32), Optimum's ONNX Runtime pipeline (optimum-onnx), OpenVINO through optimum-intel
  (static reshape, fp32, and its default precision where that differs: bf16 on CPUs with avx512_bf16/AMX);
- sdfast on its CPU backend, from an engine dir exported at the same size; and, with --fast-engine and --fast-mode,
  sdfast-cpu-fast: one of its fast modes (int8, step caching, ...; named as fast_modes.py names them) on an engine dir
  that has the mode's graphs, so a fast mode's image time is measured against the peers in the same alternating run.

The peers need their own virtualenv (optimum-onnx 0.1.0 pins transformers<4.58, hence diffusers 0.39);
this script creates it with pip the first time (--venv). A peer that cannot be installed or loaded is
reported with its exact error. Results go to benchmarks/results/peers_<model>_<size>.{json,md}, with the
machine, every environment's versions, the command and the date.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "peer_worker.py"
PEER_REQUIREMENTS = [  # what optimum-onnx 0.1.0 allows; optimum-intel must then be 1.27
    "optimum-onnx[onnxruntime]==0.1.0", "optimum-intel[openvino]==1.27.0", "diffusers==0.39.*", "transformers<4.58",
    "huggingface-hub<1.0", "accelerate", "psutil",
]
PEERS = ("diffusers", "optimum-ort", "openvino-fp32", "openvino-default", "sdfast-cpu")  # the CPU set, the default
# On a GPU (--peers gpu): fp16 everywhere; sdfast's GPU backends run the fp16 engine (--gpu-engine).
GPU_PEERS = ("diffusers-cuda-fp16", "diffusers-compile", "optimum-ort-cuda", "sdfast-cuda", "sdfast-tensorrt")
ALL_PEERS = PEERS + GPU_PEERS + ("sdfast-cpu-fast",)


def say(message: str) -> None:
    print(f"compare_peers: {message}", file=sys.stderr, flush=True)


def ensure_peer_venv(venv: Path) -> tuple[Path | None, str]:
    """The peers' python, creating the virtualenv if needed; (None, the exact error) if it cannot be made."""
    python = venv / "bin" / "python"
    marker = venv / ".sdfast-peers-ready"
    if marker.is_file() and python.is_file():
        return python, ""
    say(f"creating the peers' virtualenv {venv} (torch==2.13.0 first, then {' '.join(PEER_REQUIREMENTS)})")
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", "torch==2.13.0"],
             [str(python), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS]]
    for command in steps:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if "ERROR" in line] or (done.stderr or "?").strip().splitlines()[-1:]
            return None, f"`{' '.join(command[-3:])}` failed: {lines[0] if lines else done.returncode}"
    marker.write_text("ok\n")
    return python, ""


def versions_of(python: Path, packages: list[str]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\nout = {}\nfor p in sys.argv[1:]:\n    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    done = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


class Worker:
    """One peer's process: loaded once, then asked for timed U-Net calls."""

    def __init__(self, name: str, python: Path, args: list[str], log: Path):
        self.name = name
        self.log = open(log, "w")
        self.process = subprocess.Popen([str(python), str(WORKER), name, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, bufsize=1)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.log.flush()
            tail = Path(self.log.name).read_text().strip().splitlines()
            return {"ok": False, "error": f"the worker died: {tail[-1] if tail else 'no output'}"}
        return json.loads(line)

    def ask(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write('{"op": "quit"}\n')
                self.process.stdin.flush()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
        self.log.close()


def lend_small_t5(model: Path, folder: Path) -> Path:
    """``model`` (an SD3 folder without T5) with a small random T5 lent as text_encoder_3/tokenizer_3: optimum-intel's
    SD3 conversion needs one. It has the transformer's context width (4096), so the timed transformer call is the same
    as everyone's: 77 CLIP + 256 T5 context tokens (an --e2e-steps run also runs this small T5 once per prompt, a few
    milliseconds the other systems do not spend). The other components are links to ``model``'s."""
    source = folder / "lent_to.txt"  # which model the links are to: a cache shared by two folders must not mix them
    if (folder / "model_index.json").is_file() and source.is_file() and source.read_text() == str(model.resolve()):
        return folder
    import shutil

    import torch
    from transformers import T5Config, T5EncoderModel

    from sdfast.export.builtin_tokenizer import t5_tokenizer

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for entry in model.iterdir():
        if entry.name not in ("model_index.json", "text_encoder_3", "tokenizer_3"):
            (folder / entry.name).symlink_to(entry.resolve())
    width = json.loads((model / "transformer" / "config.json").read_text())["joint_attention_dim"]
    torch.manual_seed(0)
    config = T5Config(vocab_size=1000, d_model=width, d_kv=64, d_ff=256, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                      pad_token_id=0, eos_token_id=1)
    T5EncoderModel(config).eval().save_pretrained(folder / "text_encoder_3")
    tokenizer = t5_tokenizer(1000)
    tokenizer.model_max_length = 256
    tokenizer.save_pretrained(folder / "tokenizer_3")
    settings = json.loads((folder / "tokenizer_3" / "tokenizer_config.json").read_text())
    if isinstance(settings.get("extra_special_tokens"), list):  # transformers 5 writes a list; the peers' 4.x reads a dict
        del settings["extra_special_tokens"]
        (folder / "tokenizer_3" / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    index = json.loads((model / "model_index.json").read_text())
    index.update(text_encoder_3=["transformers", "T5EncoderModel"], tokenizer_3=["transformers", "T5TokenizerFast"])
    source.write_text(str(model.resolve()))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))  # written last: the folder's "done" mark
    return folder


def summary(samples: list[float]) -> dict:
    from sdfast.bench.stats import Summary

    figures = Summary.of(samples)
    return {"median_ms": figures.median, "p90_ms": figures.p90, "min_ms": figures.min, "max_ms": figures.max, "n": figures.n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--calls", type=int, default=2, help="timed U-Net calls per system per round (default 2)")
    parser.add_argument("--e2e-steps", type=int, default=0, help="also time one whole text-to-image run of this many Euler steps per round")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated, from {', '.join(ALL_PEERS)}; 'gpu' for {', '.join(GPU_PEERS)} (default: the CPU set)")
    parser.add_argument("--engine", type=Path, help="sdfast engine dir at this size (default: export --model, cached)")
    parser.add_argument("--gpu-engine", type=Path, help="fp16 engine dir for sdfast-cuda and sdfast-tensorrt (default: export, cached)")
    parser.add_argument("--fast-engine", type=Path, help="sdfast-cpu-fast's engine dir, with its mode's graphs (export "
                                                         "--step-cache, sdfast quantize ...), at this size")
    parser.add_argument("--fast-mode", help="sdfast-cpu-fast's mode in fast_modes.py's syntax, e.g. 'int8,step_cache=3'")
    parser.add_argument("--model", default="sd15", help="a built-in model (sd15 ...) or a diffusers folder (default sd15)")
    parser.add_argument("--venv", type=Path, default=HERE / ".peers-venv", help="the peers' virtualenv (created if missing)")
    parser.add_argument("--peer-python", type=Path,
                        help="run the peers with this interpreter, which has their packages already (no virtualenv is made: "
                             "for a machine without a package registry)")
    parser.add_argument("--cache", type=Path, help="where the peers' exported models are kept (default: $SDFAST_CACHE/peers)")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="load, time and close each system in turn every round, instead of holding all of them loaded "
                             "(SDXL: three 10-14 GB systems do not fit in 24 GiB together); cold starts are then per round")
    parser.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/peers_<model>_<W>x<H>.json, and .md beside it)")
    args = parser.parse_args()

    from sdfast.bench.hardware import CpuInfo, gpu_name, theoretical_peak
    from sdfast.bench.engines import cached_engine
    from sdfast.cli.progress import ElapsedLog
    from sdfast.export.builtin import cache_root, ensure_builtin

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    peers = list(GPU_PEERS) if peers == ["gpu"] else peers
    unknown = [p for p in peers if p not in ALL_PEERS]
    if unknown:
        parser.error(f"unknown peer '{unknown[0]}'; choose from {', '.join(ALL_PEERS)}")
    if "sdfast-cpu-fast" in peers:
        if not (args.fast_engine and args.fast_mode and args.fast_mode.strip()):
            parser.error("sdfast-cpu-fast needs --fast-engine DIR and --fast-mode MODE")
        from fast_modes import modes_from

        if len(modes_from(args.fast_mode)) != 2:  # 'exact' and the one mode
            parser.error("--fast-mode: one mode (fields joined by commas), not several")
    elif args.fast_engine or args.fast_mode:
        parser.error("--fast-engine and --fast-mode are for the sdfast-cpu-fast peer (add it to --peers)")
    cpu = CpuInfo.detect()
    from sdfast.export.builtin import BUILTIN_MODELS

    model = ensure_builtin(args.model, say) if args.model in BUILTIN_MODELS else Path(args.model)
    if not (model / "model_index.json").is_file():
        parser.error(f"--model '{args.model}' is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a diffusers folder")
    label = args.model if args.model in BUILTIN_MODELS else model.name
    cache = args.cache or cache_root() / "peers" / label
    cache.mkdir(parents=True, exist_ok=True)
    engine = gpu_engine = None
    if "sdfast-cpu" in peers:
        engine = args.engine or cached_engine(args.model, args.height, args.width, 1, True, say, ElapsedLog("compare_peers"))
    if {"sdfast-cuda", "sdfast-tensorrt"} & set(peers):
        gpu_engine = args.gpu_engine or cached_engine(args.model, args.height, args.width, 1, True, say, ElapsedLog("compare_peers"), "fp16")

    failures: dict[str, str] = {}
    if "openvino-default" in peers and not ({"avx512_bf16", "amx_bf16"} & cpu.flags):
        failures["openvino-default"] = "not run: this CPU has no bf16 arithmetic, so OpenVINO's default precision here is f32, i.e. openvino-fp32"
    peer_python = None
    if args.peer_python:
        peer_python = args.peer_python
    elif any(not p.startswith("sdfast") and p not in failures for p in peers):
        peer_python, error = ensure_peer_venv(args.venv)
        if peer_python is None:
            failures.update({p: error for p in peers if not p.startswith("sdfast")})
    common = ["--height", str(args.height), "--width", str(args.width), "--cache", str(cache)]
    models = {name: model for name in peers}
    index = json.loads((model / "model_index.json").read_text())
    if (model / "transformer").is_dir() and (index.get("text_encoder_3") or [None])[0] is None:  # SD3 without T5
        for name in [p for p in peers if p.startswith("openvino") and p not in failures]:
            say(f"{name}: lending a small random T5 for optimum-intel's SD3 conversion (the transformer's inputs stay the same)")
            models[name] = lend_small_t5(model, cache / "with-small-t5")
    logs = (args.out or HERE / "results" / "x").parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def start(name: str) -> Worker | None:
        say(f"loading {name} ...")
        own_engine = ["--engine", str(gpu_engine if name in GPU_PEERS else engine)] if name.startswith("sdfast") else []
        if name == "sdfast-cpu-fast":
            own_engine = ["--engine", str(args.fast_engine), "--mode", args.fast_mode]
        worker = Worker(name, Path(sys.executable) if name.startswith("sdfast") else peer_python, ["--model", str(models[name]), *common, *own_engine],
                        logs / f"{name}_{args.width}x{args.height}.log")
        if not worker.ready.get("ok"):
            failures[name] = worker.ready.get("error", "unknown error")
            say(f"{name} failed: {failures[name]}")
            worker.close()
            return None
        say(f"{name}: loaded in {worker.ready['load_s']:.1f} s at {worker.ready['precision']}")
        return worker

    for name in [p for p in peers if p in failures]:
        say(f"{name}: {failures[name]}")
    names = [p for p in peers if p not in failures]
    samples: dict[str, list[float]] = {}
    e2e: dict[str, list[float]] = {}
    ready: dict[str, dict] = {}  # name -> the worker's ready answer (load time, precision; the last load's)

    def measure(worker: Worker) -> None:
        samples.setdefault(worker.name, []).extend(worker.ask(op="unet", n=args.calls)["unet_ms"])
        if args.e2e_steps:
            e2e.setdefault(worker.name, []).append(worker.ask(op="e2e", steps=args.e2e_steps)["e2e_ms"])
        ready[worker.name] = worker.ready

    workers: dict[str, Worker] = {}
    try:
        if not args.one_at_a_time:
            workers = {name: w for name in names if (w := start(name)) is not None}
        for round_index in range(args.rounds):
            live = [name for name in names if name not in failures]
            order = live[round_index % len(live):] + live[:round_index % len(live)] if live else []
            for name in order:
                if args.one_at_a_time:  # loaded, timed and closed in turn: SDXL's systems do not fit in memory together
                    worker = start(name)
                    if worker is not None:
                        try:
                            measure(worker)
                        finally:
                            worker.close()
                else:
                    measure(workers[name])
            say(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{n} {statistics.median(s):.0f} ms" for n, s in samples.items()))
    finally:
        for worker in workers.values():
            worker.close()

    results = {name: {**summary(samples[name]), "load_s": ready[name]["load_s"], "precision": ready[name]["precision"],
                      "output_rms": ready[name].get("output_rms"), **({"e2e": summary(e2e[name])} if e2e.get(name) else {})}
               for name in samples if name not in failures}
    reference = next((n for n in ("sdfast-tensorrt", "sdfast-cuda", "sdfast-cpu") if n in results), None)
    if reference:
        for name, figures in results.items():
            figures["sdfast_ratio"] = results[reference]["median_ms"] / figures["median_ms"]  # < 1: sdfast is faster
    for name, figures in results.items():
        if e2e.get(name):
            figures["e2e"]["samples_ms"] = e2e[name]  # one per round, in round order
    if "openvino-fp32" in results and e2e.get("openvino-fp32"):  # image times against the fp32 peer, paired round by round
        for name, figures in results.items():
            if e2e.get(name) and len(e2e[name]) == len(e2e["openvino-fp32"]):
                pairs = [base / own for base, own in zip(e2e["openvino-fp32"], e2e[name])]
                figures["e2e"]["speedup_vs_openvino_fp32"] = {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs)}
    record = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/compare_peers.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu.name, "cores": cpu.cores, "platform": platform.platform(), "peak": theoretical_peak(cpu).to_json(),
                    "gpu": gpu_name()},
        "workload": {"model": f"{label}" + (" architecture, random weights" if args.model in BUILTIN_MODELS else ""),
                     "denoiser": "transformer" if (model / "transformer").is_dir() else "U-Net",  # SD3's MMDiT
                     "height": args.height, "width": args.width, "unet_batch": 2,
                     "guidance": True, "rounds": args.rounds, "calls_per_round": args.calls, "e2e_steps": args.e2e_steps,
                     "one_at_a_time": args.one_at_a_time,
                     **({"fast_mode": args.fast_mode, "fast_engine": str(args.fast_engine)} if args.fast_mode else {})},
        "versions": {"sdfast_env": versions_of(Path(sys.executable), ["sdfast", "onnxruntime", "numpy", "torch"]),
                     "peers_env": versions_of(peer_python, ["torch", "diffusers", "transformers", "optimum", "optimum-onnx",
                                                            "optimum-intel", "onnxruntime", "openvino"]) if peer_python else {}},
        "results": results,
        "not_run": failures,
    }
    out = args.out or HERE / "results" / f"peers_{label}_{args.width}x{args.height}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    markdown = render_markdown(record, reference)
    out.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)
    return 0


def render_markdown(record: dict, reference: str | None) -> str:
    w, m = record["workload"], record["machine"]
    on_gpu = bool((set(record["results"]) | set(record["not_run"])) & set(GPU_PEERS))
    where = f"GPU ({m.get('gpu') or 'unknown'})" if on_gpu else "CPU"
    lines = [f"### {w['model']}: {w.get('denoiser', 'U-Net')} step, {w['width']}x{w['height']}, batch 2 with guidance, {where}",
             "", f"{m['cpu']}, {m['cores']} cores; {record['date']}; `{record['command']}`", "",
             "| system | precision | median ms | p90 | min-max | cold start s | sdfast / system |" + image_header(w),
             "|---|---|---:|---:|---:|---:|---:|" + "---:|" * image_header(w).count("|")]
    for name, r in sorted(record["results"].items(), key=lambda item: item[1]["median_ms"]):
        ratio = f"{r['sdfast_ratio']:.2f}" if "sdfast_ratio" in r else "-"
        lines.append(f"| {name} | {r['precision']} | {r['median_ms']:.0f} | {r['p90_ms']:.0f} | {r['min_ms']:.0f}-{r['max_ms']:.0f} | "
                     f"{r['load_s']:.1f} | {ratio} |" + image_cells(w, r))
    for name, why in record["not_run"].items():
        lines.append(f"| {name} | - | - | - | - | - | {why} |" + " - |" * image_header(w).count("|"))
    loading = "each system loaded afresh for its turn (--one-at-a-time), " if w.get("one_at_a_time") else ""
    lines += ["", f"{w['rounds']} alternating rounds x {w['calls_per_round']} calls per system, {loading}after one warm-up call; "
              f"ratio = sdfast median / system median (below 1: sdfast is faster)."]
    if w.get("fast_mode"):
        lines.append(f"sdfast-cpu-fast: `{w['fast_mode']}` on {w['fast_engine']} (its 'median ms' is the mode's full U-Net call).")
    if w.get("e2e_steps"):
        lines.append(f"One image: {w['e2e_steps']} Euler steps, text to decoded image, once per system per round; "
                     f"speed-up = OpenVINO fp32's image time / the system's, paired round by round.")
    return "\n".join(lines)


def image_header(workload: dict) -> str:
    return " one image ms, median (min-max) | speed-up vs openvino-fp32, median (min-max) |" if workload.get("e2e_steps") else ""


def image_cells(workload: dict, r: dict) -> str:
    if not workload.get("e2e_steps"):
        return ""
    image = r.get("e2e")
    if not image:
        return " - | - |"
    speedup = image.get("speedup_vs_openvino_fp32")
    cell = f"{speedup['median']:.2f}x ({speedup['min']:.2f}-{speedup['max']:.2f})" if speedup else "-"
    return f" {image['median_ms']:.0f} ({image['min_ms']:.0f}-{image['max_ms']:.0f}) | {cell} |"


if __name__ == "__main__":
    sys.exit(main())
