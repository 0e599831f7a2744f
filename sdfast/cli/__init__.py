"""The ``sdfast`` command: one module per subcommand, imported lazily so ``sdfast --help`` stays instant."""
from __future__ import annotations

import argparse
import importlib
import sys

from sdfast import __version__

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "export": ("sdfast.cli.export", "export a diffusers Stable Diffusion folder (or a built-in model) to an engine dir"),
    "export-controlnet": ("sdfast.cli.export_controlnet", "add a ControlNet (diffusers folder or built-in) to an engine dir"),
    "quantize": ("sdfast.cli.quantize", "add a selective int8 U-Net to an fp32 engine dir, calibrated on its own sampler runs"),
    "generate": ("sdfast.cli.generate", "generate images from a prompt with an engine dir"),
    "info": ("sdfast.cli.info", "show what an engine dir's manifest says"),
    "bench": ("sdfast.cli.bench", "per-stage latency on every backend (CPU, CUDA, TensorRT, diffusers), with the CPU's peak"),
    "samplers": ("sdfast.cli.samplers", "list the samplers, by A1111 and diffusers name, with what each maps to"),
    "serve": ("sdfast.cli.serve", "serve engine dirs over HTTP: the AUTOMATIC1111 and OpenAI images APIs"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdfast", description="A lean, fast Stable Diffusion runtime: export once to static ONNX, run without torch.")
    parser.add_argument("--version", action="version", version=f"sdfast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen subcommand's module is imported
            importlib.import_module(module_name).add_arguments(sub)
            sub.set_defaults(module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sdfast.errors import SdfastError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "module", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return importlib.import_module(args.module).run(args) or 0
    except SdfastError as error:
        print(f"sdfast {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdfast {args.command}: interrupted", file=sys.stderr)
        return 130
