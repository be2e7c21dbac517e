"""tools/gpu_check: its dry run walks every step on CPU (so the GPU check cannot rot unseen), and its pieces: the
time caps kill a step's whole process group, precompute's out-of-memory lines are read right, the carried wheels
are installed only where the image lacks them, the bench rows' ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT
from gpu_check import checks, report, runner, wheels
from packaging.specifiers import SpecifierSet


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(tmp / "out"), "GPU_CHECK_WORK": str(tmp / "work"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=900)
    return proc, tmp / "out"


def test_dry_run_walks_every_step_and_records_each(dry_run):
    proc, out = dry_run
    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    assert list(steps) == ["cuda-tests", "demo", "oom", "bench-1.5B", "bench-7B", "bench-1.5B-fa2"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert steps["cuda-tests"]["status"] == "PASS" and steps["cuda-tests"]["result"]["skipped"] >= 7
    demo = steps["demo"]
    assert demo["status"] == "PASS" and 0 <= demo["result"]["after"] <= 1
    assert set(demo["result"]["seconds"]) == {"precompute", "train", "evaluate"}
    oom = steps["oom"]
    assert oom["status"] == "PASS", oom["detail"]
    assert oom["result"]["halvings"][0] == [8, 4] and oom["result"]["grow_backs"][0][1:] == [4, 8]
    assert oom["result"]["max_abs_diff"] < 1e-3 and oom["result"]["rows"] > 100
    bench = steps["bench-1.5B"]
    assert bench["status"] == "PASS", bench["detail"]
    tiny = bench["result"]["tiny"]
    assert set(tiny["train"]) == set(runner.DRY_CONTENDERS) and set(tiny["precompute"]) == {"dpo-lean"}
    assert all(r["step_seconds"] > 0 and r["tokens_per_second"] > 0 for r in tiny["train"].values())
    assert tiny["cutoff"] == 64 and tiny["attention"] == "sdpa" and tiny["matmul_flops"] > 0
    assert steps["bench-7B"]["status"] == "SKIP"
    assert steps["bench-1.5B-fa2"]["status"] in ("SKIP", "PASS")


def test_dry_run_output_fits_what_a_device_call_brings_back(dry_run):
    proc, out = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"results.json", "summary.md", "oom.log", "demo.log"} <= set(files), files
    summary = (out / "summary.md").read_text()
    assert "| oom | PASS |" in summary and "| bench-1.5B | tiny | train dpo-lean | sdpa |" in summary
    assert summary.strip().splitlines()[-1] in proc.stdout  # the summary is printed last (a call returns the tail)


def test_a_step_past_its_cap_is_killed_with_its_children(tmp_path):
    ctx = runner.Context(tmp_path, tmp_path, dry_run=False, env=dict(os.environ), deadline=time.monotonic() + 60)
    pid_file = tmp_path / "child.pid"
    step = runner.Step("slow", 1, 1, ["bash", "-c", f"sleep 30 & echo $! > {pid_file}; wait"])
    t0 = time.monotonic()
    record = runner.run_step(ctx, step)
    assert record["status"] == "TIMEOUT" and record["rc"] is None and time.monotonic() - t0 < 15
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_no_step_starts_without_time_left(tmp_path):
    ctx = runner.Context(tmp_path, tmp_path, dry_run=False, env=dict(os.environ), deadline=time.monotonic() + 2)
    record = runner.run_step(ctx, runner.Step("late", 60, 10, ["true"]))
    assert record["status"] == "SKIP" and "no time left" in record["detail"]


def test_out_of_memory_lines_are_read_as_precompute_prints_them():
    text = "\n".join([
        "reference log-probs:  10%|#  | 8/80",
        "precompute: out of memory at 8 pairs a batch; continuing at 4",
        "precompute: 16 clean batches at 4 pairs a batch; trying 8 again",
        "precompute: out of memory at 8 pairs a batch; continuing at 4",
        "precompute: out of memory at 4 pairs a batch; continuing at 2",
        "precompute: 32 clean batches at 2 pairs a batch; trying 4 again",
    ])
    assert checks.parse_oom_lines(text) == {"halvings": [[8, 4], [8, 4], [4, 2]], "grow_backs": [[16, 4, 8], [32, 2, 4]],
                                            "last_grow_back_held": True}
    failed_again = text + "\nprecompute: out of memory at 4 pairs a batch; continuing at 2"
    assert checks.parse_oom_lines(failed_again)["last_grow_back_held"] is False
    same_grow_twice = "\n".join(text.splitlines()[:4] + text.splitlines()[2:3])  # grew 4 -> 8, failed, grew again
    assert checks.parse_oom_lines(same_grow_twice)["last_grow_back_held"] is True
    assert checks.parse_oom_lines("precompute: 3 rows")["halvings"] == []


def test_carried_wheels_install_only_what_the_image_lacks_or_has_out_of_range():
    carried = [Path(".whl") / name for name in ("trl-1.16.0-py3-none-any.whl", "peft-0.21.2-py3-none-any.whl",
                                                "dill-0.4.1-py3-none-any.whl", "datasets-5.2.0-py3-none-any.whl")]
    image = {"peft": "0.15.0", "dill": "0.3.8", "datasets": "5.0.0"}.get  # no trl
    ranges = {"peft": SpecifierSet(">=0.18"), "datasets": SpecifierSet(">=4.2"), "trl": SpecifierSet(">=1.0,<2")}
    decided = {w.name.split("-")[0]: needed for w, needed, _ in wheels.plan(carried, ranges, image)}
    assert decided == {"trl": True, "peft": True, "dill": False, "datasets": False}


def test_a_dependency_outside_pyprojects_range_is_named():
    ranges = {"click": SpecifierSet(">=8.2"), "torch": SpecifierSet(">=2.6"), "trl": SpecifierSet(">=1.16,<2")}
    have = {"click": "8.1.7", "torch": "2.11.0+cu130"}.get
    assert wheels.outside_ranges(ranges, have) == ["click 8.1.7 is outside pyproject's click>=8.2",
                                                   "trl<2,>=1.16 is not installed"]


def test_a_carried_wheels_unmet_requirement_is_named(tmp_path):
    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n"
                   "Requires-Dist: pyarrow>=24.0.0\nRequires-Dist: dill<0.4.2\nRequires-Dist: missing-one\n"
                   "Requires-Dist: pytest; extra == 'test'\n")
    have = {"pyarrow": "21.0.0", "dill": "0.4.1"}.get
    assert wheels.unmet([wheel], have) == ["demo-pkg needs pyarrow>=24.0.0; 21.0.0 is installed",
                                           "demo-pkg needs missing-one, which is not installed"]


def test_bench_rows_give_utilisation_and_the_bare_forward_ratio():
    shape = {"n_matmul_params": 1e9, "matmul_flops": 800e12, "attention": "sdpa",
             "train": {"dpo-lean": {"peak_gb": 5.0, "reserved_gb": 6.0, "step_seconds": 0.5,
                                    "tokens_per_second": 8000.0}},
             "precompute": {"dpo-lean": {"peak_gb": 3.0, "reserved_gb": 3.5, "tokens": 40000, "seconds": 2.0},
                            "bare-forward": {"peak_gb": 4.0, "reserved_gb": 4.5, "tokens": 40000, "seconds": 1.0}}}
    rows = report.bench_rows({"steps": {"bench-7B": {"result": {"Qwen2.5-7B": shape}}}})
    # train: 4N FLOPs a token x 8,000 tokens/s = 3.2e13 of 8e14 = 4.0%; precompute: 2N x 20,000 = 4e13 = 5.0%
    assert rows[0] == ("bench-7B", "Qwen2.5-7B", "train dpo-lean", "sdpa", "5.00", "6.00", "0.500", "8,000", "", "4.0%")
    assert rows[1][2] == "precompute dpo-lean" and rows[1][7:] == ("20,000", "0.50x", "5.0%")
    assert rows[2][7:] == ("40,000", "1.00x", "10.0%")
