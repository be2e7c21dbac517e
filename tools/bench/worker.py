"""The worker protocol: each contender runs in a fresh process (``spawn``), which prints one RESULT line of JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]
# glibc's malloc raises its mmap threshold after the first large free (up to 32 MiB), so later buffers of that size
# come from the heap, and freed heap memory mostly stays resident: on CPU a contender's peak RSS then reflects
# its allocation history more than what it needs (the same dpo-lean step measured 7.3 GB so, 2.0 GB with the
# threshold fixed). Fixing it in every contender makes peak RSS follow live memory; --malloc glibc turns it off.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
ALLOCATOR_ENV: dict[str, str] = dict(LIVE_MEMORY_ENV)


def allocator_line() -> str:
    if ALLOCATOR_ENV:
        return ("allocator: glibc malloc with " + ", ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV.items())
                + " in every contender (peak RSS follows live memory; --malloc glibc for glibc's default)")
    return "allocator: glibc's default in every contender (freed buffers may stay resident and count in peak RSS)"


def worker(name: str, raw: dict, warmup: int) -> None:
    """Runs in a fresh process; prints one RESULT line of JSON."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ["TQDM_DISABLE"] = "1"
    from bench.contenders import WORKERS
    from bench.patches import measured_device
    from dpo_lean.measure import peak_memory_gb, peak_reserved_gb

    result = WORKERS[name](raw, warmup)
    if result.get("peak_gb") is None:
        result["peak_gb"] = peak_memory_gb(measured_device())
        result["reserved_gb"] = peak_reserved_gb(measured_device())  # CUDA's caching allocator; None on CPU
    print("RESULT " + json.dumps(result), flush=True)


def spawn(name: str, raw: dict, warmup: int) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(TOOLS)!r}); from bench.worker import worker; "
            f"worker({name!r}, json.loads(sys.argv[1]), {warmup})")
    env = {**os.environ, **ALLOCATOR_ENV, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(raw)], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1][7:])
