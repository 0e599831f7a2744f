"""One backend's figures, measured in a process of its own (so load time is a cold start and peak RSS is its own).

    python -m sdfast.bench.measure BACKEND --engine DIR [--unguided-engine DIR] --repeat N --steps N

Prints one JSON object: {"rows": [...]} or {"error": "..."}. Engine backends run the engine dir's files
through sdfast's runtime; the ``torch`` backend runs diffusers on the same weights (the engine's source
folder): eager fp32 on the CPU, fp16 on CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sdfast.bench.stats import Summary, time_ms
from sdfast.runtime.int8_unet import INT8

PROMPT = "a photograph of an astronaut riding a horse"


def _row(metric: str, summary: Summary | None = None, value: float | None = None, note: str = "") -> dict:
    if summary is not None:
        return {"metric": metric, "median": summary.median, "p90": summary.p90, "min": summary.min, "max": summary.max, "n": summary.n, "note": note}
    return {"metric": metric, "median": value, "p90": None, "min": None, "max": None, "n": 1, "note": note}


def rss_mib() -> float:
    """This process's resident set now (/proc's VmRSS), MiB; 0 where /proc does not say."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:")), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_mib() -> float:
    """This process's own peak RSS: /proc's VmHWM, of this address space only.

    getrusage's ru_maxrss is not: Linux carries the parent's peak across fork and exec into it, so a measuring child
    started by a parent that had just exported an engine reported the parent's peak (690 MiB) as its own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; elsewhere the best there is


def reset_peak_rss() -> bool:
    """Start a new peak: Linux resets VmHWM to the current RSS when 5 is written to /proc/self/clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def with_peak_rss(measure, peaks: dict[str, float], name: str):
    """``measure()``'s result; its peak RSS (from this call's start) goes into ``peaks[name]`` where it can be measured."""
    fresh = reset_peak_rss()
    result = measure()
    if fresh:
        peaks[name] = peak_rss_mib()
    return result


def _device_memory_mib(pid: int) -> float | None:
    """This process's GPU memory as nvidia-smi reports it (allocators keep their pools, so it is the peak)."""
    try:
        listing = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listing.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            return float(fields[1])
    return None


def _device_memory_used_mib() -> float | None:
    """The first GPU's memory in use, all processes together, as nvidia-smi reports it."""
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout.split()
        return float(listing[0]) if listing else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _derived_rows(stages: dict[str, Summary], overhead_ms: float, overhead_note: str, unet_flops: int | None,
                  peak: tuple[float, str] | None, ceiling: tuple[float, str] | None = None,
                  int8_ceiling: tuple[float, str] | None = None) -> list[dict]:
    """Host overhead per step, and the U-Net's effective GFLOP/s (the exported graph's FLOPs over the measured time);
    the int8 U-Net's effective GOP/s (the same FLOPs over its time) where it was timed."""
    rows = [_row("host_overhead_per_step", value=overhead_ms, note=overhead_note)]
    if unet_flops and "unet_step_cfg" in stages:
        gflops = unet_flops / (stages["unet_step_cfg"].median / 1e3) / 1e9
        rows.append(_row("unet_gflops", value=gflops, note=f"{unet_flops / 1e9:.4g} GFLOP per guided call, counted as direct "
                                                          "convolution; a Winograd graph does fewer multiplications, so this is effective"))
        if peak:
            rows.append(_row("unet_peak_fraction", value=100 * gflops / peak[0], note=f"percent of {peak[1]}"))
        if ceiling:
            rows.append(_row("unet_ceiling_fraction", value=100 * gflops / ceiling[0], note=f"percent of {ceiling[1]}"))
    if unet_flops and "unet_step_int8" in stages:
        gops = unet_flops / (stages["unet_step_int8"].median / 1e3) / 1e9
        rows.append(_row("unet_int8_gops", value=gops, note="the fp32 graph's operations over the int8 U-Net's time (attention, "
                                                            "the first and last layers and the shortcuts stay fp32 in it)"))
        if int8_ceiling:
            rows.append(_row("unet_int8_ceiling_fraction", value=100 * gops / int8_ceiling[0], note=f"percent of {int8_ceiling[1]}"))
    return rows


def measure_engine(backend: str, engine: Path, unguided: Path | None, repeat: int, steps: int, peak: tuple[float, str] | None,
                   ceiling: tuple[float, str] | None = None, int8_ceiling: tuple[float, str] | None = None) -> list[dict]:
    from sdfast.runtime.pipeline import GenerationRequest, Pipeline

    started = time.perf_counter()
    rss: dict[str, float] = {}  # stage -> its peak RSS, MiB
    pipeline = with_peak_rss(lambda: Pipeline.load(engine, backend=backend, verify="size"), rss, "load")
    rows = [_row("load", value=time.perf_counter() - started)]
    if backend != "cpu":
        ceiling = None  # the CPU's FMA ceiling says nothing of a GPU
    if backend != "cpu" and pipeline.manifest.data["precision"] != "fp16":
        peak = None  # the GPU's peak given is its dense fp16 one; an fp32 engine's share of it would mislead
    engines = pipeline.engines
    geometry = pipeline.manifest.geometry
    rng = np.random.default_rng(0)
    batch, latent = geometry["batch"], (geometry["latent_channels"], geometry["latent_height"], geometry["latent_width"])
    # The family's own conditioning (every text encoder, as a request runs them): the U-Net's named inputs, whatever the family.
    # each [unet_batch, ...]; the ControlNet residuals' zeros, as generate feeds them without a ControlNet
    conditioning = {**pipeline.family.conditioning(PROMPT, "", 1, bool(geometry["guidance"]), []), **pipeline.zero_residuals}

    def unet_feeds(unet_batch: int, in_channels: int) -> dict[str, np.ndarray]:
        # rows repeated to the engine's batch; a per-call array (SD3's layer_keep, one entry per block) as it is
        named = {name: np.resize(value, (unet_batch, *value.shape[1:])) if value.ndim > 1 else value for name, value in conditioning.items()}
        return {**named, "sample": rng.standard_normal((unet_batch, in_channels, *latent[1:]), dtype=np.float32),  # [2B, 4, H/8, W/8]
                "timestep": np.full(unet_batch, 500.0, np.float32)}

    in_channels = pipeline.manifest.data["model"].get("unet_in_channels", latent[0])
    stages: dict[str, Summary] = {"text_encoder": with_peak_rss(
        lambda: time_ms(lambda: pipeline.family.conditioning(PROMPT, "", 1, bool(geometry["guidance"]), []), repeat), rss, "text_encoder")}
    guided_name = "unet_step_cfg" if geometry["guidance"] else "unet_step"
    feeds = unet_feeds(geometry["unet_batch"], in_channels)
    denoiser = pipeline.manifest.denoiser  # the U-Net, or SD3's transformer: the "unet_*" rows are its step
    stages[guided_name] = with_peak_rss(lambda: time_ms(lambda: engines[denoiser].run(feeds), repeat), rss, "unet")
    if INT8 in engines:  # sdfast quantize's U-Net, on the same call (the CPU backend loads it; generate --int8 runs it)
        stages["unet_step_int8"] = time_ms(lambda: engines[INT8].run(feeds), repeat)
    if unguided is not None:  # only its U-Net: the other components are the same, and would double the peak RSS
        from sdfast.runtime.backends import get_backend
        from sdfast.runtime.manifest import read_manifest

        other = read_manifest(unguided)
        other_unet = get_backend(backend).load(other.components[other.denoiser], other.path(other.components[other.denoiser].file))
        other_feeds = unet_feeds(other.geometry["unet_batch"], in_channels)
        stages["unet_step_cfg" if other.geometry["guidance"] else "unet_step"] = time_ms(lambda: other_unet.run(other_feeds), repeat)
        del other_unet
    latents = rng.standard_normal((batch, *latent), dtype=np.float32)
    stages["vae_decode"] = with_peak_rss(lambda: time_ms(lambda: engines["vae_decoder"].run({"latent": latents}), repeat), rss, "vae_decode")
    if "vae_encoder" in engines:
        image = rng.uniform(-1, 1, (batch, 3, geometry["height"], geometry["width"])).astype(np.float32)
        stages["vae_encode"] = with_peak_rss(lambda: time_ms(lambda: engines["vae_encoder"].run({"image": image}), repeat), rss, "vae_encode")
    rows += [_row(name, summary) for name, summary in stages.items()]

    request = GenerationRequest(prompt=PROMPT, steps=steps, sampler="euler", seed=0, cfg_scale=7.5 if geometry["guidance"] else 1.0)
    overheads, in_loop, queued = [], [], []

    def generate():
        t = pipeline.generate(request).timings  # the same call's own engine times, so noise between runs cancels
        overheads.append((t.total - t.text_encoder - t.vae_encode - sum(t.unet_steps) - t.vae_decode) * 1e3 / steps)
        if t.host_queue_s is not None:  # a device loop: its step is wall time over evaluations; the host only queues
            in_loop.append(statistics.median(t.unet_steps) * 1e3)
            queued.append(t.host_queue_s * 1e3 / len(t.unet_steps))
    end_to_end = with_peak_rss(lambda: time_ms(generate, max(1, min(repeat, 3)), warmup=0), rss, "end_to_end")
    rows.append(_row("end_to_end", end_to_end))
    rows += [_row(f"peak_rss_{stage}", value=mib, note="this stage's peak resident set (VmHWM after a reset)") for stage, mib in rss.items()]
    if in_loop:
        rows.append(_row("unet_step_in_loop", Summary.of(in_loop), note="U-Net (CUDA graph) and the sampler kernel, per evaluation"))
        rows.append(_row("host_queue_per_step", Summary.of(queued), note="the GPU waits on the host only if this exceeds the step"))
    unet_flops = pipeline.manifest.data["components"][denoiser].get("flops", {}).get("per_call")
    rows += _derived_rows(stages, statistics.median(overheads), "end to end minus the same runs' engine calls, over the steps",
                          unet_flops, peak, ceiling, int8_ceiling)
    return rows


def measure_torch(engine: Path, repeat: int, steps: int, peaks: dict[str, tuple[float, str]]) -> list[dict]:
    """diffusers on the engine's source weights: the reference every backend is compared with."""
    import torch
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    from sdfast.runtime.manifest import read_manifest

    manifest = read_manifest(engine)
    folder = Path(manifest.data["source"]["path"])
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"the engine's source model folder '{folder}' is not here")
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    started = time.perf_counter()
    options = {"sdxl": {"add_watermarker": False},  # null components (SD3 without T5) must be named to from_pretrained
               "sd3": {"text_encoder_3": None, "tokenizer_3": None, "image_encoder": None, "feature_extractor": None},
               }.get(manifest.family, {"safety_checker": None, "requires_safety_checker": False})
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, **options).to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    rows = [_row("load", value=time.perf_counter() - started)]
    if manifest.family != "sd3":  # SD3 keeps its FlowMatch Euler
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    g = manifest.geometry
    batch = g["batch"]
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator).to(device, dtype)

    def timed(fn):
        def run():
            with torch.no_grad():
                fn()
            sync()
        return time_ms(run, repeat)

    more_prompts = {"prompt_2": None, "prompt_3": None} if manifest.family == "sd3" else {}  # SD3's encode_prompt asks for them
    stages = {"text_encoder": timed(lambda: pipe.encode_prompt(prompt=PROMPT, **more_prompts, device=device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True))}
    t = torch.tensor(500.0, device=device)
    denoiser = pipe.transformer if manifest.family == "sd3" else pipe.unet
    config, channels = denoiser.config, g["latent_channels"]
    sample2, sample1 = (randn(rows, channels, g["latent_height"], g["latent_width"]) for rows in (2 * batch, batch))

    def conditioning(rows: int) -> dict:
        """The denoiser's conditioning for ``rows`` rows: text hidden states, SDXL's pooled embeddings and six size/crop ids,
        SD3's 77 + 256 joint tokens and pooled projections."""
        if manifest.family == "sd3":
            tokens = manifest.components[manifest.denoiser].input("encoder_hidden_states").shape[1]  # 77 + T5's 256
            return {"encoder_hidden_states": randn(rows, tokens, config.joint_attention_dim),
                    "pooled_projections": randn(rows, config.pooled_projection_dim), "timestep": t.expand(rows)}
        named = {"encoder_hidden_states": randn(rows, g["text_length"], config.cross_attention_dim), "timestep": t}
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            named["added_cond_kwargs"] = {"text_embeds": randn(rows, pooled),
                                          "time_ids": torch.tensor([[g["height"], g["width"], 0, 0, g["height"], g["width"]]] * rows,
                                                                   dtype=dtype, device=device)}
        return named

    guided, single = conditioning(2 * batch), conditioning(batch)
    stages["unet_step_cfg"] = timed(lambda: denoiser(sample2, **guided))
    stages["unet_step"] = timed(lambda: denoiser(sample1, **single))
    stages["vae_decode"] = timed(lambda: pipe.vae.decode(sample1 / pipe.vae.config.scaling_factor))
    image = (torch.rand((batch, 3, g["height"], g["width"]), generator=generator) * 2 - 1).to(device, dtype)
    stages["vae_encode"] = timed(lambda: pipe.vae.encode(image))
    rows += [_row(name, summary) for name, summary in stages.items()]

    def whole():
        pipe([PROMPT] * batch, height=g["height"], width=g["width"], num_inference_steps=steps, guidance_scale=7.5, output_type="np",
             generator=torch.Generator().manual_seed(0))
        sync()
    end_to_end = time_ms(whole, max(1, min(repeat, 3)), warmup=0)
    rows.append(_row("end_to_end", end_to_end))
    unet_flops = manifest.data["components"][manifest.denoiser].get("flops", {}).get("per_call")
    engine_ms = stages["text_encoder"].median + steps * stages["unet_step_cfg"].median + stages["vae_decode"].median
    rows += _derived_rows(stages, (end_to_end.median - engine_ms) / steps, "end to end minus the stage medians, over the steps (noisy)",
                          unet_flops, peaks.get("gpu" if cuda else "cpu"))
    if cuda:
        rows.append(_row("peak_device_memory", value=torch.cuda.max_memory_allocated() / 2**20, note="torch.cuda.max_memory_allocated"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend")
    parser.add_argument("--engine", type=Path, required=True)
    parser.add_argument("--unguided-engine", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--peak-cpu", type=float, help="the CPU's fp32 peak, GFLOP/s")
    parser.add_argument("--peak-gpu", type=float, help="the GPU's dense fp16 peak, GFLOP/s")
    parser.add_argument("--fma-ceiling", type=float, help="the CPU's measured FMA ceiling, GFLOP/s (ceilings.py)")
    parser.add_argument("--int8-ceiling", type=float, help="the CPU's measured int8 dot-product ceiling, GOP/s (ceilings.py)")
    args = parser.parse_args()

    answer = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # libraries' chatter goes to stderr; stdout carries the JSON
    peaks = {**({"cpu": (args.peak_cpu, "the CPU's fp32 peak")} if args.peak_cpu else {}),
             **({"gpu": (args.peak_gpu, "the GPU's dense fp16 peak")} if args.peak_gpu else {})}
    device_baseline = _device_memory_used_mib() if args.backend in ("cuda", "tensorrt") else None
    try:
        if args.backend == "torch":
            rows = measure_torch(args.engine, args.repeat, args.steps, peaks)
        else:
            rows = measure_engine(args.backend, args.engine, args.unguided_engine, args.repeat, args.steps,
                                  peaks.get("cpu" if args.backend == "cpu" else "gpu"),
                                  (args.fma_ceiling, "the CPU's measured FMA ceiling") if args.fma_ceiling else None,
                                  (args.int8_ceiling, "the CPU's measured int8 ceiling") if args.int8_ceiling else None)
    except Exception as error:  # noqa: BLE001 - one line back to the parent, which reports it
        text = str(error).strip().splitlines()
        answer.write(json.dumps({"error": f"{type(error).__name__}: {text[0] if text else ''}"}))
        return 1
    rows.append(_row("peak_rss", value=peak_rss_mib()))
    if args.backend in ("cuda", "tensorrt"):
        device = _device_memory_mib(os.getpid())
        if device is not None:
            rows.append(_row("peak_device_memory", value=device, note="nvidia-smi, this process"))
        elif device_baseline is not None and (now := _device_memory_used_mib()) is not None:
            # in a VM nvidia-smi may list no process ids: the whole GPU's use, less what was used before this process loaded
            rows.append(_row("peak_device_memory", value=now - device_baseline,
                             note="nvidia-smi: the whole GPU's use after the run less before the load (pools kept: about the peak)"))
    answer.write(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
