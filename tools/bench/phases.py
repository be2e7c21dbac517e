"""`tools/bench phases`: one train step's memory, phase by phase, at a real shape, under both allocator settings.

For each contender (dpo-lean, trl) and each allocator setting (glibc's default; its mmap threshold fixed), a
fresh worker trains 2 steps at --phase-shape (default Qwen2.5-0.5B) with 1 pair and the 1,024-token cap, and
reads RSS (now, and the peak since the step began) at the step's start, at the end of each model forward, after
the backward and after the optimizer step. It shows where a step's peak RSS comes from, and how much of it is
freed memory glibc keeps (see worker.LIVE_MEMORY_ENV).
"""

from __future__ import annotations

import json
import tempfile
from argparse import Namespace
from pathlib import Path

from bench import worker
from bench.shapes import build_shape_model, write_exact_rows
from bench.suite import dpo_config
from bench.tables import print_table

PHASE_CONTENDERS = ("dpo-lean", "trl")  # contenders.WORKERS' phases:* entries


def run_phases(args) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model = build_shape_model(tmp / "model", args.phase_shape)
        shape = Namespace(cutoff=1024, truncation="keep_start", batch=1, warmup=0, steps=2)
        raw = dpo_config(shape, model, str(tmp / "rows.json"), tmp / "run")
        write_exact_rows(Path(raw["dataset"]), raw, 2, args.prompt_tokens, args.completion_tokens)
        cache = worker.spawn("precompute:dpo-lean", raw, 0)
        if "error" in cache:
            raise SystemExit(f"phases: precompute failed: {cache['error']}")
        for contender in PHASE_CONTENDERS:
            for setting, env in (("glibc default", {}), ("mmap threshold fixed", dict(worker.LIVE_MEMORY_ENV))):
                worker.ALLOCATOR_ENV = env
                out = {**raw, "output_dir": str(tmp / f"{contender}-{len(env)}")}
                results[f"{contender}, {setting}"] = r = worker.spawn(f"phases:{contender}", out, 0)
                print(f"{contender}, {setting}: {json.dumps(r)}", flush=True)
    print_phase_table(args.phase_shape, results)
    return results


def print_phase_table(shape: str, results: dict) -> None:
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append((name, "failed: " + r["error"], "", "", ""))
            continue
        start = next(t for t in r["trace"] if t[0] == "step start")
        forward = max((t for t in r["trace"] if t[0] == "after forward"), key=lambda t: t[2])
        rows.append((name, f"{start[1]:.2f}", f"{forward[1]:.2f}", f"{max(t[2] for t in r['trace']):.2f}",
                     f"{len([t for t in r['trace'] if t[0] == 'step start'])}"))
    print_table(f"{shape}: train steps phase by phase (RSS GB; 1 pair, cap 1,024)", rows,
                ("contender, allocator", "RSS at first step start", "RSS after a forward (highest)",
                 "peak over the steps", "steps"))


def add_phase_arguments(parser) -> None:
    group = parser.add_argument_group("phases (tools/bench phases)")
    group.add_argument("--phase-shape", default="Qwen2.5-0.5B", choices=("Qwen2.5-0.5B", "Qwen2.5-1.5B"))
