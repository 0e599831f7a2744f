"""Shared fixtures: one tiny random-weight model and its engine dir per test session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")


@pytest.fixture(scope="session")
def sdfast_cache(tmp_path_factory) -> Path:
    """Built-in models go to a cache of the test session's own, unless SDFAST_CACHE is set."""
    cache = Path(os.environ.get("SDFAST_CACHE") or tmp_path_factory.mktemp("sdfast-cache"))
    os.environ["SDFAST_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model(sdfast_cache) -> Path:
    from sdfast.export.builtin import ensure_builtin

    return ensure_builtin("tiny")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model, tmp_path_factory) -> Path:
    from sdfast.export.build import ExportRequest, export_engine

    out = tmp_path_factory.mktemp("engines") / "tiny-64"
    return export_engine(ExportRequest(model="tiny", out=out))


@pytest.fixture(scope="session")
def tiny_sized_engine(tiny_model, tmp_path_factory) -> Path:
    """The tiny model at four sizes in one engine dir (64x64 the default): several sizes, and hires fix across them."""
    from sdfast.export.build import ExportRequest, export_engine

    out = tmp_path_factory.mktemp("engines") / "tiny-4-sizes"
    return export_engine(ExportRequest(model="tiny", out=out, height=64, width=64, sizes=((96, 64), (64, 96), (128, 128))))


@pytest.fixture(scope="session")
def tiny_fast_engine(tiny_model, tmp_path_factory) -> Path:
    """tiny with the fast modes' graphs: the step cache's (export --step-cache), a tiny VAE decoder (tiny-taesd) and the
    tiled VAE's 64-pixel tile graphs, at 64x64 and 96x64."""
    from sdfast.export.build import ExportRequest, export_engine

    out = tmp_path_factory.mktemp("fast") / "engine"
    return export_engine(ExportRequest(model="tiny", out=out, height=64, width=64, sizes=((96, 64),), step_cache=True,
                                       tiny_vae="tiny-taesd", vae_tile=64))


@pytest.fixture(scope="session")
def tiny_inpaint_engine(sdfast_cache, tmp_path_factory) -> Path:
    """The tiny model with a 9-channel inpainting U-Net, exported."""
    from sdfast.export.build import ExportRequest, export_engine

    out = tmp_path_factory.mktemp("engines") / "tiny-inpaint-64"
    return export_engine(ExportRequest(model="tiny-inpaint", out=out))


@pytest.fixture(scope="session")
def tiny_engine_batch2_unguided(tiny_model, tmp_path_factory) -> Path:
    from sdfast.export.build import ExportRequest, export_engine

    out = tmp_path_factory.mktemp("engines") / "tiny-64-b2-noguide"
    return export_engine(ExportRequest(model=str(tiny_model), out=out, batch=2, guidance=False))


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the sdfast CLI in a fresh interpreter, as a user would; output as written (a progress bar's '\r' is kept)."""
    completed = subprocess.run(
        [sys.executable, "-m", "sdfast", *map(str, args)],
        capture_output=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    completed.stdout, completed.stderr = (stream.decode("utf-8", "replace") for stream in (completed.stdout, completed.stderr))
    return completed


@pytest.fixture(scope="session")
def tiny_fp16_engine(tiny_model, tmp_path_factory) -> Path:
    from sdfast.export.build import ExportRequest, export_engine

    out = tmp_path_factory.mktemp("engines") / "tiny-64-fp16"
    return export_engine(ExportRequest(model="tiny", out=out, precision="fp16"))


def visible_lines(stderr: str) -> list[str]:
    """stderr as a terminal shows it: a progress bar redraws its line after '\r', and leave=False clears it."""
    return [shown for line in stderr.split("\n") if (shown := line.rsplit("\r", 1)[-1].strip())]


def diffusers_reference(folder: Path):
    """diffusers' StableDiffusionPipeline over a model folder, quiet and without a safety checker: the parity reference."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """init.png, a smooth 64x64 picture with a disc, and mask.png, repainting a block of its right half: the img2img and
    inpainting inputs of the SDXL and SD3 parity tests."""
    import numpy as np
    from PIL import Image

    size = 64
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    pixels = np.stack([x, y, 1 - (x - 0.5) ** 2 - (y - 0.5) ** 2], axis=-1)
    pixels[(x - 0.4) ** 2 + (y - 0.6) ** 2 < 0.05] = [0.9, 0.1, 0.2]
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[16:48, 24:56] = 255
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / "init.png")
    Image.fromarray(mask, mode="L").save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"
