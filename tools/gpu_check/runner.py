"""Run the check's steps in order, each in its own process group under its own time cap, and record each result
in $OUT the moment the step ends (results.json and summary.md rewritten, the step's log beside them)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpu_check import report, wheels

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
BUDGET_S = 360  # the whole check, setup included: a device call runs 10 minutes at most, a machine start costs 1-2
DRY_CAP_FACTOR = 10  # a dry run's caps: CPU, and a loaded test machine; the caps are for an H100
DRY_CONTENDERS = ["dpo-lean", "trl"]  # a dry run's train rows: dpo-lean's own, and TRL's API (the likeliest to move);
# its precompute rows: dpo-lean's alone (the bare forward is left out there, to keep the dry run short)


@dataclass
class Step:
    name: str
    cap_s: int  # the step is killed (its process group) past this
    estimate_s: int  # expected on one H100 (docs/gpu-check.md says how it was estimated)
    command: list[str] | None  # None: skipped
    skip_reason: str = ""
    json_path: Path | None = None  # the bench's figures, rewritten after every contender


@dataclass
class Context:
    out: Path
    work: Path
    dry_run: bool
    env: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    deadline: float = 0.0


# --------------------------------------------------------------------------- setup


def setup(ctx: Context) -> bool:
    """Install the carried wheels the image needs, then record the versions and the GPU; False where the libraries
    do not import (the versions, read without importing, and the error are recorded then)."""
    site = ctx.work / "site"
    carried = sorted((ROOT / ".whl").glob("*.whl"))
    decisions = wheels.plan(carried, wheels.project_ranges())
    chosen = [w for w, needed, _ in decisions if needed]
    for _, needed, why in decisions:
        print(f"  {'install' if needed else 'keep   '} {why}")
    if not carried:
        print("  no wheels in .whl/ (bash tools/gpu_kit.sh downloads them); using what is installed")
    if chosen and not ctx.dry_run:
        wheels.install(chosen, site)
    elif chosen:
        print(f"  dry run: {len(chosen)} wheel(s) not installed")
    path = [str(site)] if chosen and not ctx.dry_run else []
    sys.path[:0] = path  # so what is read here (versions, requirements) is what the steps will import
    ctx.env = {**os.environ, "PYTHONPATH": os.pathsep.join(path + [str(ROOT), str(TOOLS)] +
                                                           [p for p in [os.environ.get("PYTHONPATH")] if p]),
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    env = report.environment(imports=False)  # a dry run installs nothing: this is all it reads
    if not ctx.dry_run:  # a fresh process imports every library, as the steps will
        info = subprocess.run([sys.executable, str(TOOLS / "gpu_check"), "env"], env=ctx.env, capture_output=True,
                              text=True, timeout=120)
        if info.returncode:
            env["import_error"] = info.stderr.strip()[-3000:]
        else:
            env = json.loads(info.stdout.splitlines()[-1])
    ctx.results["env"] = env
    env["installed_wheels"] = [w.name for w in chosen]
    env["unmet_requirements"] = wheels.unmet(chosen) + wheels.outside_ranges(wheels.project_ranges())
    for problem in env["unmet_requirements"]:
        print(f"  warning: {problem}")
    if "import_error" in env:
        print(f"gpu_check: the libraries do not import:\n{env['import_error']}")
    return "import_error" not in env


# --------------------------------------------------------------------------- the steps


def _bench(ctx: Context, name: str, shape: str, attn: str,
           contenders: list[str] | None = None) -> tuple[list[str], Path]:
    """tools/bench real-shapes at ``shape`` (the tiny one in a dry run): cutoff 2,048 (prompt 1,024 + completions
    1,024 each), 1 pair a step; the models stay in work/models for the next step (the OOM step builds the 1.5B one)."""
    path = ctx.work / f"{name}.json"
    if ctx.dry_run:
        sizes = ["--shape-cutoff", "64", "--prompt-tokens", "24", "--completion-tokens", "16", "--shape-steps", "1",
                 "--shape-warmup", "0"]
    else:
        sizes = ["--shape-cutoff", "2048", "--prompt-tokens", "1024", "--completion-tokens", "1024",
                 "--shape-steps", "2", "--shape-warmup", "1"]
    rows = ["--shape-contenders", *contenders, "--shape-precompute"] if contenders is not None else []
    return ([sys.executable, str(TOOLS / "bench"), "real-shapes", "--shapes", shape, *sizes, "--attn", attn,
             "--model-dir", str(ctx.work / "models"), "--json", str(path), *rows], path)


def steps(ctx: Context) -> list[Step]:
    dry = ["--dry-run"] if ctx.dry_run else []
    work = ["--work", str(ctx.work)]
    check = [sys.executable, str(TOOLS / "gpu_check"), "step"]
    cuda_files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                        if "pytest.mark.cuda" in p.read_text(encoding="utf-8"))
    small, large = ("tiny", "tiny") if ctx.dry_run else ("Qwen2.5-1.5B", "Qwen2.5-7B")
    # caps and estimates (seconds on one H100): docs/gpu-check.md says how they were estimated
    out = [Step("cuda-tests", 40, 20, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                                        "-rs", *cuda_files]),
           Step("demo", 45, 30, [*check, "demo", *work, *dry]),
           Step("oom", 40, 28, [*check, "oom", "--shape", small, *work, *dry])]
    fa2 = bool(ctx.results.get("env", {}).get("flash_attn"))
    # bench-7B may use all the time the steps before it left (at least 145 s when each used its whole cap), but
    # what the FlashAttention-2 rows need, where they run
    for name, shape, cap, estimate in (("bench-1.5B", small, 90, 75), ("bench-7B", large, 145 if fa2 else BUDGET_S, 125)):
        command, path = _bench(ctx, name, shape, "sdpa", DRY_CONTENDERS if ctx.dry_run else None)
        out.append(Step(name, cap, estimate, command, json_path=path))
    if ctx.dry_run:  # the same code as bench-1.5B at the same tiny shape: not twice
        out[-1] = Step("bench-7B", 0, 0, None, "dry run: bench-1.5B ran this code at the tiny shape")
    if fa2:
        command, path = _bench(ctx, "bench-1.5B-fa2", small, "fa2", ["dpo-lean"])
        out.append(Step("bench-1.5B-fa2", 40, 20, command, json_path=path))
    else:
        out.append(Step("bench-1.5B-fa2", 0, 0, None, "flash_attn is not installed: no FlashAttention-2 rows"))
    return out


def run_step(ctx: Context, step: Step) -> dict:
    """Run one step under min(its cap, the time left); returns its record (status, seconds, parsed result)."""
    left = ctx.deadline - time.monotonic()
    if step.command is None:
        return {"status": "SKIP", "detail": step.skip_reason, "seconds": 0, "cap_s": 0, "estimate_s": 0}
    if left < 5:
        return {"status": "SKIP", "detail": "no time left in the budget", "seconds": 0, "cap_s": 0,
                "estimate_s": step.estimate_s}
    cap = min(step.cap_s * (DRY_CAP_FACTOR if ctx.dry_run else 1), int(left))
    log = ctx.out / f"{step.name}.log"
    print(f"== {step.name} (cap {cap} s, expected about {step.estimate_s} s on an H100): {' '.join(step.command)}",
          flush=True)
    t0, cpu0 = time.monotonic(), _children_cpu()
    with open(log, "w") as f:
        proc = subprocess.Popen(step.command, stdout=f, stderr=subprocess.STDOUT, env=ctx.env, cwd=ROOT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    seconds = round(time.monotonic() - t0, 1)
    record = {"seconds": seconds, "cpu_seconds": round(_children_cpu() - cpu0, 1), "cap_s": cap,
              "estimate_s": step.estimate_s, "rc": rc, "log": log.name,
              **report.read_result(step.name, log, step.json_path, ctx.dry_run)}
    ok = rc == 0 and record.pop("ok", True)
    record["status"] = "TIMEOUT" if rc is None else "PASS" if ok else "FAIL"
    return record


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far (a killed step's count too)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run(out: Path, work: Path, dry_run: bool, budget_s: int = BUDGET_S) -> int:
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    budget_s *= DRY_CAP_FACTOR if dry_run else 1
    ctx = Context(out, work, dry_run, deadline=time.monotonic() + budget_s)
    t0 = time.monotonic()
    ctx.results = {"dry_run": dry_run, "budget_s": budget_s, "steps": {}}
    print(f"gpu_check{' (dry run: CUDA calls skipped, tiny sizes)' if dry_run else ''}: budget {budget_s} s; "
          f"results in {out}/", flush=True)
    ready = setup(ctx)
    ctx.results["setup_seconds"] = round(time.monotonic() - t0, 1)
    report.write(ctx.out, ctx.results)
    print(report.env_line(ctx.results["env"]), flush=True)
    if not ready:
        return 1
    for step in steps(ctx):
        ctx.results["steps"][step.name] = record = run_step(ctx, step)
        report.write(ctx.out, ctx.results)  # on disk before the next step starts
        print(f"   {record['status']} in {record['seconds']} s: {record.get('detail', '')}", flush=True)
    ctx.results["total_seconds"] = round(time.monotonic() - t0, 1)
    report.write(ctx.out, ctx.results)
    print("\n" + (ctx.out / "summary.md").read_text(encoding="utf-8"))
    return 0 if all(r["status"] in ("PASS", "SKIP") for r in ctx.results["steps"].values()) else 1
