"""The worker protocol: each contender runs in a fresh process (``spawn``), which prints one RESULT line of JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]


def worker(name: str, raw: dict, warmup: int) -> None:
    """Runs in a fresh process; prints one RESULT line of JSON."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ["TQDM_DISABLE"] = "1"
    from bench.contenders import WORKERS
    from bench.patches import measured_device
    from dpo_lean.measure import peak_memory_gb

    result = WORKERS[name](raw, warmup)
    if result.get("peak_gb") is None:
        result["peak_gb"] = peak_memory_gb(measured_device())
    print("RESULT " + json.dumps(result), flush=True)


def spawn(name: str, raw: dict, warmup: int) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(TOOLS)!r}); from bench.worker import worker; "
            f"worker({name!r}, json.loads(sys.argv[1]), {warmup})")
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(raw)], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1][7:])
