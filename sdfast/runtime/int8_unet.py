"""The selective int8 U-Net (``sdfast quantize``): a fast mode that runs the engine dir's ``unet_int8`` graph in place
of the fp32 U-Net, on the CPU provider (its QLinearConv and QGemm products are onnxruntime's, u8s8 on VNNI or AMX).
With step caching it runs ``unet_shallow_int8`` on the cached steps, quantized from the engine's shallow U-Net."""
from __future__ import annotations

from sdfast.errors import RequestError

INT8 = "unet_int8"  # the int8 U-Net's component (role denoiser_int8)
ROLE = "denoiser_int8"
SHALLOW_INT8 = "unet_shallow_int8"  # the shallow U-Net of step caching, int8 (role denoiser_shallow_int8)
SHALLOW_ROLE = "denoiser_shallow_int8"
ROLES = (ROLE, SHALLOW_ROLE)  # the CPU provider's graphs: other backends do not load them


def check_request(request, manifest, backend: str) -> None:
    """RequestError for an int8 request this engine dir or backend cannot run."""
    if not request.int8:
        return
    if INT8 not in manifest.components:
        raise RequestError("this engine dir has no int8 U-Net: add it with sdfast quantize ENGINE_DIR")
    if request.step_cache not in (None, 1) and SHALLOW_INT8 not in manifest.components:
        raise RequestError("this engine dir has no int8 shallow U-Net for step caching: run sdfast quantize again on it "
                           "(its fp32 step-cache graphs come from export --step-cache)")
    for asked, why in ((backend != "cpu", f"the {backend} backend (the int8 graph is onnxruntime's CPU graph)"),
                       (request.guidance_stop is not None, "guidance truncation"),
                       (bool(request.control), "ControlNets"), (request.refiner_switch is not None, "a refiner hand-off"),
                       (request.hires is not None, "hires fix")):
        if asked:
            raise RequestError(f"the int8 U-Net does not run with {why} yet")


def infotext(manifest, request) -> str | None:
    """The infotext's value: 'int8 <policy>' (the mode changes the image), or None."""
    if not request.int8:
        return None
    return f"int8 {manifest.data['components'][INT8].get('int8', {}).get('policy', '')}".strip()
