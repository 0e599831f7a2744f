"""sdfast info: an engine dir's manifest as a readable table."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine_dir", type=Path, help="an engine dir written by 'sdfast export'")
    parser.add_argument("--json", action="store_true",
                        help="print the manifest as JSON (with the TensorRT engines built here, if any, as 'tensorrt_engines')")
    parser.add_argument("--verify", action="store_true", help="also check every file's sha256")


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    from sdfast.runtime.manifest import read_manifest
    from sdfast.runtime.trt_cache import read_entries

    manifest = read_manifest(args.engine_dir)
    if args.verify:
        manifest.verify_files(full=True, remembered=False)  # an explicit check hashes every file again
    engines = read_entries(manifest.root)  # tensorrt/cache.json: built on this machine's GPUs, not part of the export
    if args.json:
        print(json.dumps({**manifest.data, "tensorrt_engines": engines} if engines else manifest.data, indent=2))
        return 0
    data, geometry, source = manifest.data, manifest.geometry, manifest.data["source"]
    rows = [
        ("engine dir", str(manifest.root)),
        ("format", f"{data['format']} v{data['format_version']}, created {data.get('created', '?')}"),
        ("model", f"{source['name']} ({source.get('path', '?')})" + ("  [RANDOM WEIGHTS]" if source.get("random_weights") else "")),
        ("fingerprint", f"{source['fingerprint']}  (model hash {manifest.model_hash})"),
        ("family", data.get("family", "?")),
        ("sizes" if len(manifest.sizes) > 1 else "size", f"{manifest.sizes_text}{' (the first is the default)' if len(manifest.sizes) > 1 else ''}, batch {geometry['batch']}, "
                 f"guidance {'on (denoiser batch ' + str(geometry['unet_batch']) + ')' if geometry['guidance'] else 'off'}"),
        ("precision", data.get("precision", "?")),
        ("prediction", f"{manifest.prediction_type}; latents {manifest.latent['channels']} channels, 1/{manifest.latent['factor']} size, "
                       f"VAE scaling factor {manifest.latent['scaling_factor']}, shift {manifest.latent['shift_factor']}"),
        ("scheduler", f"{data['scheduler'].get('class')} config ({data['scheduler']['file']})"),
        ("libraries", ", ".join(f"{k} {v}" for k, v in data.get("libraries", {}).items())),
    ]
    controlnets = [entry["controlnet"] for entry in data["components"].values() if entry.get("role") == "controlnet"]
    if controlnets:
        rows.append(("controlnets", ", ".join(f"{c['name']} (from {c['source']['name']})" for c in controlnets)))
    maps = {name: entry["parameter_map"]["graphs"] for name, entry in data["components"].items() if entry.get("parameter_map")}
    if maps:  # where LoRAs can land: the weights each graph's parameter map places
        rows.append(("loras", "at run time (generate --lora, <lora:name:w>): " + "; ".join(
            f"{name} " + ", ".join(f"{graph} {g['mapped']}/{g['of']}" for graph, g in graphs.items()) for name, graphs in maps.items())))
    else:
        rows.append(("loras", "fused at export only (no parameter map: exported before run-time LoRAs)"))
    shared = {name: entry["shared_weights"] for name, entry in data["components"].items() if entry.get("shared_weights")}
    if shared:  # several sizes: each component's graphs over one data file
        rows.append(("weights", "; ".join(f"{name}: {s['stored']} tensors in {s['file']} "
                                          f"({_mib(s['files'][s['file']]['bytes'])}) for every size" for name, s in shared.items())))
    fused = data.get("source", {}).get("fused_loras")
    if fused:
        rows.append(("fused loras", ", ".join(f"{f['name']} x{f['scale']:g}" for f in fused)))
    if args.verify:
        rows.append(("files", "all sha256 match the manifest"))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print()
    header = ("component", "file", "size", "precision", "inputs -> outputs", "parity max_rel (tol)")
    table = [header]
    for name, component in manifest.components.items():
        entry = data["components"][name]
        io = _tensors(component.inputs) + " -> " + _tensors(component.outputs)
        parity = entry.get("parity", {})
        verdict = f"{parity.get('max_rel', float('nan')):.1e} ({parity.get('tolerance_rel', float('nan')):.0e})" if parity else "-"
        table.append((name, component.file, _mib(sum(f["bytes"] for f in component.files.values())), entry.get("precision", "?"), io, verdict))
        for key in component.sizes:  # the other sizes' graphs, over the same weights
            sized = manifest.at_size(*(int(v) for v in key.split("x"))).components[name]
            parity = entry["sizes"][key].get("parity") or {}
            verdict = f"{parity.get('max_rel', float('nan')):.1e} ({parity.get('tolerance_rel', float('nan')):.0e})" if parity else "-"
            table.append((f"  at {key}", sized.file, "(shared)", entry.get("precision", "?"),
                          _tensors(sized.inputs) + " -> " + _tensors(sized.outputs), verdict))
    _print_table(table)
    if engines:
        print()
        _print_table([("tensorrt engine", "file", "size", "gpu (sm)", "tensorrt", "built")] + [
            (e["key"]["component"], e["file"], _mib(e["bytes"]), f"{e['key']['gpu_name']} ({e['key']['compute_capability']})",
             e["key"]["tensorrt_version"], f"{e.get('built', '?')} in {e.get('build_seconds', '?')} s") for e in engines])
    return 0


def _tensors(tensors) -> str:
    """'name[shape], ...', the ControlNet residuals counted rather than listed."""
    from sdfast.runtime.control import is_residual

    shown = [f"{t.name}[{'x'.join(map(str, t.shape))}]" for t in tensors if not is_residual(t.name)]
    residuals = sum(1 for t in tensors if is_residual(t.name))
    return ", ".join(shown + ([f"{residuals} ControlNet residuals"] if residuals else []))


def _print_table(table: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
