"""Does keeping normalizations and Softmax in fp32 improve fp16 parity? The measurement behind export/sd15.toml's policy.

    python benchmarks/fp16_block_list.py [--model tiny|sd15] [--components text_encoder,unet,vae_encoder]

Each component is exported once (fp32, ORT basic optimization, as `sdfast export` does), converted to fp16 with
sdfast's converter with and without the block list, and compared with torch fp32 on the export's parity inputs.
Prints max |onnx - torch| / max |torch| for each; runs on onnxruntime's CPU provider.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

BLOCK_LIST = ["InstanceNormalization", "LayerNormalization", "Softmax"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--components", default="text_encoder,unet,vae_encoder")
    args = parser.parse_args()

    from sdfast.export.build import ExportRequest
    from sdfast.export.builtin import ensure_builtin
    from sdfast.export.families.sd15 import WRAPPERS, dimensions, load, sample_inputs
    from sdfast.export.fp16 import convert_to_fp16
    from sdfast.export.onnx_export import export_to_onnx, optimize_offline
    from sdfast.export.parity import compare, torch_outputs
    from sdfast.export.recipe import Recipe
    from sdfast.runtime.backends import get_backend
    from sdfast.runtime.manifest import ComponentInfo

    model = load(ensure_builtin(args.model))
    recipe = Recipe.load("sd15")
    dims = dimensions(ExportRequest(model=args.model, out=Path("unused")), recipe, model)
    dynamic = {dim.name: dim.to_json() for dim in recipe.dynamic_dims(dims).values()}
    results = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name in args.components.split(","):
            component = recipe.component(name, dims, "fp32")
            module = WRAPPERS[name](model).eval()
            raw = work / f"{name}.raw.onnx"
            export_to_onnx(module, component, sample_inputs(component, model, "trace"), raw, recipe.opset)
            optimized = optimize_offline(raw, work / f"{name}.onnx")[0]
            inputs = sample_inputs(component, model, "parity")
            expected = torch_outputs(module, component, inputs)
            for label, kept in (("fp16", []), ("fp16, norms and softmax fp32", BLOCK_LIST)):
                out = work / f"{name}.{len(kept)}.fp16.onnx"
                convert_to_fp16(optimized, out, kept)
                info = ComponentInfo.from_json(name, {"file": out.name, "files": {}, "inputs": [t.to_json() for t in component.inputs],
                                                      "outputs": [t.to_json() for t in component.outputs], "precision": "fp16"}, dynamic)
                parity = compare(get_backend("cpu").load(info, out).run(inputs), expected, 1.0)
                results.setdefault(name, {})[label] = parity.max_rel
                print(f"{name:13s} {label:30s} max_rel {parity.max_rel:.2e}", file=sys.stderr, flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
