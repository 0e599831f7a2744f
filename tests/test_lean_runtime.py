"""The deployable runtime never imports torch, diffusers or transformers, and --help stays light."""
import json
import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "onnx")

GENERATE_AND_REPORT = """
import json, sys
from sdfast.cli import main
code = main(["generate", sys.argv[1], "a red apple", "--steps", "3", "-o", sys.argv[2], "--quiet"])
print(json.dumps({"code": code, "modules": sorted(m.split(".")[0] for m in sys.modules)}))
"""


def test_generation_imports_no_heavy_library(tiny_engine, tmp_path):
    out = tmp_path / "lean.png"
    completed = subprocess.run([sys.executable, "-c", GENERATE_AND_REPORT, str(tiny_engine), str(out)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["code"] == 0 and out.is_file()
    assert "onnxruntime" in report["modules"] and "numpy" in report["modules"]
    for name in HEAVY:
        assert name not in report["modules"], f"the runtime imported {name}"


def test_help_imports_no_heavy_library():
    code = "import sys; from sdfast.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint(sorted(sys.modules))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    modules = {m.split(".")[0] for m in eval(completed.stdout.strip().splitlines()[-1])}
    assert "sdfast" in modules
    for name in HEAVY + ("onnxruntime", "numpy"):
        assert name not in modules, f"sdfast --help imported {name}"
