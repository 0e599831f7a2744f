"""The CLI as a user meets it: a real PNG with A1111 parameters, and one clear line for every bad input."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli, visible_lines


def assert_clean_error(completed, *fragments):
    assert completed.returncode == 2, completed.stderr
    lines = visible_lines(completed.stderr)
    assert len(lines) == 1 and "Traceback" not in completed.stderr, completed.stderr
    assert lines[0].startswith("sdfast "), lines[0]  # on a line of its own, not after a leftover progress bar
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_generate_writes_png_with_parameters(tiny_engine, tmp_path):
    out = tmp_path / "apple.png"
    completed = run_cli("generate", tiny_engine, "a red apple on a table", "--negative", "blurry", "--steps", "5",
                        "--cfg", "7.5", "--seed", "42", "--sampler", "Euler", "-o", out)
    assert completed.returncode == 0, completed.stderr
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    assert np.asarray(image).std() > 10
    parameters = image.info["parameters"].splitlines()
    assert parameters[0] == "a red apple on a table"
    assert parameters[1] == "Negative prompt: blurry"
    for field in ("Steps: 5", "Sampler: Euler", "CFG scale: 7.5", "Seed: 42", "Size: 64x64", "Model hash: ", "Model: tiny"):
        assert field in parameters[2]
    assert "U-Net step median" in completed.stderr  # the per-stage timing summary


def test_info_prints_the_manifest(tiny_engine):
    completed = run_cli("info", tiny_engine, "--verify")
    assert completed.returncode == 0, completed.stderr
    for fragment in ("RANDOM WEIGHTS", "unet", "noise_pred[2x4x8x8]", "all sha256 match"):
        assert fragment in completed.stdout
    assert json.loads(run_cli("info", tiny_engine, "--json").stdout)["format"] == "sdfast-engine"


def test_img2img_inpainting_n_iter_and_clip_skip_flags(tiny_engine, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(init)  # not 64x64
    Image.fromarray(np.full((64, 64), 255, dtype=np.uint8), mode="L").save(mask)
    completed = run_cli("generate", tiny_engine, " ".join(["apple"] * 90), "--steps", "4", "--init-image", init, "--mask", mask,
                        "--strength", "0.5", "--n-iter", "2", "--seed", "7", "--clip-skip", "2", "--sampler", "dpm++ 2m karras",
                        "-o", tmp_path / "edit.png")
    assert completed.returncode == 0, completed.stderr
    assert "init image is 96x80; resized to the engine's 64x64" in completed.stderr
    assert "dropped" not in completed.stderr  # 90 tokens: two chunks, nothing cut
    for index in (0, 1):
        parameters = Image.open(tmp_path / f"edit-{index}.png").info["parameters"]
        for field in (f"Seed: {7 + index},", "Denoising strength: 0.5", "Clip skip: 2", "Sampler: DPM++ 2M Karras"):
            assert field in parameters


def test_generate_refuses_bad_init_images_and_masks(tiny_engine, tmp_path):
    out = tmp_path / "x.png"
    assert_clean_error(run_cli("generate", tiny_engine, "x", "--init-image", tmp_path / "none.png", "-o", out), "init image", "does not exist")
    (tmp_path / "text.png").write_text("hello")
    assert_clean_error(run_cli("generate", tiny_engine, "x", "--init-image", tmp_path / "text.png", "-o", out), "not a readable image")
    assert_clean_error(run_cli("generate", tiny_engine, "x", "--mask", tmp_path / "text.png", "-o", out), "--mask needs --init-image")
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "black.png")
    assert_clean_error(run_cli("generate", tiny_engine, "x", "--init-image", tmp_path / "black.png", "--strength", "1.5", "-o", out), "strength must be")
    assert_clean_error(run_cli("generate", tiny_engine, "x", "--clip-skip", "0", "-o", out), "clip skip must be")
    assert not out.exists()


def test_export_refuses_missing_model_folder(tmp_path):
    assert_clean_error(run_cli("export", "--model", tmp_path / "nowhere", "--out", tmp_path / "e"), "does not exist")


def test_export_refuses_non_diffusers_folder(tmp_path):
    (tmp_path / "notamodel").mkdir()
    assert_clean_error(run_cli("export", "--model", tmp_path / "notamodel", "--out", tmp_path / "e"), "model_index.json")
    assert not (tmp_path / "e").exists()


def test_export_refuses_bad_shape_before_work(tmp_path):
    assert_clean_error(run_cli("export", "--model", "tiny", "--out", tmp_path / "e", "--height", "100"), "multiple of 8")


def test_export_refuses_existing_out_without_force(tiny_engine):
    assert_clean_error(run_cli("export", "--model", "tiny", "--out", tiny_engine), "--force")


@pytest.fixture
def engine_copy(tiny_engine, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(tiny_engine, copy)
    return copy


def test_generate_refuses_missing_engine_dir(tmp_path):
    assert_clean_error(run_cli("generate", tmp_path / "nowhere", "x", "-o", tmp_path / "x.png"), "does not exist")


def cpu_graph(engine_dir, component: str) -> str:
    """The graph file the cpu backend loads for ``component`` (the export's CPU variant, as saved here)."""
    from sdfast.runtime.backends import get_backend
    from sdfast.runtime.manifest import read_manifest

    return get_backend("cpu").graph_for(read_manifest(engine_dir).components[component])[0]


def test_generate_refuses_missing_file(engine_copy, tmp_path):
    (engine_copy / cpu_graph(engine_copy, "unet")).unlink()
    assert_clean_error(run_cli("generate", engine_copy, "x", "-o", tmp_path / "x.png"), "unet", "missing")


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_generate_refuses_corrupt_file(engine_copy, tmp_path):
    flip_a_byte(engine_copy / cpu_graph(engine_copy, "vae_decoder"))
    assert_clean_error(run_cli("generate", engine_copy, "x", "-o", tmp_path / "x.png"), "vae_decoder", "sha256")
    assert not (tmp_path / "x.png").exists()


def test_load_hashes_only_what_the_backend_loads(engine_copy, tmp_path):
    """The cpu backend reads its CPU variants: a corrupt portable graph (TensorRT's) does not stop it; info --verify finds it."""
    portable = "unet.onnx"
    assert cpu_graph(engine_copy, "unet") != portable
    flip_a_byte(engine_copy / portable)
    completed = run_cli("generate", engine_copy, "x", "--steps", "1", "-o", tmp_path / "x.png")
    assert completed.returncode == 0, completed.stderr
    assert "load " in completed.stderr and "verify " in completed.stderr  # the load time is in the timing summary
    verify_all = run_cli("info", engine_copy, "--verify")
    assert verify_all.returncode == 2 and portable in verify_all.stderr


def test_load_reports_progress(tiny_engine):
    from sdfast.runtime.pipeline import Pipeline

    seen = []
    pipeline = Pipeline.load(tiny_engine, progress=lambda stage, done, total: seen.append((stage, done, total)))
    hashed = [(done, total) for stage, done, total in seen if stage == "verify"]
    loaded = [(done, total) for stage, done, total in seen if stage == "load"]
    assert hashed[-1][0] == hashed[-1][1] > 0 and all(a[0] <= b[0] for a, b in zip(hashed, hashed[1:]))
    assert loaded[0] == (0, 4) and loaded[-1] == (4, 4)
    assert set(pipeline.load_timings) == {"verify_s", "engines_s", "total_s"} and pipeline.load_timings["total_s"] > 0


def test_generate_refuses_truncated_file_even_without_hashing(engine_copy, tmp_path):
    name = cpu_graph(engine_copy, "unet")
    path = engine_copy / name
    path.write_bytes(path.read_bytes()[:1000])
    assert_clean_error(run_cli("generate", engine_copy, "x", "--verify", "size", "-o", tmp_path / "x.png"), name, "bytes")


def test_generate_refuses_other_format_version(engine_copy, tmp_path):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["format_version"] = 999
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(run_cli("generate", engine_copy, "x", "-o", tmp_path / "x.png"), "format version 999", "re-export")


def test_generate_refuses_malformed_manifest(engine_copy, tmp_path):
    (engine_copy / "manifest.json").write_text("{not json")
    assert_clean_error(run_cli("generate", engine_copy, "x", "-o", tmp_path / "x.png"), "not valid JSON")


def test_generate_refuses_unknown_sampler(tiny_engine, tmp_path):
    assert_clean_error(run_cli("generate", tiny_engine, "x", "--sampler", "euler z", "-o", tmp_path / "x.png"), "unknown sampler", "DDIM")


def test_generate_refuses_size_the_engine_was_not_built_for(tiny_engine, tmp_path):
    assert_clean_error(run_cli("generate", tiny_engine, "x", "--width", "128", "-o", tmp_path / "x.png"), "serves 64x64 (width x height), not 128x64")
    assert_clean_error(run_cli("generate", tiny_engine, "x", "--batch-size", "3", "-o", tmp_path / "x.png"), "batch 1", "not 3")


def test_generate_refuses_unwritable_output(tiny_engine, tmp_path):
    assert_clean_error(run_cli("generate", tiny_engine, "x", "-o", tmp_path / "no" / "such" / "dir.png"), "does not exist")
    assert_clean_error(run_cli("generate", tiny_engine, "x", "-o", tmp_path), "must end in .png")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: a read-only directory cannot refuse it")
def test_generate_refuses_a_directory_it_cannot_write(tiny_engine, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_clean_error(run_cli("generate", tiny_engine, "x", "-o", locked / "x.png"), "permission denied")
    assert list(locked.iterdir()) == []


def test_generate_refuses_bad_steps(tiny_engine, tmp_path):
    assert_clean_error(run_cli("generate", tiny_engine, "x", "--steps", "0", "-o", tmp_path / "x.png"), "steps must be")


@pytest.mark.parametrize("target", ["/proc/sdfast-test.png", "/sys/sdfast-test.png"])
def test_generate_refuses_an_output_the_kernel_will_not_create(tiny_engine, target):
    """os.access says yes to root on /proc and /sys; the output is probed by creating a file, before any engine loads."""
    assert_clean_error(run_cli("generate", tiny_engine, "x", "--steps", "1", "-o", target), "cannot write", target)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_generated_png_mode_follows_the_umask(tiny_engine, tmp_path, umask, mode):
    import subprocess
    import sys

    out = tmp_path / "x.png"
    completed = subprocess.run([sys.executable, "-m", "sdfast", "generate", str(tiny_engine), "x", "--steps", "1", "--quiet", "-o", str(out)],
                               capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(umask))
    assert completed.returncode == 0, completed.stderr
    assert out.stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("args, fragment", [
    (["--steps", "0"], "steps must be"),
    (["--init-image", "{init}", "--strength", "1.5"], "strength must be"),
    (["--width", "128"], "serves 64x64 (width x height), not 128x64"),
    (["--init-image", "{init}", "--sampler", "PLMS", "--strength", "0.5"], "cannot start part-way"),
    (["--sampler", "euler z"], "unknown sampler"),
    (["--clip-skip", "99"], "clip skip"),
])
def test_requests_are_refused_before_the_engines_are_read(engine_copy, tmp_path, args, fragment):
    """With a corrupt U-Net, a request that loaded (or hashed) the engines first would fail on the U-Net instead."""
    init = tmp_path / "init.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(init)
    flip_a_byte(engine_copy / cpu_graph(engine_copy, "unet"))
    completed = run_cli("generate", engine_copy, "x", *[a.format(init=init) for a in args], "-o", tmp_path / "x.png")
    assert_clean_error(completed, fragment)
    assert "sha256" not in completed.stderr


def test_inpainting_engine_refuses_a_request_without_images_before_loading(tiny_inpaint_engine, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(tiny_inpaint_engine, copy)
    flip_a_byte(copy / cpu_graph(copy, "unet"))
    assert_clean_error(run_cli("generate", copy, "x", "-o", tmp_path / "x.png"), "needs an init image and a mask")


def test_batch_writes_numbered_pngs_with_their_own_seeds(tiny_engine_batch2_unguided, tmp_path):
    completed = run_cli("generate", tiny_engine_batch2_unguided, "an owl", "--cfg", "1", "--seed", "100", "--steps", "3", "-o", tmp_path / "owl.png")
    assert completed.returncode == 0, completed.stderr
    for index in (0, 1):
        assert f"Seed: {100 + index}," in Image.open(tmp_path / f"owl-{index}.png").info["parameters"]


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda m: m.update(components=[]), "malformed"),
        (lambda m: m["components"]["unet"].update(files=["unet.onnx"]), "malformed"),
        (lambda m: m["geometry"].update(height="64"), "geometry.height"),
        (lambda m: m["components"]["unet"]["files"].update({"../../etc/passwd": {"sha256": "0", "bytes": 1}}), "relative path"),
        (lambda m: m.pop("tokenizers"), "tokenizers"),
        (lambda m: m["tokenizers"]["text_encoder"].update(max_length=2), "max_length"),
        (lambda m: m["tokenizers"].update(unet=m["tokenizers"]["text_encoder"]), "feeds 'unet'"),
        (lambda m: m["components"]["unet"].update(role="painter"), "'role' must be one of"),
        (lambda m: m["components"]["vae_decoder"].update(role="denoiser"), "exactly one component with role 'denoiser'"),
        (lambda m: m["latent"].pop("scaling_factor"), "latent.scaling_factor"),
        (lambda m: m.update(family="sd9"), "family 'sd9'"),
        (lambda m: m["geometry"].update(max_text_chunks=0), "max_text_chunks"),
        (lambda m: m["dynamic_dims"]["text_tokens"].update(min=1000), "min <= max"),
    ],
)
def test_generate_refuses_malformed_manifest_fields(engine_copy, tmp_path, mutate, fragment):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    mutate(manifest)
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(run_cli("generate", engine_copy, "x", "-o", tmp_path / "x.png"), fragment)
    assert_clean_error(run_cli("info", engine_copy), fragment)


def test_generate_refuses_an_engine_without_the_inputs_it_feeds(engine_copy, tmp_path):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["components"]["text_encoder"]["inputs"] = []
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(run_cli("generate", engine_copy, "x", "-o", tmp_path / "x.png"), "no input 'input_ids'")


def test_generate_refuses_changed_tokenizer(engine_copy, tmp_path):
    (engine_copy / "tokenizer" / "tokenizer.json").write_text("{}")
    assert_clean_error(run_cli("generate", engine_copy, "x", "-o", tmp_path / "x.png"), "tokenizer/tokenizer.json")


def test_generate_refuses_missing_scheduler(engine_copy, tmp_path):
    (engine_copy / "scheduler" / "scheduler_config.json").unlink()
    assert_clean_error(run_cli("generate", engine_copy, "x", "--verify", "size", "-o", tmp_path / "x.png"), "scheduler_config.json", "missing")


def test_generate_refuses_steps_beyond_the_schedule(tiny_engine, tmp_path):
    assert_clean_error(run_cli("generate", tiny_engine, "x", "--sampler", "ddim", "--steps", "1000", "-o", tmp_path / "x.png"), "timestep 1000")


def test_generate_refuses_prompt_that_is_not_utf8(tiny_engine, tmp_path):
    import subprocess
    import sys

    completed = subprocess.run([sys.executable.encode(), b"-m", b"sdfast", b"generate", str(tiny_engine).encode(), b"caf\xff", b"-o", str(tmp_path / "x.png").encode()],
                               capture_output=True, timeout=300)
    assert completed.returncode == 2 and b"Traceback" not in completed.stderr
    assert b"not valid UTF-8" in completed.stderr


def test_export_refuses_out_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_clean_error(run_cli("export", "--model", "tiny", "--out", tmp_path / "file" / "engine"), "is not a directory")


def test_export_force_refuses_a_folder_that_is_not_an_engine_dir(tmp_path):
    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / "thesis.txt").write_text("precious")
    assert_clean_error(run_cli("export", "--model", "tiny", "--out", tmp_path / "documents", "--force"), "not an engine dir")
    assert (tmp_path / "documents" / "thesis.txt").exists()


def test_samplers_lists_every_sampler_with_what_it_maps_to():
    from sdfast.sampling.registry import SAMPLERS

    table = run_cli("samplers")
    assert table.returncode == 0, table.stderr
    for spec in SAMPLERS.values():
        assert spec.a1111_name in table.stdout
    rows = {row["name"]: row for row in json.loads(run_cli("samplers", "--json").stdout)}
    assert len(rows) == len(SAMPLERS) >= 23
    assert rows["DPM++ 2M Karras"]["diffusers"] == "DPMSolverMultistepScheduler"
    assert rows["DPM++ 2M Karras"]["options"]["use_karras_sigmas"] is True
    assert rows["DPM++ 2S a"]["diffusers"] is None and rows["Euler a"]["stochastic"] is True


@pytest.mark.parametrize("prompt", ["an (apple:" + "9" * 40 + ")", "((an apple:" + "9" * 30 + "):" + "9" * 30 + ")", "(an apple:100000)"])
def test_huge_emphasis_weight_is_one_clean_line_before_loading(engine_copy, tmp_path, prompt):
    flip_a_byte(engine_copy / cpu_graph(engine_copy, "unet"))
    completed = run_cli("generate", engine_copy, prompt, "--steps", "1", "-o", tmp_path / "x.png")
    assert_clean_error(completed, "emphasis", "beyond")
    assert "Warning" not in completed.stderr


def test_an_unavailable_backend_is_refused_before_hashing(engine_copy, tmp_path):
    flip_a_byte(engine_copy / "unet.onnx")  # the portable graph, which tensorrt would read
    completed = run_cli("generate", engine_copy, "x", "--backend", "tensorrt", "-o", tmp_path / "x.png")
    assert_clean_error(completed, "backend 'tensorrt' is not available")
    assert "sha256" not in completed.stderr and "verifying" not in completed.stderr


def test_a_bad_negative_prompt_is_named_as_such(tiny_engine):
    from sdfast.errors import RequestError
    from sdfast.runtime.pipeline import GenerationRequest
    from sdfast.runtime.request_check import RequestChecker

    with pytest.raises(RequestError, match=r"^negative prompt: prompt emphasis weight '100000' is beyond"):
        RequestChecker.for_engine_dir(tiny_engine).prepare(GenerationRequest("an apple", negative_prompt="(blurry:100000)"))
