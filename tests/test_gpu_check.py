"""The GPU check's machinery on the CPU: a failing or overrunning stage is reported and the next one runs, the summary
comes last, pytest's report is read right, and the CPU rehearsal of its first stages runs the real commands."""
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
from check import junit_counts  # noqa: E402
from runner import Check  # noqa: E402


def test_a_failing_stage_is_reported_and_the_next_still_runs(tmp_path):
    check = Check(log_path=tmp_path / "log", env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path, total_budget_s=None)
    ran = []

    def fails(c):
        c.sh([sys.executable, "-c", "import sys; print('loading'); sys.exit('RuntimeError: no CUDA device')"])

    def overruns(c):
        c.sh([sys.executable, "-c", "import time; time.sleep(30)"])

    def crashes(c):
        raise KeyError("a bug in the stage")

    def works(c):
        ran.append(True)
        return {"figure": 1.5, "_headline": ["figure"]}

    started = time.monotonic()
    for name, stage, budget in (("fails", fails, 30), ("overruns", overruns, 1), ("crashes", crashes, 30), ("works", works, 30)):
        check.run_stage(name, stage, budget)
    assert time.monotonic() - started < 20, "the overrunning command was not stopped at its stage's budget"
    statuses = {r.name: (r.status, r.error) for r in check.results}
    assert statuses["fails"] == ("failed", "exit 1: RuntimeError: no CUDA device")
    assert statuses["overruns"][0] == "timeout" and "budget" in statuses["overruns"][1]
    assert statuses["crashes"] == ("failed", "KeyError: 'a bug in the stage'")
    assert statuses["works"] == ("ok", "") and ran
    table = check.write(tmp_path / "check.json", {"title": "t"})
    assert table.splitlines()[-1] == "| works | ok | 0 | figure 1.5 |"
    record = json.loads((tmp_path / "check.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["fails", "overruns", "crashes", "works"]
    assert record["stages"][0]["commands"] == [f"{sys.executable} -c import sys; print('loading'); sys.exit('RuntimeError: no CUDA device')"]
    assert "loading" in (tmp_path / "log").read_text()


def test_the_total_budget_skips_what_no_longer_fits(tmp_path):
    check = Check(log_path=tmp_path / "log", env={}, cwd=tmp_path, total_budget_s=1)
    time.sleep(0.1)
    result = check.run_stage("late", lambda c: {"x": 1}, 60)
    assert result.status == "skipped" and "budget" in result.error


def test_pytest_report_counts(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no GPU here')\n"
        "def test_skipped(): pass\n")
    report = tmp_path / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", str(tmp_path)],
                   capture_output=True, cwd=tmp_path, timeout=120)
    counts = junit_counts(report)
    assert (counts["tests"], counts["passed"], counts["failed"], counts["skipped"]) == (3, 1, 1, 1)
    assert counts["failures"][0].startswith("test_bad: AssertionError: one is not two")
    assert counts["skip_reasons"] == {"no GPU here": 1}


def test_rehearsal_of_the_first_stages(tmp_path):
    """environment and models, as the GPU machine runs them: without a GPU the environment says why, and the check goes on."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "check.py"), "--rehearse", "--stages", "environment,models",
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.rstrip().splitlines()[-1].startswith("| models | ok |"), "the summary table is not printed last"
    record = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    environment, models = record["stages"]
    assert environment["figures"]["versions"]["numpy"] and "torch" in environment["figures"]["versions"]
    assert Path(models["figures"]["tiny"], "model_index.json").is_file()
    assert record["command"].endswith("--work " + str(tmp_path / "work"))
