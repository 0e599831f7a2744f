"""One peer system, loaded once, timed on command: the child side of compare_peers.py.

    python benchmarks/peer_worker.py PEER --model FOLDER --height H --width W --cache DIR [--engine DIR]

It prints one JSON line per answer on its standard output and reads one JSON command per line on its
standard input: {"op": "unet", "n": 3} times n denoiser calls (the U-Net or SD3's transformer; batch 2, classifier-free guidance), {"op": "e2e",
"steps": 4} times one whole text-to-image call (sdfast-cpu-fast: in its --mode), {"op": "quit"} ends. Libraries' own chatter goes to stderr.
The peers run in their own virtualenv (optimum-onnx pins older diffusers and transformers); sdfast runs in
the caller's environment. Each peer gets the same random latents, timestep and prompt embeddings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5


def unet_config(model: str) -> dict:
    """The model folder's denoiser config (U-Net, or SD3's transformer): the input shapes follow it."""
    return json.loads((Path(model) / ("transformer" if is_sd3(model) else "unet") / "config.json").read_text())


def is_sd3(model: str) -> bool:
    """The folder holds an SD3 pipeline (an MMDiT transformer instead of a U-Net)."""
    return (Path(model) / "transformer").is_dir()


def unet_inputs(model: str, height: int, width: int) -> dict[str, np.ndarray]:
    config = unet_config(model)
    rng = np.random.default_rng(0)
    if is_sd3(model):  # CLIP's 77 tokens then T5's 256 (zeros without T5, the same work), the pooled pair
        return {
            "sample": rng.standard_normal((2, config["in_channels"], height // 8, width // 8), dtype=np.float32),  # [2B, 16, H/8, W/8]
            "encoder_hidden_states": rng.standard_normal((2, 77 + 256, config["joint_attention_dim"]), dtype=np.float32),
            "pooled_projections": rng.standard_normal((2, config["pooled_projection_dim"]), dtype=np.float32),
        }
    inputs = {
        "sample": rng.standard_normal((2, config["in_channels"], height // 8, width // 8), dtype=np.float32),  # [2B, C, H/8, W/8]
        "encoder_hidden_states": rng.standard_normal((2, 77, config["cross_attention_dim"]), dtype=np.float32),  # [2B, 77, D]
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text embeddings and the six size/crop ids
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["text_embeds"] = rng.standard_normal((2, pooled), dtype=np.float32)  # [2B, 1280]
        inputs["time_ids"] = np.tile(np.array([height, width, 0, 0, height, width], np.float32), (2, 1))  # [2B, 6]
    return inputs


def is_sdxl(model: str) -> bool:
    """The folder holds an SDXL pipeline: the peers then use their XL classes."""
    return "XL" in json.loads((Path(model) / "model_index.json").read_text()).get("_class_name", "")


def load_diffusers(model: str, dtype):
    """The folder's own pipeline class (model_index.json), without the safety checker where it has one."""
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    index = json.loads((Path(model) / "model_index.json").read_text())
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    # components the folder leaves out (SD3 without T5) must be named to from_pretrained
    extra |= {name: None for name, entry in index.items() if isinstance(entry, list) and entry[0] is None}
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, **extra)
    if not is_sd3(model):  # SD3 keeps its FlowMatch Euler
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class DiffusersPeer:
    """diffusers eager, fp32 on the CPU (the reference every runtime is compared with)."""

    device = "cpu"

    def __init__(self, args):
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        self.torch = torch
        self.pipe = load_diffusers(args.model, torch.float32)
        self.precision = "fp32"

    def feeds(self, inputs):
        return {key: self.torch.from_numpy(value) for key, value in inputs.items()}

    def unet(self, feeds):
        added = {key: feeds[key] for key in ("text_embeds", "time_ids") if key in feeds}
        if "pooled_projections" in feeds:  # SD3's transformer
            with self.torch.no_grad():
                out = self.pipe.transformer(hidden_states=feeds["sample"], timestep=self.torch.full((2,), 500.0, device=self.device),
                                            encoder_hidden_states=feeds["encoder_hidden_states"],
                                            pooled_projections=feeds["pooled_projections"]).sample
            if self.device == "cuda":
                self.torch.cuda.synchronize()
            return out
        with self.torch.no_grad():
            out = self.pipe.unet(feeds["sample"], self.torch.tensor(500.0, device=self.device), encoder_hidden_states=feeds["encoder_hidden_states"],
                                 **({"added_cond_kwargs": added} if added else {})).sample
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return out

    def e2e(self, height, width, steps):
        self.pipe(PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="np",
                  generator=self.torch.Generator().manual_seed(0))


class OptimumOrtPeer(DiffusersPeer):
    """Hugging Face Optimum's ONNX Runtime pipeline (optimum-onnx), fp32, CPUExecutionProvider."""

    provider, folder, export_options, precision = "CPUExecutionProvider", "optimum-onnx", {}, "fp32"

    def __init__(self, args):
        import torch
        from diffusers import EulerDiscreteScheduler
        from optimum.onnxruntime import ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline

        self.torch = torch
        exported = Path(args.cache) / self.folder
        if not (exported / "model_index.json").is_file():
            from optimum.exporters.onnx import main_export

            _say_progress(f"optimum: exporting {args.model} to {self.precision} ONNX (once)")
            main_export(args.model, output=exported, task="text-to-image", do_validation=False, **self.export_options)
        started = time.perf_counter()
        pipeline_class = ORTStableDiffusionXLPipeline if is_sdxl(args.model) else ORTStableDiffusionPipeline
        self.pipe = pipeline_class.from_pretrained(exported, provider=self.provider)
        self.load_s = time.perf_counter() - started
        self.pipe.scheduler = EulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)


class OpenVinoPeer(DiffusersPeer):
    """OpenVINO through optimum-intel, reshaped to static shapes as OpenVINO recommends."""

    precision_hint: str | None = "f32"

    def __init__(self, args):
        import torch
        from diffusers import EulerDiscreteScheduler
        from optimum.intel import OVStableDiffusion3Pipeline, OVStableDiffusionPipeline, OVStableDiffusionXLPipeline

        self.torch = torch
        pipeline_class = (OVStableDiffusion3Pipeline if is_sd3(args.model) else OVStableDiffusionXLPipeline if is_sdxl(args.model)
                          else OVStableDiffusionPipeline)
        exported = Path(args.cache) / "openvino-ir"
        if not (exported / "model_index.json").is_file():
            _say_progress(f"optimum-intel: converting {args.model} to OpenVINO IR (once)")
            index = json.loads((Path(args.model) / "model_index.json").read_text())
            absent = {name: None for name, entry in index.items() if isinstance(entry, list) and entry[0] is None}  # SD3 without T5
            pipe = pipeline_class.from_pretrained(args.model, export=True, compile=False, load_in_8bit=False, **absent)
            pipe.save_pretrained(exported)
            del pipe
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if self.precision_hint:
            config["INFERENCE_PRECISION_HINT"] = self.precision_hint
        started = time.perf_counter()
        self.pipe = pipeline_class.from_pretrained(exported, compile=False, ov_config=config)
        self.pipe.reshape(batch_size=1, height=args.height, width=args.width, num_images_per_prompt=1)
        self.pipe.compile()
        self.load_s = time.perf_counter() - started
        if not is_sd3(args.model):
            self.pipe.scheduler = EulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        denoiser = self.pipe.transformer if is_sd3(args.model) else self.pipe.unet
        hint = denoiser.request.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)

    def feeds(self, inputs):
        return inputs

    def unet(self, feeds):
        if "pooled_projections" in feeds:  # SD3's transformer
            return self.pipe.transformer(hidden_states=feeds["sample"], timestep=np.full(2, 500.0, dtype=np.float32),
                                         encoder_hidden_states=feeds["encoder_hidden_states"], pooled_projections=feeds["pooled_projections"])
        added = {key: feeds[key] for key in ("text_embeds", "time_ids") if key in feeds}  # SDXL's
        return self.pipe.unet(sample=feeds["sample"], timestep=np.array([500.0], dtype=np.float32),
                              encoder_hidden_states=feeds["encoder_hidden_states"], **added)


class DiffusersCudaPeer(DiffusersPeer):
    """diffusers fp16 on CUDA with PyTorch's scaled_dot_product_attention (its default attention on torch 2)."""

    device = "cuda"

    def __init__(self, args):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("not run: torch sees no CUDA device")
        self.torch = torch
        started = time.perf_counter()
        self.pipe = load_diffusers(args.model, torch.float16).to("cuda")
        self.prepare(args)
        self.load_s = time.perf_counter() - started
        self.precision = "fp16"

    def prepare(self, args):
        pass

    def feeds(self, inputs):
        return {key: self.torch.from_numpy(value).to("cuda", self.torch.float16) for key, value in inputs.items()}

    def e2e(self, height, width, steps):
        self.pipe(PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="np",
                  generator=self.torch.Generator("cuda").manual_seed(0))
        self.torch.cuda.synchronize()


class DiffusersCompilePeer(DiffusersCudaPeer):
    """diffusers fp16 on CUDA, U-Net in channels_last and torch.compile (mode reduce-overhead: CUDA graphs), as diffusers' docs advise."""

    def prepare(self, args):
        self.pipe.unet.to(memory_format=self.torch.channels_last)
        self.pipe.unet = self.torch.compile(self.pipe.unet, mode="reduce-overhead", fullgraph=True)
        _say_progress("diffusers-compile: compiling the U-Net (minutes)")
        for _ in range(3):  # compile, then record the CUDA graph
            self.unet(self.feeds(unet_inputs(args.model, args.height, args.width)))


class OptimumOrtCudaPeer(OptimumOrtPeer):
    """Optimum's ONNX Runtime pipeline exported in fp16 on CUDA, on the CUDAExecutionProvider (its published H100 setup)."""

    provider, folder, export_options, precision = "CUDAExecutionProvider", "optimum-onnx-fp16", {"device": "cuda", "dtype": "fp16"}, "fp16"

    def feeds(self, inputs):
        return {key: value.astype(np.float16) for key, value in inputs.items()}

    def unet(self, feeds):
        return self.pipe.unet(sample=feeds["sample"], timestep=np.array([500], dtype=np.int64), encoder_hidden_states=feeds["encoder_hidden_states"])


class OpenVinoDefaultPeer(OpenVinoPeer):
    """OpenVINO at the CPU plugin's default precision (bf16 where the CPU has it, else f32)."""

    precision_hint = None


class SdfastPeer:
    """sdfast's lean runtime on one backend, over an engine dir exported at the same size; with ``--mode`` (fast_modes.py's
    syntax, e.g. 'int8,step_cache=3'), that fast mode's GenerationRequest fields on every image."""

    def __init__(self, args, backend: str):
        from sdfast.runtime.int8_unet import INT8
        from sdfast.runtime.pipeline import Pipeline

        started = time.perf_counter()
        self.pipeline = Pipeline.load(args.engine, backend=backend, verify="size")
        self.load_s = time.perf_counter() - started
        self.mode: dict = {}
        self.precision = self.pipeline.manifest.data["precision"]
        if args.mode:
            from fast_modes import modes_from

            label, self.mode = list(modes_from(args.mode).items())[-1]
            self.pipeline.validate(self._request(1))  # a mode this engine dir cannot run fails the load, in one line
            self.precision = f"{self.precision}, {label}"
        # the U-Net (the int8 one in an int8 mode), or SD3's transformer: the 'unet' op's call
        self.engine = self.pipeline.engines[INT8 if self.mode.get("int8") else self.pipeline.manifest.denoiser]

    def _request(self, steps: int):
        from sdfast.runtime.generation import GenerationRequest

        return GenerationRequest(prompt=PROMPT, steps=steps, cfg_scale=GUIDANCE, sampler="euler", seed=0, **self.mode)

    def feeds(self, inputs):
        extra = {}
        if "layer_keep" in [t.name for t in self.engine.info.inputs]:  # SD3: every transformer block kept
            extra["layer_keep"] = np.ones(self.engine.info.input("layer_keep").shape, dtype=np.float32)
        extra.update(self.pipeline.zero_residuals)  # the ControlNet residuals, zeros as generate feeds them without one
        return {**inputs, **extra, "timestep": np.full(2, 500.0, dtype=np.float32)}

    def unet(self, feeds):
        return self.engine.run(feeds)

    def e2e(self, height, width, steps):
        self.pipeline.generate(self._request(steps))


PEERS = {
    "diffusers": DiffusersPeer,
    "optimum-ort": OptimumOrtPeer,
    "openvino-fp32": OpenVinoPeer,
    "openvino-default": OpenVinoDefaultPeer,
    "diffusers-cuda-fp16": DiffusersCudaPeer,
    "diffusers-compile": DiffusersCompilePeer,
    "optimum-ort-cuda": OptimumOrtCudaPeer,
}


def _say_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("peer")
    parser.add_argument("--model", required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--engine", help="sdfast engine dir (sdfast peers)")
    parser.add_argument("--mode", help="an sdfast fast mode, fast_modes.py's syntax (sdfast-cpu-fast)")
    args = parser.parse_args()

    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything a library prints goes to stderr
    sys.stdout = sys.stderr

    def answer(**fields) -> None:
        answers.write(json.dumps(fields) + "\n")

    started = time.perf_counter()
    try:
        if args.peer.startswith("sdfast-"):
            peer = SdfastPeer(args, args.peer.removeprefix("sdfast-").removesuffix("-fast"))
        else:
            peer = PEERS[args.peer](args)
    except Exception as error:  # noqa: BLE001 - reported to the parent as the peer's exact error
        answer(ok=False, error=f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}")
        return 1
    load_s = getattr(peer, "load_s", time.perf_counter() - started)
    feeds = peer.feeds(unet_inputs(args.model, args.height, args.width))
    output = np.asarray(peer.unet(feeds)[0] if isinstance(peer, SdfastPeer) else _to_numpy(peer.unet(feeds)))
    answer(ok=True, load_s=load_s, precision=peer.precision, output_rms=float(np.sqrt(np.mean(output.astype(np.float64) ** 2))))
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            break
        if command["op"] == "unet":
            samples = []
            for _ in range(command["n"]):
                tick = time.perf_counter()
                peer.unet(feeds)
                samples.append((time.perf_counter() - tick) * 1e3)
            answer(ok=True, unet_ms=samples)
        elif command["op"] == "e2e":
            tick = time.perf_counter()
            peer.e2e(args.height, args.width, command["steps"])
            answer(ok=True, e2e_ms=(time.perf_counter() - tick) * 1e3)
    return 0


def _to_numpy(output) -> np.ndarray:
    value = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
    if isinstance(value, dict):
        value = value.get("sample", value.get("out_sample", next(iter(value.values()))))
    return value.detach().float().cpu().numpy() if hasattr(value, "detach") else np.asarray(value, dtype=np.float32)


if __name__ == "__main__":
    sys.exit(main())
