"""Shared fixtures: one tiny random-weight model and its engine dirs per test run (shared by pytest-xdist's workers)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# The files that take longest (engine exports of several families, parity runs), first: pytest-xdist's --dist loadfile
# hands files to its workers in collection order, so starting the longest ones first lets the workers end together.
LONGEST_FIRST = ("test_controlnet.py", "test_sd3_t5.py", "test_sdxl.py", "test_sizes.py", "test_lora.py", "test_sd3.py",
                 "test_step_cache.py", "test_hires.py", "test_fast_modes_sdxl.py", "test_lora_sdxl.py", "test_export.py",
                 "test_int8.py", "test_sd2.py", "test_cli.py", "test_serve.py", "test_controlnet_serve.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "ray: starts a local Ray cluster (runs in CI; a quick local run skips them with -m 'not ray')")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


def run_folder(tmp_path_factory) -> Path:
    """The test run's temporary folder: pytest-xdist's workers each have their own below it."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def exported_once(tmp_path_factory, name: str, request_fields: dict) -> Path:
    """An engine dir exported once per test run: under pytest-xdist every worker shares it (xdist's recipe for
    session fixtures: the run's common temporary folder and a file lock); the fixtures that use it never change it."""
    from sdfast.export.build import ExportRequest, export_engine
    from sdfast.export.built_once import folder_lock

    out = run_folder(tmp_path_factory) / "shared-engines" / name
    with folder_lock(out):  # one worker exports, the other waits for it
        if not (out / "manifest.json").is_file():
            export_engine(ExportRequest(out=out, **request_fields))
    return out


@pytest.fixture(scope="session")
def sdfast_cache(tmp_path_factory) -> Path:
    """Built-in models go to a cache of the test run's own (shared by its workers), unless SDFAST_CACHE is set."""
    cache = Path(os.environ.get("SDFAST_CACHE") or run_folder(tmp_path_factory) / "sdfast-cache")  # built-ins: under a lock
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["SDFAST_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model(sdfast_cache) -> Path:
    from sdfast.export.builtin import ensure_builtin

    return ensure_builtin("tiny")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model, tmp_path_factory) -> Path:
    return exported_once(tmp_path_factory, "tiny-64", dict(model="tiny"))


@pytest.fixture(scope="session")
def tiny_sd2_engine(sdfast_cache, tmp_path_factory) -> Path:
    """tiny-sd2 (v-prediction, SD 2.x's text encoder), portable graphs only."""
    return exported_once(tmp_path_factory, "tiny-sd2-64", dict(model="tiny-sd2", cpu_variant=False))


@pytest.fixture(scope="session")
def tiny_sized_engine(tiny_model, tmp_path_factory) -> Path:
    """The tiny model at four sizes in one engine dir (64x64 the default): several sizes, and hires fix across them."""
    return exported_once(tmp_path_factory, "tiny-4-sizes", dict(model="tiny", height=64, width=64, sizes=((96, 64), (64, 96), (128, 128))))


@pytest.fixture(scope="session")
def tiny_fast_engine(tiny_model, tmp_path_factory) -> Path:
    """tiny with the fast modes' graphs: the step cache's (export --step-cache), a tiny VAE decoder (tiny-taesd) and the
    tiled VAE's 64-pixel tile graphs, at 64x64 and 96x64."""
    return exported_once(tmp_path_factory, "tiny-fast", dict(model="tiny", height=64, width=64, sizes=((96, 64),), step_cache=True,
                                                            tiny_vae="tiny-taesd", vae_tile=64))


@pytest.fixture(scope="session")
def tiny_inpaint_engine(sdfast_cache, tmp_path_factory) -> Path:
    """The tiny model with a 9-channel inpainting U-Net, exported."""
    return exported_once(tmp_path_factory, "tiny-inpaint-64", dict(model="tiny-inpaint"))


@pytest.fixture(scope="session")
def tiny_engine_batch2_unguided(tiny_model, tmp_path_factory) -> Path:
    return exported_once(tmp_path_factory, "tiny-64-b2-noguide", dict(model=str(tiny_model), batch=2, guidance=False))


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
    return exported_once(tmp_path_factory, "tiny-64-fp16", dict(model="tiny", precision="fp16"))


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
