"""Text-to-image over an engine dir: tokenize, encode, run the sampler loop on the U-Net engine, decode."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sdfast.errors import EngineError, RequestError, StopSampling
from sdfast.runtime.backends import Engine
from sdfast.runtime.control import is_residual
from sdfast.runtime.controlnets import ControlNets
from sdfast.runtime.device_loop import LoopInputs, check_finite, run_on_host
from sdfast.runtime.families import Family
from sdfast.runtime.generation import GenerationRequest, GenerationResult, SkipLayerGuidance, StageTimings
from sdfast.runtime.image_source import ImageSource
from sdfast.runtime.images import to_uint8
from sdfast.runtime.infotexts import generation_infotext
from sdfast.runtime.lora.active import PipelineLoras
from sdfast.runtime.manifest import Manifest
from sdfast.runtime.refiner import HandOff, LatentSource, base_steps, check_pair, check_switch, refiner_start
from sdfast.runtime.request_check import RequestChecker
from sdfast.runtime.step_cache import check_loras as check_step_cache_loras
from sdfast.runtime.guidance_truncation import last_guided_evaluation
from sdfast.runtime.vae_calls import decode_latents, encode_images
from sdfast.sampling.denoiser import Denoiser
from sdfast.sampling.noise import TorchCompatibleGenerator
from sdfast.sampling.schedules import SamplingPlan
from sdfast.sampling.tables import sampler_table

LOOPS = ("auto", "table", "numpy")
StepCallback = Callable[[int, int], None]  # (steps done, total steps)
LatentsCallback = Callable[[np.ndarray], None]  # a step's x0 estimate [B, C, h, w] (live previews); not every loop gives one
LoadProgress = Callable[[str, int, int], None]  # (stage: 'verify' in bytes or 'load' in sessions, done, total)


class _LatestEstimate:
    """The denoiser, keeping its latest estimate x0 [B, C, h, w]: what a stopped loop decodes (A1111's Sampler.last_latent)."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser, self.prediction_type, self.latest = denoiser, denoiser.prediction_type, None

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        self.latest = self.denoiser(x, sigma)
        return self.latest


class Pipeline:
    """A loaded engine dir. Thread-compatible, not thread-safe: serialize calls to ``generate``."""

    def __init__(self, manifest: Manifest, engines: dict[str, Engine], family: Family, scheduler_config: dict, backend: str):
        self.manifest = manifest
        self.engines = engines
        self.loaded_components = tuple(engines)  # what Pipeline.load made sessions of (a LoRA switch re-creates some)
        self.family = family  # the model family's runtime side: conditioning and latent layout
        self.checker = RequestChecker(manifest, scheduler_config)
        self.scheduler_config = scheduler_config
        self.schedule = self.checker.schedule
        self.backend = backend
        self.checker.backend = backend
        self.loop = "auto"  # "auto": the engine's device loop where it has one; "table": the tabulated loop in numpy; "numpy": the samplers
        self.load_timings: dict[str, float] = {}  # seconds: verify (hashing), engines (sessions), total
        self._tables: dict[tuple, object] = {}
        checker = self.checker
        self.height, self.width, self.batch_size, self.guidance = checker.height, checker.width, checker.batch_size, checker.guidance
        self.latent_shape, self.text_layers, self.inpainting_unet = checker.latent_shape, checker.text_layers, checker.inpainting_unet
        self.max_text_chunks = int(manifest.geometry["max_text_chunks"])  # longest prompt, in 75-token chunks
        self.refiner: Pipeline | None = None  # SDXL's second stage: the schedule's low-noise steps (attach_refiner)
        self.controlnets = ControlNets(manifest)  # Pipeline.load gives it the backend that loads them on first use
        self.loras = PipelineLoras(self)  # the LoRAs the engines hold; Pipeline.load gives it the backend, the caller a LoraLibrary
        # the U-Net's ControlNet residual inputs, zeros when no ControlNet runs: np.zeros maps the zero page, so
        # they cost no memory until written, and the GPU loops bind them once with the rest of the conditioning
        self.zero_residuals = {spec.name: np.zeros(spec.shape, dtype=np.float32)
                               for spec in engines[manifest.denoiser].info.inputs if is_residual(spec.name)}
        self.sizes: dict[tuple[int, int], Pipeline] = {(self.width, self.height): self}  # (width, height) -> its pipeline

    def at_size(self, width: int | None, height: int | None) -> "Pipeline":
        """The pipeline of the engine dir's graphs at ``width`` x ``height`` (None: this one's); they share the text
        encoders and, on the CPU, one copy of the weights (a size that runs a LoRA holds its own patched tensors).
        A RequestError lists the sizes the engine dir has."""
        width = self.width if width is None else width
        height = self.height if height is None else height
        found = self.sizes.get((width, height))
        if found is None:
            raise RequestError(f"this engine dir serves {self.manifest.sizes_text} (width x height), not {width}x{height} "
                               "(export more sizes with sdfast export --size WxH)")
        if found is not self:
            found.loras.library = self.loras.library  # one LoRA directory for every size
        return found

    def attach_refiner(self, refiner: "Pipeline") -> None:
        """Let requests with ``refiner_switch`` hand their latents to ``refiner`` there, as diffusers' denoising_end/start."""
        check_pair(refiner, self)
        self.refiner = refiner

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str = "cpu", verify: str = "full", loop: str = "auto",
             progress: LoadProgress | None = None) -> "Pipeline":
        """Read and check the manifest, verify the files this backend reads, then create the engines.

        ``verify``: 'full' (sha256) or 'size', of the files the chosen backend loads (``sdfast info --verify`` checks every
        file). ``loop``: 'auto' runs the sampler loop on the device where the backend can (cuda, tensorrt) and as numpy
        samplers elsewhere; 'table' runs the device loop's arithmetic in numpy (what CI checks); 'numpy' always runs the
        samplers. ``progress(stage, done, total)``: 'verify' in bytes hashed, then 'load' in sessions (every size's).
        """
        if loop not in LOOPS:
            raise RequestError(f"loop must be one of {', '.join(LOOPS)}, not '{loop}'")
        if verify not in ("full", "size"):
            raise RequestError(f"verify must be 'full' or 'size', not '{verify}'")
        from sdfast.runtime.loading import load_pipeline

        try:
            pipeline = load_pipeline(cls, engine_dir, backend, verify, progress)
            for sized in pipeline.sizes.values():
                sized.loop = loop
            return pipeline
        except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as error:
            raise EngineError(f"engine dir {engine_dir}: unusable ({type(error).__name__}: {error})") from None

    # -- request checks -------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Raise RequestError for anything this engine cannot serve, without running it (the server checks before queuing)."""
        check_step_cache_loras(request)
        if request.hires is not None:
            from sdfast.runtime.hires import check_hires

            return check_hires(self, request)
        sized = self._sized(request)
        if sized is not self:
            return sized.validate(request)
        self.checker.prepare(request)
        self.loras.for_request(request)

    # -- stages ---------------------------------------------------------------------------------------

    def _unet_function(self, conditioning: dict[str, np.ndarray], cfg_scale: float, use_cfg: bool, timings: StageTimings,
                       masked: np.ndarray | None, skip_layers: SkipLayerGuidance | None = None, steps: int = 0, control=None,
                       step_cache: int | None = None, last_guided: int | None = None, int8: bool = False):
        """The guided denoiser call ``predict(x_in, timestep)`` (sdfast.runtime.unet_call)."""
        from sdfast.runtime.unet_call import guided_unet

        return guided_unet(self, conditioning, cfg_scale, use_cfg, timings, masked, skip_layers, steps, control, step_cache,
                           last_guided, int8)

    def encode_image(self, image: np.ndarray, tiled: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """[n, 3, H, W] in [-1, 1], n up to the encoder's batch -> the VAE posterior (mean, std), each [n, 4, h, w],
        already times the scaling factor (sdfast.runtime.vae_calls; ``tiled``: in blended tiles)."""
        return encode_images(self, image, tiled)

    def decode(self, latents: np.ndarray, decoder: str = "full", tiled: bool = False) -> np.ndarray:
        """VP latents [B, 4, h, w] -> images [B, 3, H, W] in [-1, 1] (sdfast.runtime.vae_calls): ``decoder`` 'full' or
        'tiny' (TAESD); ``tiled``: the full decoder in blended tiles."""
        return decode_latents(self, latents, decoder, tiled)

    # -- the whole thing ------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None) -> GenerationResult:
        """Every image of the request: n_iter batches of batch_size images, seeds seed, seed + 1, ..."""
        batches = list(self.generate_batches(request, on_step))
        shape = batches[0].images.shape[1:]
        if any(b.images.shape[1:] != shape for b in batches):  # hires fix stopped in a later batch's first pass
            batches[0].warnings.append("a batch was interrupted before its hires pass: its base-size images are left out "
                                       "(generate_batches yields them)")
            batches = [b for b in batches if b.images.shape[1:] == shape]
        timings = StageTimings(
            text_encoder=batches[0].timings.text_encoder, vae_encode=batches[0].timings.vae_encode,
            unet_steps=[t for b in batches for t in b.timings.unet_steps], vae_decode=sum(b.timings.vae_decode for b in batches),
            total=sum(b.timings.total for b in batches), controlnet_s=sum(b.timings.controlnet_s for b in batches),
            host_queue_s=None if batches[0].timings.host_queue_s is None else sum(b.timings.host_queue_s or 0.0 for b in batches),
        )
        return GenerationResult(
            np.concatenate([b.images for b in batches]), [s for b in batches for s in b.seeds],
            [p for b in batches for p in b.parameters], np.concatenate([b.latents for b in batches]), timings, batches[0].warnings,
            batches[-1].steps_run,
        )

    def generate_batches(self, request: GenerationRequest, on_step: StepCallback | None = None,
                         decode: bool = True, on_latents: LatentsCallback | None = None) -> Iterator[GenerationResult]:
        """``generate`` one batch at a time, so a caller can save each batch as soon as it is done.

        The request is checked, and the prompt (and init image) encoded, before the first batch; the first result carries
        those stages' timings and every warning. When ``on_step`` raises StopSampling, the batch it stopped is decoded
        from the loop's latest x0 estimate (its ``steps_run`` set, its infotext saying so) and no later batch runs, as
        A1111's interrupt; a loop that left no estimate lets the StopSampling through. ``decode``: False leaves the
        results' images None (hires fix's latent upscalers need the latents only).
        """
        if request.hires is not None:
            from sdfast.runtime.hires import hires_batches

            yield from hires_batches(self, request, on_step, on_latents)
            return
        sized = self._sized(request)
        if sized is not self:
            yield from sized.generate_batches(request, on_step, decode, on_latents)
            return
        prepared = self.checker.prepare(request)
        batch, spec, plan, strength = prepared.batch, prepared.spec, prepared.plan, prepared.strength
        second = self._refiner_stage(request, spec, plan) if request.refiner_switch is not None else None
        self.controlnets.load(unit.model for unit in request.control)  # the first use of a ControlNet loads it: not a step's time
        check_step_cache_loras(request)
        prompt, loras = self.loras.for_request(request)
        self.loras.apply(loras)  # a session rebuild when the engines hold other LoRAs; not a step's time either
        started = time.perf_counter()
        timings, warnings = StageTimings(), []
        use_cfg = self.guidance and request.cfg_scale > 1  # as diffusers: guidance only above 1

        stage = time.perf_counter()
        conditioning = {**self.family.conditioning(prompt, request.negative_prompt, request.clip_skip, use_cfg, warnings),
                        **self.zero_residuals}
        if second:
            second["conditioning"] = {**self.refiner.family.conditioning(
                prompt, request.negative_prompt, request.clip_skip, use_cfg, []), **self.refiner.zero_residuals}
        timings.text_encoder = time.perf_counter() - stage

        source = ImageSource.from_latents(self, request.init_latents) if request.init_latents is not None else None
        if request.init_image is not None:
            stage = time.perf_counter()
            source = ImageSource.encode(self, request.init_image, request.mask, request.vae_tiling)
            timings.vae_encode = time.perf_counter() - stage

        image_steps = plan.steps if second is None else second["handoff"] + second["plan"].steps
        total_steps = image_steps * request.n_iter
        for iteration in range(request.n_iter):
            seeds = ([request.seeds[iteration * batch + i] for i in range(batch)] if request.seeds is not None
                     else [request.seed + iteration * batch + i for i in range(batch)])
            done = iteration * image_steps
            progress = _progress(on_step, on_latents, done, total_steps)
            decoder = self
            try:
                if second is None:
                    x = self._sample(request, spec, plan, conditioning, use_cfg, seeds, source, strength, timings, progress)
                else:
                    x = self._sample(request, spec, plan, conditioning, use_cfg, seeds, None, None, timings, progress,
                                     stop_after=second["handoff"])  # x: [B, 4, h, w], VE form, unfinished
                    decoder = self.refiner
                    later = _progress(on_step, on_latents, done + second["handoff"], total_steps)
                    x = decoder._sample(request, spec, second["plan"], second["conditioning"], use_cfg, seeds, LatentSource(x),
                                        None, timings, later)
                steps_run = None
            except StopSampling as stop:
                if stop.latents is None:
                    raise
                x, steps_run = stop.latents, stop.steps_run  # x: [B, 4, h, w], the x0 estimate (the same in VE and VP form)
            stage = time.perf_counter()
            images = to_uint8(decoder.decode(x, request.vae_decoder, request.vae_tiling))[:batch] if decode else None
            timings.vae_decode = time.perf_counter() - stage
            timings.total = time.perf_counter() - started
            stopped = None if steps_run is None else f"after {steps_run} of {plan.steps} steps"
            parameters = [generation_infotext(self, request, spec.a1111_name, seed, batch, index, strength, stopped)
                          for index, seed in enumerate(seeds)]
            yield GenerationResult(images, seeds, parameters, x[:batch], timings, warnings if iteration == 0 else [], steps_run)
            if steps_run is not None:
                return  # A1111 skips the rest of the batch count once interrupted
            timings, started = StageTimings(), time.perf_counter()

    def _sized(self, request: GenerationRequest) -> "Pipeline":
        """The pipeline at the request's size; RequestError for a size the engine dir lacks, or a ControlNet or refiner
        at a size other than the default (they are exported at that size)."""
        sized = self.at_size(request.width, request.height)
        default = next(iter(self.sizes.values()))  # the engine dir's first size (every size's pipeline shares ``sizes``)
        if sized is not default:
            if request.control:
                raise RequestError(f"ControlNets run at the engine dir's default size {default.width}x{default.height} only, "
                                   f"not at {sized.width}x{sized.height}")
            if request.refiner_switch is not None:
                raise RequestError(f"the refiner runs at the engine dir's default size {default.width}x{default.height} only")
        return sized

    def _refiner_stage(self, request: GenerationRequest, spec, plan: SamplingPlan) -> dict:
        """The refiner's plan from its first step, and how many steps the base runs; RequestError when they cannot split."""
        switch, refiner = check_switch(request.refiner_switch), self.refiner
        if refiner is None:
            raise RequestError("a refiner switch needs a refiner (generate --refiner, serve --refiner)")
        if request.init_image is not None:
            raise RequestError("the refiner follows txt2img only; run img2img on the refiner's engine dir itself")
        if spec.evaluates_twice or not spec.starts_late:
            raise RequestError(f"{spec.a1111_name} cannot hand its latents over part-way to a refiner; choose another sampler")
        handoff = base_steps(plan, switch, self.schedule.num_train_timesteps)
        full = refiner.checker.prepare(request).plan
        start = refiner_start(full, switch, refiner.schedule.num_train_timesteps)
        if not 0 < handoff < plan.steps or start >= full.steps:
            raise RequestError(f"refiner switch {switch} with {request.steps} steps leaves no step for the base or for the refiner")
        return {"handoff": handoff, "plan": full.starting_at(start)}

    def _sample(self, request, spec, plan, conditioning, use_cfg, seeds, source, strength, timings, progress,
                stop_after: int | None = None) -> np.ndarray:
        """One batch: initial latents from the seeds (and the image), the sampler loop, back to VP form. -> [B_engine, 4, h, w].

        ``stop_after``: hand the latents over unfinished (VE form) after that many steps, for a refiner.
        """
        # Image i draws from a torch-compatible generator seeded seed + i, in diffusers' order; rows past the requested
        # batch (the engine's batch is fixed) repeat the first seed and are dropped.
        row_seeds = [seeds[row] if row < len(seeds) else seeds[0] for row in range(self.batch_size)]
        generators = [TorchCompatibleGenerator(seed) for seed in row_seeds]
        one = (1, *self.latent_shape)

        def draw(shape: tuple[int, ...] = one) -> np.ndarray:  # one draw per image: [B, ...]
            return np.concatenate([g.randn((1, *shape[1:])) for g in generators])

        masked = None
        if source is None:
            x = draw() * np.float32(plan.initial_noise_scale)  # x: [B, 4, h, w], VE form
            # the device loop's tables have no third (skip-layer) call and no ControlNet: such requests take the numpy loop
            tabulated = (stop_after is None and request.skip_layer_guidance is None and not request.control
                         and request.step_cache in (None, 1) and request.guidance_stop is None and not request.int8)
            table = self._table(request, spec, plan) if tabulated else None
            if table is not None:
                return self._sample_tabulated(table, x, draw, conditioning, request.cfg_scale, use_cfg, timings, progress)
        else:
            x, masked = source.initial_latents(draw, plan, strength, self.inpainting_unet)

        steps_done = 0  # the sampler's steps finished so far: the step a model evaluation belongs to
        control = None
        if request.control:
            units = tuple(request.control)

            def control_residuals(x_rows: np.ndarray, timesteps: np.ndarray, timestep: float):  # the step's residuals, or None
                started = time.perf_counter()
                residuals = self.controlnets.residuals(units, conditioning, x_rows, timesteps, steps_done, plan.steps, use_cfg)
                timings.controlnet_s += time.perf_counter() - started
                return residuals

            control = control_residuals

        denoiser = _LatestEstimate(Denoiser(
            self._unet_function(conditioning, request.cfg_scale, use_cfg, timings, masked, request.skip_layer_guidance, request.steps,
                                control, request.step_cache, last_guided_evaluation(plan.steps, request.guidance_stop), request.int8),
            self.manifest.prediction_type,
            lambda sigma: plan.timestep_for(sigma, self.schedule),
        ))

        def counted(i: int, x: np.ndarray) -> None:
            nonlocal steps_done
            steps_done = i + 1
            if progress:
                progress(i, denoiser.latest)  # the step's x0 estimate (live previews); may raise StopSampling
            if steps_done == stop_after:
                raise HandOff(x)

        blends = source is not None and source.blends(self.inpainting_unet)
        callback, model = (source.blend_callback(plan, counted), source.blending_model(denoiser, plan)) if blends else (counted, denoiser)
        # DPM++ SDE: image i's Brownian tree is seeded with its seed, i.e. diffusers' noise_sampler_seed = seed
        options = {"seeds": row_seeds} if spec.seeded_tree else {}
        if spec.takes_eta:
            options["eta"] = float(request.eta)
        try:
            x = spec.run(model, x, plan, callback, scheduler_config=spec.config_for(self.scheduler_config), noise=draw, **options)
        except HandOff as handoff:
            return handoff.latents
        except StopSampling as stop:
            stop.latents = source.keep_known(denoiser.latest) if blends else denoiser.latest  # [B, 4, h, w] x0
            stop.steps_run = steps_done
            raise
        x = x * np.float32(plan.final_scale)  # x: [B, 4, h, w], VP form
        return source.keep_known(x) if blends else x

    def _table(self, request: GenerationRequest, spec, plan: SamplingPlan):
        """The sampler's coefficient table when this request runs the tabulated loop, else None (the numpy samplers)."""
        device_loop = getattr(self.engines[self.manifest.denoiser], "table_loop", None)
        if self.loop == "numpy" or (self.loop == "auto" and device_loop is None):
            return None
        key = (spec.key, request.steps, float(request.eta))
        if key not in self._tables:
            self._tables[key] = sampler_table(spec, plan, self.scheduler_config, self.manifest.prediction_type, self.schedule,
                                              float(request.eta))
        return self._tables[key]  # None: this sampler is not a fixed linear recurrence (DPM++ SDE's Brownian tree)

    def _sample_tabulated(self, table, x, draw, conditioning, cfg_scale, use_cfg, timings: StageTimings, progress) -> np.ndarray:
        """The loop over the table, on the device (cuda, tensorrt) or in numpy; noise drawn up front in the samplers' order."""
        noise = np.stack([draw() for _ in range(table.noise_draws)]) if table.noise_draws else None  # [draws, B, 4, h, w]
        inputs = LoopInputs(table, x, conditioning, float(cfg_scale), use_cfg, self.guidance, noise)
        step_of = {int(done): step for step, done in enumerate(table.step_ends)}
        steps_done = 0

        def on_eval(done: int, seconds: float) -> None:
            nonlocal steps_done
            timings.unet_steps.append(seconds)
            if done in step_of:
                steps_done = step_of[done] + 1
                if progress:
                    progress(step_of[done], None)  # may raise StopSampling

        unet = self.engines[self.manifest.denoiser]
        device_loop = getattr(unet, "table_loop", None)
        try:
            final = device_loop(inputs, on_eval) if self.loop == "auto" else run_on_host(unet, inputs, on_eval)
        except StopSampling as stop:
            stop.steps_run = steps_done  # in steps, as the numpy samplers count them; the loop set latents to its x0
            raise
        measured = getattr(getattr(unet, "_loop", None), "last", None) if self.loop == "auto" else None
        if measured:  # on the device the host only queues: the step time is the loop's wall time over its evaluations
            timings.unet_steps[-table.evaluations:] = [measured["wall_s"] / measured["evaluations"]] * measured["evaluations"]
            timings.host_queue_s = measured["host_s"]
        return final * np.float32(table.final_scale)  # [B, 4, h, w], VP form


def _progress(on_step: StepCallback | None, on_latents: LatentsCallback | None, done: int, total: int):
    """The sampler loop's callback ``(step index, x0 estimate or None)``: ``on_latents`` gets the estimate, ``on_step``
    (steps done of the whole request, total); None when neither is set."""
    if on_step is None and on_latents is None:
        return None

    def progress(index: int, x0: np.ndarray | None) -> None:
        if on_latents is not None and x0 is not None:
            on_latents(x0)
        if on_step is not None:
            on_step(done + index + 1, total)

    return progress
