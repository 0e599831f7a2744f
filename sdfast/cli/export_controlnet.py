"""sdfast export-controlnet: a diffusers ControlNet folder (or a built-in one) -> one more component of an engine dir."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sdfast.export.builtin_controlnet import BUILTIN_CONTROLNETS  # plain data: no torch

    parser.add_argument("controlnet", help=f"a diffusers ControlNetModel folder, or a built-in random-weight one: {', '.join(BUILTIN_CONTROLNETS)}")
    parser.add_argument("--engine", required=True, type=Path, help="the engine dir to add it to (its size, batch and precision)")
    parser.add_argument("--name", help="its name in the engine dir, as generate --control and the API's 'model' take it (default: "
                                       "the folder's name)")
    parser.add_argument("--force", action="store_true", help="replace a ControlNet of the same name")


def run(args: argparse.Namespace) -> int:
    from sdfast.cli.progress import ElapsedLog
    from sdfast.export.controlnet_export import ControlNetExportRequest, check_request, export_controlnet

    request = ControlNetExportRequest(source=args.controlnet, engine=args.engine, name=args.name, force=args.force)
    check_request(request)  # refuse a bad engine dir, name or folder before importing torch
    print(export_controlnet(request, ElapsedLog("export-controlnet")))
    return 0
