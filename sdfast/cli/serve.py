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
    _check_port_free(args.host, args.port)
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
