"""AUTOMATIC1111's /sdapi/v1 routes (the subset webuiapi and the A1111 plug-ins use) over the server's models."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import secrets
import time

from fastapi import APIRouter, Request

from sdfast import __version__
from sdfast.errors import RequestError
from sdfast.runtime.images import init_image_array, mask_array, png_bytes
from sdfast.runtime.int8_unet import INT8
from sdfast.runtime.pipeline import GenerationRequest, GenerationResult
from sdfast.sampling.registry import FLOW_SAMPLERS, SAMPLERS, resolve_sampler
from sdfast.serve.context import ServeContext
from sdfast.serve.controlnet_api import control_units
from sdfast.serve.schemas import (
    A1111_STEPS,
    DEFAULT_CFG_SCALE,
    DEFAULT_REFINER_SWITCH,
    IMAGE_OPTIONS,
    SEED_LIMIT,
    FieldError,
    Img2ImgRequest,
    Txt2ImgRequest,
    _Request,
    decode_image,
)

DEEPCACHE_OPTIONS = ("deepcache_enable", "deepcache_full_run_step_rate")  # sd-webui-deepcache-standalone's, in /sdapi/v1/options
DEEPCACHE_DEFAULT_RATE = 5  # that extension's default full-run step rate
DECODE_METHODS = {"Full": "full", "TAESD": "tiny"}  # A1111's sd_vae_decode_method -> GenerationRequest.vae_decoder
INT8_OPTION = "sdfast_int8"  # sdfast's own option: the int8 U-Net of sdfast quantize (GenerationRequest.int8)
SERVER_OPTIONS = ("CLIP_stop_at_last_layers", "sd_vae_decode_method", INT8_OPTION, *DEEPCACHE_OPTIONS)  # what POST options sets


CHECKPOINT = "sd_model_checkpoint"  # A1111's option naming the model: server-wide, or per request in override_settings


def a1111_router(ctx: ServeContext) -> APIRouter:
    router, models, worker = APIRouter(), ctx.models, ctx.worker

    async def current():
        """The current model (A1111's sd_model_checkpoint option) and its pipeline."""
        return await ctx.model(None, CHECKPOINT)

    def requested(body: _Request):
        """The model a generation request names in override_settings.sd_model_checkpoint (else the current one)."""
        name = body.override_settings.get(CHECKPOINT)
        if name is not None and not isinstance(name, str):
            raise FieldError(f"override_settings.{CHECKPOINT}", f"must be a model's name or title, not {name!r}")
        return ctx.entry(name, f"override_settings.{CHECKPOINT}")

    @router.get("/sdapi/v1/samplers")
    async def samplers():
        _, pipeline = await current()
        table = FLOW_SAMPLERS if pipeline.checker.flow_model else SAMPLERS  # a flow model (SD3) has its own
        return [{"name": spec.a1111_name, "aliases": [spec.key] + ([spec.diffusers_class] if spec.diffusers_class else []), "options": {}}
                for spec in table.values()]

    @router.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]

    @router.get("/sdapi/v1/sd-models")
    async def sd_models():
        """A1111's fields, plus the family, the sizes each engine serves and whether it is loaded now; a loaded model's
        refiner is listed after it."""
        listed = []
        for entry in models.entries.values():
            listed.append(_model_listing(entry.name, entry.manifest, entry.pipeline is not None))
            refiner = entry.pipeline.refiner if entry.pipeline is not None else None
            if refiner is not None:
                listed.append(_model_listing(refiner.manifest.model_name, refiner.manifest, True))
        return listed

    @router.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        """A1111 rescans its models folder; sdfast re-reads the manifests of the engine dirs not loaded now."""
        await asyncio.to_thread(models.refresh)
        return None

    @router.get("/sdapi/v1/loras")
    async def loras():
        """A1111's Lora extension listing: name, alias, path and the file's safetensors metadata, per LoRA of --lora-dir."""
        _, pipeline = await current()
        return await asyncio.to_thread(pipeline.loras.library.listing)

    @router.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        return None  # the LoRA directory is read on every request: nothing to refresh

    @router.get("/sdapi/v1/scripts")
    async def scripts():
        _, pipeline = await current()
        scripts = ["controlnet"] if pipeline.controlnets.names else []  # the alwayson scripts this server runs
        return {"txt2img": scripts, "img2img": list(scripts)}

    @router.get("/sdapi/v1/options")
    async def get_options():
        entry = ctx.current()
        return {CHECKPOINT: entry.title, "CLIP_stop_at_last_layers": ctx.options["CLIP_stop_at_last_layers"],
                "deepcache_enable": bool(ctx.options.get("deepcache_enable", False)),
                "deepcache_full_run_step_rate": ctx.options.get("deepcache_full_run_step_rate", DEEPCACHE_DEFAULT_RATE),
                "sd_vae_decode_method": ctx.options.get("sd_vae_decode_method") or "Full",
                INT8_OPTION: bool(ctx.options.get(INT8_OPTION, False)),
                "samples_format": "png", "sd_checkpoint_hash": entry.manifest.data["source"].get("fingerprint")}

    @router.post("/sdapi/v1/options")
    async def set_options(request: Request):
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            raise FieldError("body", "is not valid JSON", status=400) from None
        if not isinstance(body, dict):
            raise FieldError("body", "must be a JSON object of option names and values")
        name = body.get(CHECKPOINT)
        if name is not None and not isinstance(name, str):
            raise FieldError(CHECKPOINT, f"must be a model's name or title, not {name!r}")
        entry, pipeline = await ctx.model(name, CHECKPOINT)  # A1111 loads the checkpoint before it answers: so does sdfast
        _check_options({**ctx.options, **body}, "", pipeline)  # the options in force after this post, against its model
        models.current = entry.name
        for name in SERVER_OPTIONS:
            if name in body:
                ctx.options[name] = body[name]
        return True

    def _check_options(options: dict, prefix: str, pipeline) -> None:
        """Refuse A1111 options that would change the image in a way sdfast does not, or that ``pipeline``'s engine dir
        cannot serve (a FieldError named ``prefix`` + option). The checkpoint is checked where the model is picked."""
        if "CLIP_stop_at_last_layers" in options:
            value, layers = options["CLIP_stop_at_last_layers"], int(pipeline.manifest.model["text_layers"])
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= layers:
                raise FieldError(f"{prefix}CLIP_stop_at_last_layers", f"must be an integer from 1 to {layers}, not {value!r}")
        _check_deepcache(options, prefix, pipeline)
        method = options.get("sd_vae_decode_method")
        if method is not None and (not isinstance(method, str) or method not in DECODE_METHODS):
            raise FieldError(f"{prefix}sd_vae_decode_method", f"must be one of {', '.join(DECODE_METHODS)}, not {method!r}")
        if method == "TAESD" and "vae_decoder_tiny" not in pipeline.manifest.components:
            raise FieldError(f"{prefix}sd_vae_decode_method", "this engine dir has no tiny VAE decoder: export it with "
                                                              "sdfast export --vae-decoder DIR")
        int8 = options.get(INT8_OPTION)
        if int8 is not None and not isinstance(int8, bool):
            raise FieldError(f"{prefix}{INT8_OPTION}", f"must be true or false, not {int8!r}")
        if int8 and INT8 not in pipeline.manifest.components:
            raise FieldError(f"{prefix}{INT8_OPTION}", "this engine dir has no int8 U-Net: add it with sdfast quantize ENGINE_DIR")
        for name, allowed in IMAGE_OPTIONS.items():
            if name in options and options[name] is not None and options[name] not in allowed:
                raise FieldError(f"{prefix}{name}", f"{options[name]!r} is not supported by sdfast (the image would come out without it); "
                                                    f"leave it at {allowed[0]!r}")

    progress_view = ctx.progress

    @router.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        return progress_view.answer(skip_current_image)

    @router.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @router.post("/sdapi/v1/skip")
    async def skip():
        worker.interrupt()
        return {}

    @router.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: Request):
        entry = requested(body)
        async with ctx.using(entry) as (pipeline, hold):  # held from here: no other model's load unloads it meanwhile
            sized = _sized(body, pipeline)
            control = await asyncio.to_thread(control_units, body, sized)  # decoding and canny stay off the event loop
            generation = dataclasses.replace(_generation(body, pipeline), control=control)
            results = await ctx.run(pipeline, hold, generation, request)
            return await asyncio.to_thread(_a1111_response, body, generation, results, entry, pipeline)

    @router.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest, request: Request):
        if not body.init_images:
            raise FieldError("init_images", "img2img needs one init image (base64)")
        entry = requested(body)
        async with ctx.using(entry) as (pipeline, hold):
            sized = _sized(body, pipeline)
            init, mask = await asyncio.to_thread(_images, body, sized)  # decoding and resizing stay off the event loop
            control = await asyncio.to_thread(control_units, body, sized, lambda: decode_image("init_images", body.init_images[0]))
            generation = dataclasses.replace(_generation(body, pipeline, init, mask, body.denoising_strength), control=control)
            results = await ctx.run(pipeline, hold, generation, request)
            return await asyncio.to_thread(_a1111_response, body, generation, results, entry, pipeline)

    def _sized(body: _Request, pipeline):
        """The pipeline of the engine dir's graphs at the request's width x height (its default size when not given)."""
        try:
            return pipeline.at_size(body.width, body.height)
        except RequestError as error:
            widths = {width for width, _ in pipeline.manifest.sizes}  # a served width: the height is what the dir lacks
            raise FieldError("height" if (body.width or pipeline.width) in widths else "width", str(error)) from None

    def _images(body: Img2ImgRequest, sized):
        warnings: list[str] = []
        try:
            init = init_image_array(decode_image("init_images", body.init_images[0]), sized.width, sized.height, warnings)
        except RequestError as error:
            raise FieldError("init_images", str(error)) from None
        mask = None
        if body.mask:
            try:
                mask = mask_array(decode_image("mask", body.mask), sized.width, sized.height, warnings)
            except RequestError as error:
                raise FieldError("mask", str(error)) from None
            mask = 1.0 - mask if body.inpainting_mask_invert else mask
        return init, mask

    def _generation(body: _Request, pipeline, init=None, mask=None, strength: float | None = None) -> GenerationRequest:
        problem = body.unsupported()
        if problem:
            raise problem
        sized = _sized(body, pipeline)
        seed_size = (body.seed_resize_from_w, body.seed_resize_from_h)
        if min(seed_size) > 0 and seed_size != (sized.width, sized.height):  # A1111 resizes the seed's noise when both are set
            raise FieldError("seed_resize_from_w", "resizing a seed from another size is not supported by sdfast; leave it at -1")
        # the server's options in force are checked against this request's model too (set for another, they may not fit it)
        _check_options({k: v for k, v in ctx.options.items() if k not in body.override_settings}, "options.", pipeline)
        _check_options(body.override_settings, "override_settings.", pipeline)
        sampler = _sampler(body, pipeline)
        eta = body.eta
        if eta is not None and not sampler.takes_eta:
            if eta not in (0.0, 1.0):  # 1.0 is A1111's ancestral default, which webuiapi always sends
                raise FieldError("eta", f"eta applies to DDIM only, not to {sampler.a1111_name}")
            eta = None
        refiner_switch = _refiner_switch(body, pipeline)
        hires = body.hires() if isinstance(body, Txt2ImgRequest) else None
        clip_skip = body.override_settings.get("CLIP_stop_at_last_layers") or ctx.options["CLIP_stop_at_last_layers"]
        seed = body.seed if body.seed >= 0 else secrets.randbelow(SEED_LIMIT - 1)
        total = body.batch_size * body.n_iter
        batch = max(d for d in range(1, min(total, pipeline.batch_size) + 1) if total % d == 0)
        if hires is not None:
            _check_hires(body, hires, sized, pipeline)
        options = {**ctx.options, **body.override_settings}  # a request's override_settings over the server's options
        return GenerationRequest(
            prompt=body.prompt, negative_prompt=body.negative_prompt, cfg_scale=_cfg_scale(body, pipeline), seed=seed,
            sampler=sampler.key, height=sized.height, width=sized.width, batch_size=batch, n_iter=total // batch, clip_skip=clip_skip,
            steps=body.steps if body.steps is not None else pipeline.checker.default_steps or A1111_STEPS,
            init_image=init, mask=mask, strength=strength if init is not None else None, eta=eta or 0.0,
            seeds=[seed + i for i in range(total)], refiner_switch=refiner_switch, hires=hires,
            step_cache=_step_cache(options), vae_decoder=DECODE_METHODS[options.get("sd_vae_decode_method") or "Full"],
            int8=bool(options.get(INT8_OPTION)),
        )

    def _check_deepcache(options: dict, prefix: str, pipeline) -> None:
        """sd-webui-deepcache's options: deepcache_enable (bool) and deepcache_full_run_step_rate (the full U-Net every N steps)."""
        from sdfast.runtime.step_cache import MAX_INTERVAL, SHALLOW

        enable, rate = options.get("deepcache_enable"), options.get("deepcache_full_run_step_rate")
        if enable is not None and not isinstance(enable, bool):
            raise FieldError(f"{prefix}deepcache_enable", f"must be true or false, not {enable!r}")
        if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool) or not 1 <= rate <= MAX_INTERVAL):
            raise FieldError(f"{prefix}deepcache_full_run_step_rate", f"must be an integer from 1 to {MAX_INTERVAL}, not {rate!r}")
        if enable and SHALLOW not in pipeline.manifest.components:
            raise FieldError(f"{prefix}deepcache_enable", "this engine dir has no shallow U-Net for step caching: export it with "
                                                          "sdfast export --step-cache")

    def _step_cache(options: dict) -> int | None:
        """The request's step-cache interval from the DeepCache options (the extension's default rate is 5), or None."""
        return options.get("deepcache_full_run_step_rate", DEEPCACHE_DEFAULT_RATE) if options.get("deepcache_enable") else None

    def _check_hires(body: Txt2ImgRequest, hires, sized, pipeline) -> None:
        """A FieldError naming the hr_* field a hires-fix request cannot have (its size is checked against the sizes)."""
        from sdfast.runtime.hires import check_request

        try:
            check_request(GenerationRequest(body.prompt, hires=hires), sized.width, sized.height, pipeline.manifest)
        except RequestError as error:
            text = str(error)
            field = ("hr_resize_x" if hires.resize_width or hires.resize_height else "hr_scale") if text.startswith("hires fix to") \
                else "hr_upscaler" if "upscaler" in text else "denoising_strength" if "strength" in text else "enable_hr"
            raise FieldError(field, text) from None

    def _refiner_switch(body: _Request, pipeline) -> float | None:
        """A1111's refiner_checkpoint (its name, "name [hash]" title or hash) names the refiner this server loaded."""
        if body.refiner_checkpoint in (None, "", "None"):
            return None
        refiner = pipeline.refiner
        if refiner is None:
            raise FieldError("refiner_checkpoint", f"{body.refiner_checkpoint!r}: this server has no refiner (sdfast serve --refiner DIR)")
        manifest = refiner.manifest
        if body.refiner_checkpoint not in (manifest.model_name, f"{manifest.model_name} [{manifest.model_hash}]", manifest.model_hash):
            raise FieldError("refiner_checkpoint", f"{body.refiner_checkpoint!r}: this server's refiner is '{manifest.model_name} [{manifest.model_hash}]'")
        return body.refiner_switch_at if body.refiner_switch_at is not None else DEFAULT_REFINER_SWITCH

    def _cfg_scale(body: _Request, pipeline) -> float:
        """The request's, else A1111's 7 where the engine guides and 1 where it was exported without guidance."""
        if body.cfg_scale is not None:
            return body.cfg_scale
        return DEFAULT_CFG_SCALE if pipeline.guidance else 1.0

    def _sampler(body: _Request, pipeline):
        name = body.sampler_name or body.sampler_index or pipeline.checker.default_sampler or "Euler a"
        scheduler = (body.scheduler or "automatic").strip().lower()
        if scheduler not in ("automatic", "karras"):
            raise FieldError("scheduler", f"'{body.scheduler}' is not supported: use automatic, or karras")
        try:
            spec = resolve_sampler(name, pipeline.checker.flow_model)
        except RequestError as error:
            raise FieldError("sampler_name", str(error)) from None
        if scheduler == "karras" and "karras" not in spec.key:
            try:
                spec = resolve_sampler(f"{spec.a1111_name} Karras", pipeline.checker.flow_model)
            except RequestError:
                raise FieldError("scheduler", f"{spec.a1111_name} has no Karras form; use scheduler automatic") from None
        return spec

    def _a1111_response(body: _Request, generation: GenerationRequest, results: list[GenerationResult], entry, pipeline) -> dict:
        encoded = [base64.b64encode(png_bytes(r.images[0], r.parameters[0])).decode() for r in results]
        seeds = [r.seeds[0] for r in results]
        infotexts = [r.parameters[0] for r in results]
        spec = resolve_sampler(generation.sampler, pipeline.checker.flow_model)
        info = {
            "prompt": generation.prompt, "all_prompts": [generation.prompt] * len(results),
            "negative_prompt": generation.negative_prompt, "all_negative_prompts": [generation.negative_prompt] * len(results),
            "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(results), "subseed_strength": 0,
            "width": generation.width, "height": generation.height, "sampler_name": spec.a1111_name, "cfg_scale": generation.cfg_scale,
            "steps": generation.steps, "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": entry.name, "sd_model_hash": entry.manifest.model_hash, "sd_vae_name": None,
            "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": generation.strength,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": generation.clip_skip,
            "is_using_inpainting_conditioning": bool(pipeline.inpainting_unet and generation.mask is not None),
            "version": f"sdfast {__version__}",
        }
        parameters = {**body.model_dump(exclude={"init_images", "mask"}), "width": generation.width, "height": generation.height,
                      "cfg_scale": generation.cfg_scale}  # the values served, where the request left them to the engine
        return {"images": encoded, "parameters": parameters, "info": json.dumps(info)}

    return router


def _model_listing(name: str, manifest, loaded: bool) -> dict:
    """One model as A1111's /sdapi/v1/sd-models lists it, with sdfast's family, sizes and whether it is loaded."""
    return {"title": f"{name} [{manifest.model_hash}]", "model_name": name, "hash": manifest.model_hash,
            "sha256": manifest.data["source"].get("fingerprint"), "filename": manifest.root.name, "config": None,
            "family": manifest.family, "sizes": manifest.sizes_text.split(", "), "loaded": loaded}
