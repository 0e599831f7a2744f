"""The layouts a model parameter takes in an exported graph, as numpy functions of the [out, in, ...] weight.

The export records, for each parameter a LoRA can patch, which initializer it became and through which of these
layouts (found by comparing bytes, so a layout named here is exactly the one in the file). All are linear in the
weight, so a LoRA's delta goes through the same function and is added to the stored initializer.
"""
from __future__ import annotations

import numpy as np

# Winograd F(2x2, 3x3)'s weight transform (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016)
WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)


def winograd_f2x2_3x3(weight: np.ndarray) -> np.ndarray:
    """U = G g Gᵀ for every (out, in) filter: [K, C, 3, 3] -> [16, K, C], the 16 tile positions first."""
    u = np.einsum("ai,kcij,bj->abkc", WINOGRAD_G, weight.astype(np.float64), WINOGRAD_G)  # [4, 4, K, C]
    return u.reshape(16, *weight.shape[:2]).astype(np.float32)


def transpose(weight: np.ndarray) -> np.ndarray:
    """A Linear's [out, in] weight as a MatMul's [in, out] right operand."""
    return np.ascontiguousarray(weight.T)


def nchwc_blocked(weight: np.ndarray, block: int, view: bool = False) -> np.ndarray:
    """onnxruntime's NCHWc convolution filter (MLAS OIBiBo): [O/B, I/B, kh, kw, Bi, Bo], kept in the [O, I, kh, kw] shape.
    ``view``: the permuted [O/B, I/B, kh, kw, Bi, Bo] view, to add into a stored filter reshaped alike."""
    o, i, kh, kw = weight.shape
    blocked = weight.reshape(o // block, block, i // block, block, kh, kw).transpose(0, 2, 4, 5, 3, 1)
    return blocked if view else np.ascontiguousarray(blocked).reshape(o, i, kh, kw)


def nchwc_output_blocked(weight: np.ndarray, block: int, view: bool = False) -> np.ndarray:
    """onnxruntime's NCHWc filter for unblocked input channels (MLAS OIBo: the first convolution): [O/B, I, kh, kw, Bo]."""
    o, i, kh, kw = weight.shape
    blocked = weight.reshape(o // block, block, i, kh, kw).transpose(0, 2, 3, 4, 1)
    return blocked if view else np.ascontiguousarray(blocked).reshape(o, i, kh, kw)


def _identity(weight: np.ndarray) -> np.ndarray:
    return weight


def layouts_for(shape: tuple[int, ...]) -> dict[str, object]:
    """The layouts a weight of ``shape`` may take: name -> function of the weight."""
    found: dict[str, object] = {"identity": _identity}
    if len(shape) == 2:
        found["transpose"] = transpose
    if len(shape) == 4:
        if shape[2:] == (3, 3):
            found["winograd_f2x2_3x3"] = winograd_f2x2_3x3
        for block in (16, 8):  # AVX-512 and AVX2 block sizes
            if shape[0] % block == 0 and shape[1] % block == 0:
                found[f"nchwc_oibibo_{block}"] = lambda w, b=block: nchwc_blocked(w, b)
            if shape[0] % block == 0:
                found[f"nchwc_oibo_{block}"] = lambda w, b=block: nchwc_output_blocked(w, b)
    return found


def apply_layout(name: str, weight: np.ndarray, view: bool = False):
    """``weight`` in the named layout; a ValueError for a layout this runtime does not know (a newer export).

    ``view`` (NCHWc layouts): the permuted strided view in its blocked shape, uncopied (to add into the stored filter
    reshaped to that shape)."""
    layout = layouts_for(weight.shape).get(name)
    if layout is None:
        raise ValueError(f"weight layout '{name}' does not apply to a {list(weight.shape)} weight, or is unknown to this sdfast")
    if view and name.startswith("nchwc_"):
        block = int(name.rsplit("_", 1)[1])
        return (nchwc_blocked if "oibibo" in name else nchwc_output_blocked)(weight, block, view=True)
    return layout(weight)


def known_layout(name: object) -> bool:
    """Whether this runtime can lay a delta out as ``name`` (a parameter map written by a newer sdfast may not)."""
    return name in ("identity", "transpose", "winograd_f2x2_3x3") or (
        isinstance(name, str) and name.rsplit("_", 1)[0] in ("nchwc_oibibo", "nchwc_oibo") and name.rsplit("_", 1)[1] in ("8", "16"))
