"""`tools/bench scale-out`: what each process holds when the model is spread over processes, at a real shape.

`dpo-lean precompute` then `dpo-lean train` at the exact Qwen2.5-1.5B shape (shapes.py: random weights, its
151,936-token vocabulary, tied embeddings), NF4 base, LoRA r=16 on every linear layer, 1 pair per process per step,
cutoff 1,024 (prompt 512 + completions 256 each), run three ways on the same rows:

    1 process            `dpo-lean precompute|train CONFIG`
    2 processes DDP      `torchrun --standalone --nproc_per_node 2 ... CONFIG` (each process holds the whole model)
    2 processes FSDP     the same with `fsdp: true` (each process holds half of it, gathering a layer when it runs)

Each process reports itself (ranked.py, through dpo_lean/measure.py): its peak RSS while loading (until the model is
loaded and, under FSDP, sharded), its RSS then, its peak RSS after that (over the precompute pass, or over training
from its first step to the saved adapter), and its step (or pass) time. torchrun gives each of its processes one
thread; the single process uses the machine's cores.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

import yaml

from bench import worker
from bench.shapes import QWEN25, build_shape_model, write_exact_rows
from bench.suite import dpo_config
from bench.tables import print_table

RANKED = Path(__file__).resolve().parent / "ranked.py"
SETUPS = {"1 process": (1, False), "2 processes, DDP": (2, False), "2 processes, FSDP": (2, True)}
TINY = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "max_window_layers": 2, "sliding_window": 4096}
HELD = re.compile(r"FSDP: this process holds ([\d,.]+) MB of the model's ([\d,.]+) MB")


def run_command(command: str, config: Path, processes: int, log: Path) -> dict:
    """One `dpo-lean COMMAND` launch; the SCALEOUT record of each of its processes, by rank (its output in ``log``)."""
    launcher = ([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    env = {**os.environ, **worker.ALLOCATOR_ENV, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*launcher, str(RANKED), command, str(config)], capture_output=True, text=True, env=env)
    log.write_text(proc.stdout + "\n--- stderr\n" + proc.stderr, encoding="utf-8")
    records = sorted((json.loads(line[len("SCALEOUT "):]) for line in proc.stdout.splitlines()
                      if line.startswith("SCALEOUT ")), key=lambda r: r["rank"])
    if proc.returncode or len(records) != processes or any("peak_gb" not in r for r in records):
        errors = [line for line in proc.stderr.splitlines() if "Error" in line and "Failed to load CPU" not in line]
        return {"error": f"exit {proc.returncode}: {(errors or ['no error line'])[0][:200]} (output in {log})"}
    held = HELD.search(proc.stdout)
    return {"ranks": records, "held_mb": [float(g.replace(",", "")) for g in held.groups()] if held else None}


def step_seconds(record: dict, warmup: int) -> float | None:
    """Median time of the steps after the warm-up ones (train), from the steps' end times."""
    ends = record.get("step_ends") or []
    steps = [b - a for a, b in zip(ends, ends[1:])][max(warmup - 1, 0):]
    return statistics.median(steps) if steps else None


def run_setup(work: Path, logs: Path, raw: dict, name: str, processes: int, fsdp: bool) -> dict:
    out = work / re.sub(r"\W+", "-", name).strip("-")
    config = out / "config.yaml"
    out.mkdir(parents=True)
    config.write_text(yaml.safe_dump({**raw, "output_dir": str(out / "run"), "ref_cache_dir": str(out / "cache"),
                                      **({"fsdp": True} if fsdp else {})}), encoding="utf-8")
    result = {}
    for command in ("precompute", "train"):
        result[command] = r = run_command(command, config, processes, logs / f"{out.name}-{command}.log")
        peaks = r.get("error") or ", ".join(f"{x['load_peak_gb']:.2f} / {x['peak_gb']:.2f}" for x in r["ranks"])
        print(f"  {name} {command}: peak RSS while loading / after, per process (GB): {peaks}", flush=True)
        if "error" in r:
            break  # train needs precompute's cache
    return result


def run_scale_out(args) -> dict:
    shape = args.scaleout_shape
    print(f"scale-out: {shape} shape, NF4, LoRA r=16 all linear layers, cutoff 1024 (prompt "
          f"{args.prompt_tokens} + completions {args.completion_tokens}), 1 pair per process per step, "
          f"{args.scaleout_warmup} warm-up + {args.scaleout_steps} timed train steps; {', '.join(args.scaleout_setups)}",
          flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        model = build_model(work / "model", shape)
        steps = args.scaleout_warmup + args.scaleout_steps
        raw = dpo_config(Namespace(cutoff=1024, truncation="keep_start", batch=1, warmup=args.scaleout_warmup,
                                   steps=args.scaleout_steps), model, str(work / "rows.json"), work / "unused")
        raw.update(precompute_ref_batch_size=1, cache_part_rows=1, max_steps=steps)  # a part of the rows each
        write_exact_rows(Path(raw["dataset"]), raw, 2 * steps, args.prompt_tokens, args.completion_tokens)
        logs = Path(tempfile.mkdtemp(prefix="dpo-lean-scale-out-logs-"))
        print(f"scale-out: each launch's output in {logs}", flush=True)
        results = {name: run_setup(work, logs, raw, name, *SETUPS[name]) for name in args.scaleout_setups}
    print_scale_out_table(shape, results, args.scaleout_warmup)
    return results


def build_model(directory: Path, shape: str) -> str:
    if shape != "tiny":
        return build_shape_model(directory, shape)
    QWEN25.setdefault("tiny", TINY)  # the real shapes' builder, with a toy size (to check the bench quickly)
    try:
        return build_shape_model(directory, "tiny")
    finally:
        QWEN25.pop("tiny")


def print_scale_out_table(shape: str, results: dict, warmup: int) -> None:
    rows = []
    for name, result in results.items():
        for command, r in result.items():
            if "error" in r:
                rows.append((name, command, "", "failed: " + r["error"], *[""] * 4))
            for x in r.get("ranks", []):
                time_s = step_seconds(x, warmup) if command == "train" else x["seconds"]
                rows.append((name, command, str(x["rank"]), f"{x['load_peak_gb']:.2f}", f"{x['start_gb']:.2f}",
                             f"{x['peak_gb']:.2f}", f"{max(x['load_peak_gb'], x['peak_gb']):.2f}",
                             f"{time_s:.1f}" if time_s is not None else ""))
    print_table(f"scale-out at the {shape} shape: per-process peak RSS (GB) and time (s: a train step after "
                f"{warmup} warm-up, or the whole precompute pass)", rows,
                ("setup", "command", "rank", "peak while loading", "RSS when loaded", "peak after loading",
                 "peak of the process", "step / pass s"))
    held = next((r["held_mb"] for result in results.values() for r in result.values() if r.get("held_mb")), None)
    if held:
        print(f"\nFSDP: each process holds {held[0]:,.1f} MB of the model's {held[1]:,.1f} MB of weights as loaded "
              "(its shard of each layer and the output head whole; NF4 packed weights, float32 embedding/head on "
              "CPU; bitsandbytes' quantisation constants, which stay whole on every process, not counted)")


def add_scaleout_arguments(parser) -> None:
    group = parser.add_argument_group("scale-out (tools/bench scale-out)")
    group.add_argument("--scaleout-shape", choices=(*QWEN25, "tiny"), default="Qwen2.5-1.5B",
                       help="the real shape, or a toy one to check the bench")
    group.add_argument("--scaleout-steps", type=int, default=1, help="timed train steps")
    group.add_argument("--scaleout-warmup", type=int, default=1, help="warm-up train steps before them")
    group.add_argument("--scaleout-setups", nargs="+", choices=tuple(SETUPS), default=list(SETUPS))
