"""`tools/bench scale`: `dpo-lean precompute` then `dpo-lean train` on 60,000 generated rows, as two commands.

The rows resample the real demo set as `data` does (each copy unique), the model is the committed tiny one, and
cutoff_len is small (--scale-cutoff, default 128) so the reference pass over every row fits a CPU session: what is
measured is the data path, not the model. Each command runs in its own process, timed from start to exit, its
peak RSS summed over its process tree. The figures come from the commands' own lines: how many times the rows
were tokenised ("prepared N rows" against "reused prepared data"), and train's "data ready in X s" (prepared
data mapped, the reference cache joined and verified row by row, the eval split made).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from bench.data import TINY_MODEL, resample, run_measured, source_rows
from bench.tables import print_table

PREPARED = re.compile(r"^prepared ([\d,]+) rows in ([\d.]+) s")
REUSED = re.compile(r"^reused prepared data .* \(([\d.]+) s\)")
DATA_READY = re.compile(r"data ready in ([\d.]+) s")


def write_scale_config(work: Path, data: Path, args) -> Path:
    import yaml

    config = {"model_name_or_path": str(TINY_MODEL), "dataset": str(data), "template": "auto",
              "cutoff_len": args.scale_cutoff, "preprocessing_num_workers": 2, "quantization_bit": 4,
              "precompute_ref_batch_size": 64, "per_device_train_batch_size": 4, "max_steps": args.scale_steps,
              "save_strategy": "no", "plot_loss": False, "logging_steps": 1, "output_dir": str(work / "run")}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def command(name: str, config: Path, work: Path) -> dict:
    """One `dpo-lean NAME CONFIG` process: wall time, peak RSS, and what it says about its data."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf_datasets"), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    result = run_measured([sys.executable, "-m", "dpo_lean.cli", name, str(config)], env)
    if result["rc"]:
        tail = (result["stderr"].strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"scale: dpo-lean {name} failed ({result['rc']}): {tail}")
    lines = [line.strip() for line in result["stdout"].splitlines()]
    tokenised = [m for m in map(PREPARED.match, lines) if m]
    reused = [m for m in map(REUSED.match, lines) if m]
    ready = [m for m in map(DATA_READY.search, lines) if m]
    return {"seconds": result["seconds"], "peak_mb": result["peak_mb"], "tokenised": len(tokenised),
            "reused": len(reused), "prepare_seconds": float((tokenised or reused)[0].group(2 if tokenised else 1)),
            "data_ready_seconds": float(ready[0].group(1)) if ready else None}


def run_scale(args) -> dict:
    try:
        source = source_rows(Path(args.source))
    except SystemExit:
        from dpo_lean.tiny import demo_rows

        source = demo_rows(300, seed=0)
        print(f"scale: no demo set at {args.source}; resampling 300 generated rows instead")
    print(f"scale: {args.scale_rows:,} rows resampled from {len(source)}; tiny model (NF4), cutoff_len "
          f"{args.scale_cutoff}, 2 preprocessing workers; precompute, then train for {args.scale_steps} steps",
          flush=True)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        data = work / "rows.json"


        data.write_text(json.dumps(resample(source, args.scale_rows)), encoding="utf-8")
        config = write_scale_config(work, data, args)
        results = {}
        for name in ("precompute", "train"):
            results[name] = r = command(name, config, work)
            print(f"  {name}: {r['seconds']:.1f} s, peak RSS {r['peak_mb']:,.0f} MB, tokenised {r['tokenised']}x, "
                  f"reused {r['reused']}x", flush=True)
        shutil.rmtree(work / "run", ignore_errors=True)
    print_scale_table(args.scale_rows, results)
    return results


def print_scale_table(rows: int, results: dict) -> None:
    table = []
    for name, r in results.items():
        how = f"tokenised ({r['prepare_seconds']:.1f} s)" if r["tokenised"] else f"reused ({r['prepare_seconds']:.1f} s)"
        ready = f"{r['data_ready_seconds']:.1f}" if r["data_ready_seconds"] is not None else "-"
        table.append((name, f"{r['seconds']:.1f}", f"{r['peak_mb']:,.0f}", how, ready))
    print_table(f"scale: {rows:,} rows, precompute then train", table,
                ("command", "wall s", "peak RSS MB", "prepared data", "train's data ready s"))
    total = sum(r["tokenised"] for r in results.values())
    print(f"\nthe rows were tokenised {total} time(s) in total (target 1); train's data stage "
          f"{results['train']['data_ready_seconds']} s")


def add_scale_arguments(parser) -> None:
    group = parser.add_argument_group("scale (tools/bench scale)")
    group.add_argument("--scale-rows", type=int, default=60000)
    group.add_argument("--scale-cutoff", type=int, default=128, help="cutoff_len of the scale run")
    group.add_argument("--scale-steps", type=int, default=5, help="train's max_steps")
