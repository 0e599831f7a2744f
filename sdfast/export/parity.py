"""At export, the ONNX engine and PyTorch run the same inputs; the errors go into the manifest."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sdfast.export.recipe import ComponentRecipe


@dataclass(frozen=True)
class ParityResult:
    max_abs: float
    max_rel: float  # max |onnx - torch| / max |torch|
    tolerance: float
    finite: bool

    @property
    def passed(self) -> bool:
        return self.finite and self.max_rel <= self.tolerance

    def to_json(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "tolerance_rel": self.tolerance, "passed": self.passed}


def torch_outputs(module: torch.nn.Module, recipe: ComponentRecipe, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        result = module(*(torch.from_numpy(inputs[t.name]) for t in recipe.inputs))
    result = result if isinstance(result, tuple) else (result,)
    return [r.detach().float().numpy() for r in result]


def compare(onnx_outputs: list[np.ndarray], reference: list[np.ndarray], tolerance: float) -> ParityResult:
    max_abs, max_rel, finite = 0.0, 0.0, True
    for ours, theirs in zip(onnx_outputs, reference):
        finite = finite and bool(np.isfinite(ours).all())
        diff = float(np.abs(ours.astype(np.float64) - theirs).max())
        scale = max(float(np.abs(theirs).max()), 1e-12)
        max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / scale)
    return ParityResult(max_abs=max_abs, max_rel=max_rel, tolerance=tolerance, finite=finite)
