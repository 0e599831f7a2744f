"""sdfast on Ray Serve: the A1111 and OpenAI routes of `sdfast serve`, unchanged for clients, over engine replicas.

An ingress deployment reads which model a request names (A1111's sd_model_checkpoint, OpenAI's model; else the current
one) and hands the request to the engine replicas through a DeploymentHandle with that model as Ray Serve's
multiplexed model id, so it goes to a replica that holds the model already. Each replica runs sdfast's own app
(create_app) in-process: the same validation, errors, queue, micro-batching, models and metrics as `sdfast serve`.

    serve run sdfast.serve.ray_app:build engines=/models/sd15-512 replicas=2      # or a config file: docs/ray/
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sdfast.serve.asgi_call import call_asgi

A1111_GENERATION = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
OPTIONS_PATH = "/sdapi/v1/options"
CHECKPOINT = "sd_model_checkpoint"
REPLICA_HEADER = "x-sdfast-replica"  # which replica answered: for logs, load tests and the tests' spread check


@dataclass
class RayServeConfig:
    """What `sdfast serve --ray` and a Ray Serve config's ``args`` say; every field JSON-serializable."""

    engines: list[tuple[str | None, str]]  # (name or None, engine dir), the first the default model
    backend: str = "cpu"
    verify: str = "full"
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, scaled on ongoing requests
    cpus_per_replica: float = 1.0  # Ray's CPUs for each replica; onnxruntime gets as many intra-op threads
    max_loaded: int | None = None  # models per replica (Ray Serve's max_num_models_per_replica)
    max_queue: int = 16  # requests the ingress holds for busy replicas before answering 429
    settings: dict = field(default_factory=dict)  # ServeSettings' fields for each replica's app (api_key, timeouts)
    lora_dir: str | None = None

    @property
    def engine_batch(self) -> int:
        from sdfast.runtime.manifest import read_manifest

        return int(read_manifest(self.engines[0][1]).geometry["batch"])


def named_model(method: str, path: str, body: bytes) -> str | None:
    """The model a request names in its body, or None (then the current model serves it). A body that is not JSON
    names none: the replica answers it with the same 400 as a single server."""
    if method != "POST" or path not in (*A1111_GENERATION, OPTIONS_PATH, "/v1/images/generations"):
        return None
    try:
        data = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    if path == "/v1/images/generations":
        model = data.get("model")
        return model if isinstance(model, str) and model else None
    settings = data if path == OPTIONS_PATH else data.get("override_settings")
    name = settings.get(CHECKPOINT) if isinstance(settings, dict) else None
    return name if isinstance(name, str) and name else None


def engine_deployment(config: RayServeConfig):
    """The engine replicas' deployment class, its multiplexing bound to ``config.max_loaded`` models per replica."""
    models_per_replica = config.max_loaded or len(config.engines)
    batch = config.engine_batch
    # a replica's start is seconds (its engines load from the page cache): scale up after 5 s of load, down after 60 s idle
    scaling = ({"autoscaling_config": {"min_replicas": config.autoscale[0], "max_replicas": config.autoscale[1],
                                       "target_ongoing_requests": batch, "upscale_delay_s": 5, "downscale_delay_s": 60}}
               if config.autoscale else {"num_replicas": config.replicas})

    @serve.deployment(name="sdfast-engines", ray_actor_options={"num_cpus": config.cpus_per_replica},
                      max_ongoing_requests=2 * batch,  # one engine batch running, the next gathering (micro-batching)
                      max_queued_requests=config.max_queue, graceful_shutdown_timeout_s=30,
                      max_constructor_retry_count=2,  # a replica that cannot load its engine dir is reported, not retried on
                      **scaling)
    class EngineReplica:
        def __init__(self, payload: dict):
            from sdfast.runtime.backends import get_backend
            from sdfast.serve.app import create_app, wrap
            from sdfast.serve.context import ServeSettings
            from sdfast.serve.models import ModelPool, model_entries

            cfg = RayServeConfig(**payload)
            get_backend(cfg.backend).threads = max(1, int(cfg.cpus_per_replica))  # one intra-op thread per CPU Ray gave it
            pool = ModelPool(model_entries([(n, Path(d)) for n, d in cfg.engines], cfg.backend), _loader(cfg), cfg.backend, cfg.max_loaded)
            pool.load_now(pool.current)  # a replica that cannot load its default model fails its start: Ray reports it
            settings = ServeSettings(**cfg.settings)
            self.pool, self.app = pool, create_app(pool, settings)
            self.asgi, self.api_key = wrap(self.app, settings), settings.api_key
            self.replica = serve.get_replica_context().replica_id.unique_id
            self._lifespan = None
            self._reporting = None

        async def _start(self) -> None:
            """The app's worker on this replica's event loop, and the reports to the board (progress, metrics)."""
            if self._lifespan is None:
                self._lifespan = self.app.router.lifespan_context(self.app)
                await self._lifespan.__aenter__()
            if self._reporting is None:
                self._reporting = asyncio.ensure_future(self._report())

        async def check_health(self) -> None:  # Ray Serve calls it every few seconds: an idle replica starts reporting too
            await self._start()

        async def _report(self) -> None:
            """Every REPORT_EVERY_S: this replica's progress and metrics to the board; an interrupt counted there since
            the last report interrupts the job running here (A1111's interrupt is global)."""
            import ray

            from sdfast.serve.ray_board import BOARD_NAME, REPORT_EVERY_S

            board, seen = None, None
            state, name = self.app.state, BOARD_NAME.format(app=serve.get_replica_context().app_name)
            while True:
                try:
                    board = board or ray.get_actor(name)
                    started = state.progress.started_at()
                    count, at = await board.report.remote(self.replica, state.progress.answer(), started,
                                                           state.metrics.exposition().decode())
                    if seen is not None and count > seen and started is not None and started <= at:
                        state.worker.interrupt()  # a job that started after the interrupt is left alone, as in A1111
                    seen = count  # (a smaller count: a new board, counting from 0)
                except Exception:  # noqa: BLE001 - no board yet, or a new one after the ingress restarted: look again
                    board, seen = None, None
                await asyncio.sleep(REPORT_EVERY_S)

        async def __del__(self):  # Ray Serve calls it as the replica stops: the app's shutdown (queued jobs get 503s)
            if self._reporting is not None:
                self._reporting.cancel()
            if self._lifespan is not None:
                await self._lifespan.__aexit__(None, None, None)

        @serve.multiplexed(max_num_models_per_replica=models_per_replica)
        async def model(self, name: str):
            await self.pool.pipeline(name)
            return name  # Ray Serve's record that this replica holds it; the pool holds the engines and unloads them

        async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes, model: str, options: dict | None):
            from sdfast.serve.context import REQUEST_MODEL, REQUEST_OPTIONS

            await self._start()
            from sdfast.errors import SdfastError
            from sdfast.serve.edge import authorized

            if model and authorized(self.api_key, path, headers):  # an unauthorized request loads nothing: the app answers 401
                try:
                    await self.model(model)
                except SdfastError as error:  # a model that cannot load (its engine dir missing or corrupt on this node)
                    message = json.dumps({"error": f"engine error: {error}", "field": None}).encode()
                    return 500, [(b"content-type", b"application/json")], message
            REQUEST_MODEL.set(model or None)
            REQUEST_OPTIONS.set(dict(options) if options is not None else None)
            status, out_headers, content = await call_asgi(self.asgi, method, path, query, headers, body)
            return status, out_headers + [(REPLICA_HEADER.encode(), self.replica.encode())], content

    return EngineReplica


@serve.deployment(name="sdfast-ingress", ray_actor_options={"num_cpus": 0}, num_replicas=1, max_ongoing_requests=1000)
class Ingress:
    """Every HTTP request: the model it names (or the current one) picks the replicas, through multiplexing."""

    def __init__(self, engines, payload: dict):
        from sdfast.serve.models import model_entries

        cfg = RayServeConfig(**payload)
        self.engines, self.api_key = engines, cfg.settings.get("api_key")
        self.board = self._board()
        self.entries = model_entries([(n, Path(d)) for n, d in cfg.engines], cfg.backend)
        self.current = self.entries[0].name  # A1111's sd_model_checkpoint for requests that name none
        self.options: dict | None = None  # A1111's options once a client posts them (until then, each replica's defaults)
        self.recent_s: list[float] = []  # the last generations' times: Retry-After's estimate

    def _find(self, requested: str):
        from sdfast.serve.models import find_entry

        return find_entry(self.entries, requested)

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        path, method = request.url.path, request.method
        shared = await self._across_replicas(request, path, method)
        if shared is not None:
            return shared
        named = named_model(method, path, body)
        current = next(e for e in self.entries if e.name == self.current)
        entry = self._find(named) if named else current
        if entry is None and path == "/v1/images/generations":
            from sdfast.serve.openai_api import GENERIC_MODELS

            entry = current if named in GENERIC_MODELS else None  # OpenAI's own names: the current model, as on one server
        # an unknown name goes on with no model: the replica answers it with the field named, as a single server does
        model = entry.name if entry is not None else ""
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        call = self.engines.options(multiplexed_model_id=model).handle
        started = time.perf_counter()
        try:
            status, out_headers, content = await self._send(call, method, path, request.url.query.encode(), headers, body, model)
        except BackPressureError:
            return JSONResponse({"error": "every replica is busy and the queue is full; retry later", "field": None}, status_code=429,
                                headers={"Retry-After": str(self.retry_after())})
        if status == 200 and path in (*A1111_GENERATION, "/v1/images/generations"):
            self.recent_s = (self.recent_s + [time.perf_counter() - started])[-20:]
        if method == "POST" and path == OPTIONS_PATH and status == 200:
            self._remember_options(body, model)
        return Response(content, status_code=status, headers={k.decode("latin-1"): v.decode("latin-1") for k, v in out_headers
                                                                if k.lower() not in (b"content-length",)})

    @staticmethod
    def _board():
        """The replicas' shared reports: this application's board, made by this ingress if it is not there (a new ingress
        makes a new one if the old one went with its owner; the replicas look it up by name again)."""
        import ray

        from sdfast.serve.ray_board import BOARD_NAME, Board

        name = BOARD_NAME.format(app=serve.get_replica_context().app_name)
        return ray.remote(num_cpus=0)(Board).options(name=name, get_if_exists=True).remote()

    async def _on_board(self, method: str):
        """``method`` of the board, once more on a new board if this one died (its owner, an old ingress, stopped)."""
        from ray.exceptions import RayActorError

        try:
            return await getattr(self.board, method).remote()
        except RayActorError:
            self.board = self._board()
            return await getattr(self.board, method).remote()

    async def _across_replicas(self, request: Request, path: str, method: str) -> Response | None:
        """Progress, interrupt and metrics, answered from every replica's reports (None: a route for one replica)."""
        from sdfast.serve.edge import authorized, error_response
        from sdfast.serve.ray_board import merged_metrics, merged_progress

        routes = {("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/interrupt"), ("POST", "/sdapi/v1/skip"), ("GET", "/metrics")}
        if (method, path) not in routes:
            return None
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        if not authorized(self.api_key, path, headers):
            return error_response(401, "missing or wrong API key (Authorization: Bearer KEY)", "authorization",
                                  headers={"WWW-Authenticate": "Bearer"}, path=path)
        if method == "POST":
            await self._on_board("interrupt")  # every replica stops its running job at its next step
            return JSONResponse({})
        live = await self._on_board("live")
        if path == "/metrics":
            return Response(merged_metrics({replica: metrics for replica, (_, _, metrics) in live.items()}),
                            media_type="text/plain; version=0.0.4")
        skip = request.query_params.get("skip_current_image", "false").lower() in ("1", "true")
        answer = merged_progress(live, skip)
        return JSONResponse(answer) if answer is not None else None  # no report yet: one replica answers for itself

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the recent generation time (a slot frees as one ends), at least 1."""
        return max(1, math.ceil(statistics.median(self.recent_s))) if self.recent_s else 1

    async def _send(self, call, method, path, query, headers, body, model):
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        try:
            return await call.remote(method, path, query, headers, body, model, self.options)
        except (ActorDiedError, ActorUnavailableError, RayActorError) as error:
            if method != "POST" or path not in (*A1111_GENERATION, "/v1/images/generations"):
                raise
            # the replica died mid-request: the same seed gives the same image, so once more on another replica is safe
            try:
                return await call.remote(method, path, query, headers, body, model, self.options)
            except (ActorDiedError, ActorUnavailableError, RayActorError):
                message = f"the replica serving this request stopped ({type(error).__name__}), and so did the retry"
                return 503, [(b"content-type", b"application/json")], json.dumps({"error": message, "field": None}).encode()

    def _remember_options(self, body: bytes, model: str) -> None:
        from sdfast.serve.a1111 import SERVER_OPTIONS

        posted = json.loads(body)
        self.options = {**(self.options or {"CLIP_stop_at_last_layers": 1}),
                        **{name: posted[name] for name in SERVER_OPTIONS if name in posted}}
        if model:
            self.current = model


def _loader(cfg: RayServeConfig):
    from sdfast.runtime.lora.library import LoraLibrary
    from sdfast.runtime.pipeline import Pipeline

    library = LoraLibrary(Path(cfg.lora_dir) if cfg.lora_dir else None)

    def load(entry):
        pipeline = Pipeline.load(entry.engine_dir, backend=cfg.backend, verify=cfg.verify)
        pipeline.loras.library = library
        return pipeline

    return load


def application(config: RayServeConfig):
    """The Ray Serve application: the ingress in front of the engine replicas."""
    payload = asdict(config)
    return Ingress.bind(engine_deployment(config).bind(payload), payload)


BUILD_ARGS = {"engines", "replicas", "autoscale", "cpus_per_replica", "max_loaded", "max_queue", "backend", "verify", "api_key",
              "lora_dir", "timeout"}


def build(args: dict):
    """Ray Serve's application builder, for `serve run sdfast.serve.ray_app:build KEY=VALUE ...` and config files.

    args: engines (a comma-separated list of DIR or NAME=DIR), replicas, autoscale ("MIN:MAX"), cpus_per_replica,
    max_loaded, max_queue, backend (cpu), verify, api_key (else $SDFAST_API_KEY), lora_dir, timeout (seconds, default 300).
    """
    from sdfast.errors import ConfigError

    unknown = sorted(set(args) - BUILD_ARGS)
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(unknown)}; sdfast.serve.ray_app:build takes {', '.join(sorted(BUILD_ARGS))}")
    if str(args.get("backend", "cpu")) != "cpu":
        raise ConfigError("backend: Ray Serve replicas run the cpu backend for now (they are given CPUs, not GPUs)")
    engines = [entry.strip() for entry in str(args.get("engines", "")).split(",") if entry.strip()]
    if not engines:
        raise ConfigError("engines: give the engine dirs, comma-separated (DIR or NAME=DIR)")
    named = [tuple(text.split("=", 1)) if "=" in text else (None, text) for text in engines]
    autoscale = args.get("autoscale")
    settings = {"api_key": args.get("api_key") or os.environ.get("SDFAST_API_KEY"), "request_timeout_s": float(args.get("timeout", 300))}
    return application(RayServeConfig(
        engines=[(name, str(Path(path))) for name, path in named], backend=str(args.get("backend", "cpu")),
        verify=str(args.get("verify", "full")), replicas=int(args.get("replicas", 1)),
        autoscale=tuple(int(v) for v in str(autoscale).split(":")) if autoscale else None,
        cpus_per_replica=float(args.get("cpus_per_replica", 1)), max_loaded=int(args["max_loaded"]) if args.get("max_loaded") else None,
        max_queue=int(args.get("max_queue", 16)), settings=settings, lora_dir=args.get("lora_dir")))
