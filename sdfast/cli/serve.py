"""sdfast serve: the AUTOMATIC1111 and OpenAI images APIs over one or several engine dirs, on uvicorn."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from sdfast.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine_dir", type=Path, nargs="*", help="engine dirs written by 'sdfast export', each a model named as "
                                                                  "it was exported; the first is the default model")
    parser.add_argument("--engine", action="append", default=[], metavar="NAME=DIR",
                        help="an engine dir served under NAME (repeatable; after the unnamed DIRs). Requests pick a model by "
                             "A1111's sd_model_checkpoint (per request in override_settings, or POST /sdapi/v1/options) or "
                             "OpenAI's model")
    parser.add_argument("--max-loaded", type=int, metavar="N",
                        help="models held loaded at once: others load on first use and the least recently used is unloaded "
                             "(default: no limit)")
    parser.add_argument("--max-memory", type=float, metavar="GB",
                        help="GiB of weights held loaded at once (each model's are the files its backend reads), with the "
                             "same unloading (default: no limit)")
    parser.add_argument("--ray", action="store_true",
                        help="serve on Ray Serve: engine replicas behind an ingress that routes each request to a replica "
                             "holding its model (a local Ray, or the cluster at $RAY_ADDRESS); pip install 'sdfast[ray]'")
    parser.add_argument("--replicas", type=int, default=1, metavar="N", help="with --ray: engine replicas (default 1)")
    parser.add_argument("--autoscale", metavar="MIN:MAX", help="with --ray: replicas scaled on ongoing requests between MIN and MAX")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="N",
                        help="with --ray: Ray CPUs per replica, and onnxruntime's intra-op threads there (default 1)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs --api-key)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860, as A1111)")
    parser.add_argument("--backend", default="cpu", help="cpu, cuda or tensorrt (default cpu)")
    parser.add_argument("--max-queue", type=int, default=16, help="jobs that may wait; more get 429 with Retry-After (default 16)")
    parser.add_argument("--api-key", default=os.environ.get("SDFAST_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $SDFAST_API_KEY); needed to bind beyond loopback")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a request may wait and run before 504 (default 300)")
    parser.add_argument("--verify", choices=("full", "size"), default="full", help="check the engine files' sha256 (full) or sizes")
    parser.add_argument("--refiner", type=Path, help="an SDXL refiner engine dir, used by requests that name it (A1111's refiner_checkpoint)")
    parser.add_argument("--preload-controlnets", action="store_true",
                        help="load every ControlNet of the engine dir at start (a bad one fails the start); by default each "
                             "loads on the first request that uses it")
    parser.add_argument("--lora-dir", type=Path, help="the folder of LoRA .safetensors files that requests name in their prompts "
                                                      "(<lora:name:weight>) and /sdapi/v1/loras lists")
    parser.add_argument("--quiet", action="store_true", help="no access log on stderr")


def run(args: argparse.Namespace) -> int:
    from sdfast.serve.app import is_loopback

    if not is_loopback(args.host) and not args.api_key:
        raise ConfigError(f"refusing to bind {args.host} without --api-key: beyond loopback anyone could use this server")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a port number")
    if args.max_queue < 1 or args.timeout <= 0:
        raise ConfigError("--max-queue must be at least 1 and --timeout above 0")
    if args.api_key is not None and len(args.api_key) < 8:
        raise ConfigError("--api-key must be at least 8 characters")
    engines = [(None, path) for path in args.engine_dir] + [_named_engine(text) for text in args.engine]
    if not engines:
        raise ConfigError("no engine dir given: sdfast serve DIR [DIR ...] or --engine NAME=DIR")
    if args.max_memory is not None and not args.max_memory > 0:
        raise ConfigError(f"--max-memory must be above 0 GiB, not {args.max_memory:g}")
    if args.refiner is not None and len(engines) > 1:
        raise ConfigError("--refiner attaches to one model: serve a refiner with a single engine dir")
    if args.ray:
        return _serve_on_ray(args, engines)
    if args.replicas != 1 or args.autoscale or args.cpus_per_replica != 1.0:
        raise ConfigError("--replicas, --autoscale and --cpus-per-replica are for --ray")

    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"sdfast serve needs {', '.join(missing)}: pip install 'sdfast[serve]'")
    import uvicorn

    from sdfast.cli.progress import LoadBars
    from sdfast.runtime.pipeline import Pipeline
    from sdfast.serve.app import ServeSettings, create_app, wrap

    from sdfast.runtime.lora.library import LoraLibrary
    from sdfast.serve.models import GIB, ModelPool, model_entries

    library = LoraLibrary(args.lora_dir)  # a wrong --lora-dir fails before the engine loads
    entries = model_entries(engines, args.backend)  # every manifest read: a wrong path fails before anything loads
    load_bars = None if args.quiet else LoadBars()

    def load(entry) -> Pipeline:
        if load_bars is None:
            lifecycle.warning(f"sdfast serve: loading model '{entry.name}' ({entry.weights_bytes / GIB:.2f} GiB)")
        pipeline = Pipeline.load(entry.engine_dir, backend=args.backend, verify=args.verify, progress=load_bars)
        if args.refiner is not None:
            pipeline.attach_refiner(Pipeline.load(args.refiner, backend=args.backend, verify=args.verify, progress=load_bars))
        if args.preload_controlnets:
            pipeline.controlnets.load(pipeline.controlnets.names)
        pipeline.loras.library = library
        return pipeline

    lifecycle = logging.getLogger("sdfast.serve")
    if not lifecycle.handlers:
        lifecycle.addHandler(logging.StreamHandler(sys.stderr))
    lifecycle.propagate = False
    models = ModelPool(entries, load, args.backend, args.max_loaded, args.max_memory * GIB if args.max_memory else None)
    _check_port_free(args.host, args.port)  # after the budget's checks, before the default model loads
    try:  # a bad default engine dir fails before binding
        models.load_now(models.current)
    finally:
        if load_bars is not None:
            load_bars.close()
            load_bars = None  # later loads, on a request's demand, log a line each instead
    pipeline = models.entries[models.current].pipeline
    settings = ServeSettings(max_queue=args.max_queue, api_key=args.api_key, request_timeout_s=args.timeout)
    access = logging.getLogger("sdfast.access")
    access.setLevel(logging.WARNING if args.quiet else logging.INFO)
    if not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
    access.propagate = False
    others = [name for name in models.entries if name != models.current]
    print(f"sdfast serve: {models.current} {pipeline.width}x{pipeline.height} on {args.backend} "
          f"(loaded in {pipeline.load_timings['total_s']:.1f} s)" + (f", and on demand {', '.join(others)}" if others else "") +
          f", http://{args.host}:{args.port} (A1111 /sdapi/v1, OpenAI /v1/images)", file=sys.stderr, flush=True)
    config = uvicorn.Config(wrap(create_app(models, settings), settings), host=args.host, port=args.port, access_log=False,
                            log_level="warning", timeout_graceful_shutdown=int(settings.shutdown_grace_s), lifespan="on")
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 2


def _check_port_free(host: str, port: int) -> None:
    """Refuse a taken or unbindable address in one line, before the engine loads."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ConfigError(f"cannot resolve --host {host}: {error.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def _named_engine(text: str) -> tuple[str, Path]:
    """--engine NAME=DIR as (NAME, DIR), or a ConfigError saying what is wrong with it."""
    name, equals, directory = text.partition("=")
    name = name.strip()
    if not equals or not name or not directory:
        raise ConfigError(f"--engine '{text}': expected NAME=DIR")
    if "[" in name or "]" in name:
        raise ConfigError(f"--engine '{text}': a model name cannot hold brackets (A1111 titles are 'name [hash]')")
    return name, Path(directory)


def _serve_on_ray(args: argparse.Namespace, engines: list[tuple[str | None, Path]]) -> int:
    """The same routes on Ray Serve (serve/ray_app.py), until SIGTERM or Ctrl-C; then the application and a Ray this
    command started are shut down."""
    import importlib.util
    import signal
    import threading

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise ConfigError("sdfast serve --ray needs Ray Serve: pip install 'sdfast[ray]'")
    for flag, value in (("--refiner", args.refiner), ("--preload-controlnets", args.preload_controlnets), ("--max-memory", args.max_memory)):
        if value:
            raise ConfigError(f"{flag} is not supported with --ray yet (replicas count models: --max-loaded)")
    if args.backend != "cpu":
        raise ConfigError(f"--backend {args.backend} is not supported with --ray yet: replicas are given CPUs, not GPUs")
    autoscale = None
    if args.autoscale:
        low, _, high = args.autoscale.partition(":")
        if not (low.isdigit() and high.isdigit() and 0 < int(low) <= int(high)):
            raise ConfigError(f"--autoscale '{args.autoscale}': expected MIN:MAX with 0 < MIN <= MAX")
        autoscale = (int(low), int(high))
    if args.replicas < 1 or args.cpus_per_replica <= 0 or (args.max_loaded is not None and args.max_loaded < 1):
        raise ConfigError("--replicas, --cpus-per-replica and --max-loaded must be above 0")
    from sdfast.serve.models import model_entries

    model_entries(engines, args.backend)  # a wrong path fails here, in one line, before Ray starts
    _check_port_free(args.host, args.port)
    import ray
    from ray import serve

    from sdfast.serve.ray_app import RayServeConfig, application

    config = RayServeConfig(engines=[(name, str(path)) for name, path in engines], backend=args.backend, verify=args.verify,
                            replicas=args.replicas, autoscale=autoscale, cpus_per_replica=args.cpus_per_replica,
                            max_loaded=args.max_loaded, max_queue=args.max_queue,
                            settings={"api_key": args.api_key, "request_timeout_s": args.timeout},
                            lora_dir=str(args.lora_dir) if args.lora_dir else None)
    stop = threading.Event()

    def on_signal(*_):
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=not args.quiet,
                 logging_level=logging.ERROR)
    except Exception as error:  # noqa: BLE001 - Ray raises plain Exception for a node that does not come up
        raise ConfigError(f"Ray did not start: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    for signum in (signal.SIGTERM, signal.SIGINT):  # again: ray.init installs handlers of its own
        signal.signal(signum, on_signal)
    try:
        try:
            serve.start(http_options={"host": args.host, "port": args.port})
            serve.run(application(config), name="sdfast", route_prefix="/")
        except Exception as error:  # noqa: BLE001 - a replica that cannot start (a missing or corrupt engine dir) ends up here
            raise ConfigError(f"the Ray Serve application did not start: {_deployment_error(serve) or _first_line(error)}") from None
        scale = f"{autoscale[0]}-{autoscale[1]} replicas (autoscaled)" if autoscale else f"{args.replicas} replica(s)"
        print(f"sdfast serve: on Ray Serve, {scale} of {', '.join(str(path) for _, path in engines)}, "
              f"http://{args.host}:{args.port} (A1111 /sdapi/v1, OpenAI /v1/images)", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        if os.environ.get("RAY_ADDRESS"):
            serve.delete("sdfast")  # on a cluster that others use: this application only
        else:
            serve.shutdown()
        print("sdfast serve: stopped", file=sys.stderr, flush=True)
        return 0
    finally:
        ray.shutdown()


def _deployment_error(serve) -> str | None:
    """The error a replica of the application raised at its start (sdfast's own one-line message), from Serve's status."""
    import re

    try:
        deployments = serve.status().applications["sdfast"].deployments.values()
    except Exception:  # noqa: BLE001 - no status: the caller falls back to Ray's own message
        return None
    for deployment in deployments:
        found = re.findall(r"sdfast\.errors\.\w+: (.+)", deployment.message or "")
        if found:
            return found[-1].strip()
    return None


def _first_line(error: Exception) -> str:
    """An exception's first meaningful line (Ray wraps a replica's error in a long report)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = next((line for line in lines if "Error:" in line and not line.startswith("File ")), None)
    return named or (lines[0] if lines else type(error).__name__)
