"""`tools/bench data`: how long `dpo-lean data-check` takes to prepare N rows, cold and warm, and its peak memory.

Rows resample the real demo set (``--source``, default ../shared/data/dpo_en_demo.json), each copy made unique
by a counter appended to its first user turn, so no two rows share a content hash. For each size, three
`dpo-lean data-check` subprocesses run on one config (the committed tiny model and its ChatML chat template,
``template: auto``): cold with ``preprocessing_num_workers`` 1, cold with 2 (each in fresh output, cache and
HF datasets directories), then warm (the same config and directories as the cold 2-worker run, run again).
Each is timed from start to exit, and its peak RSS is the sum over the process and its children, sampled
every 20 ms with psutil (so parallel workers count together). The floor, measured in this process on the
same rows: the fast tokenizer's own batch encode, ``tokenizer(texts)`` in one call, of every prompt + chosen
and prompt + rejected rendered with the chat template (rendering not timed).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data"
TINY_MODEL = ROOT / "tests" / "fixtures" / "tiny-model"
RUNS = (("cold", 1), ("cold", 2), ("warm", 2))
_NOTE = re.compile(r"reus|prepar", re.IGNORECASE)  # the prepared-data lines, where data-check prints them


def source_rows(source: Path) -> list[dict]:
    """The demo rows: ``source`` is a ShareGPT JSON file or a folder holding dpo_en_demo.json."""
    path = source / "dpo_en_demo.json" if source.is_dir() else source
    if not path.is_file():
        raise SystemExit(f"--source {source}: no dpo_en_demo.json there; point it at the 300-row demo set")
    return json.loads(path.read_text(encoding="utf-8"))


def resample(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` rows drawn from ``rows`` (the i-th in file order while i < len(rows), then at random), each with
    `` (copy i)`` appended to its first user turn, so every row's content is unique."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        row = json.loads(json.dumps(rows[i] if i < len(rows) else rng.choice(rows)))
        turn = next(t for t in row["conversations"] if t["from"] in ("human", "user"))
        turn["value"] += f" (copy {i})"
        out.append(row)
    return out


def write_config(directory: Path, data: Path, model: Path, cutoff: int, workers: int) -> Path:
    """A data-check config whose output, ref cache and metrics all live under ``directory``."""
    import yaml

    config = {"model_name_or_path": str(model), "dataset": str(data), "template": "auto", "cutoff_len": cutoff,
              "preprocessing_num_workers": workers, "output_dir": str(directory / "run"),
              "ref_cache_dir": str(directory / "ref_cache")}
    path = directory / "config.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; wall seconds, peak RSS (MB) summed over the process tree, output and exit status."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, done = [0], threading.Event()

    def sample():
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            peak[0] = max(peak[0], total)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"seconds": seconds, "peak_mb": peak[0] / 2**20, "stdout": out, "stderr": err, "rc": proc.returncode}


def data_check(work: Path, data: Path, args, workers: int) -> dict:
    """One `dpo-lean data-check` subprocess with its own HF datasets cache under ``work``."""
    config = write_config(work, data, args.data_model, args.data_cutoff, workers)
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf_datasets"), "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dpo_lean.cli", "data-check", str(config)]
    result = run_measured(cmd, env)
    if result["rc"]:
        tail = (result["stderr"].strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"data-check on {data.name} failed ({result['rc']}): {tail}")
    lines = result["stdout"].splitlines()
    kept = next((line.split(":")[1].strip() for line in lines if line.startswith("rows kept:")), "?")
    notes = [line.strip() for line in lines if _NOTE.search(line)]
    return {"seconds": result["seconds"], "peak_mb": result["peak_mb"], "rows_kept": kept,
            "note": "; ".join(notes)}


def floor_seconds(rows: list[dict], model: Path) -> tuple[float, int]:
    """The fast tokenizer's batch encode of every prompt + chosen and prompt + rejected, rendered with the chat
    template; returns (seconds of the one ``tokenizer(texts)`` call, tokens encoded)."""
    from transformers import AutoTokenizer

    from dpo_lean.data.sources import load_records

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
        records = load_records(str(path)).records
    texts = [tokenizer.apply_chat_template(r.prompt + completion, tokenize=False)
             for r in records for completion in (r.chosen, r.rejected)]
    t0 = time.perf_counter()
    encoded = tokenizer(texts, add_special_tokens=False)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(ids) for ids in encoded["input_ids"])


def bench_size(tmp: Path, rows: list[dict], args) -> dict:
    n = len(rows)
    data = tmp / f"rows-{n}.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    runs = {}
    for kind, workers in RUNS:
        work = tmp / f"{n}-w{workers}"  # warm reuses the cold 2-worker run's directories
        if kind == "cold":
            shutil.rmtree(work, ignore_errors=True)
        runs[f"{kind} {workers}"] = r = data_check(work, data, args, workers)
        print(f"  {n:,} rows, {kind}, {workers} worker(s): {r['seconds']:.1f} s, peak RSS {r['peak_mb']:,.0f} MB"
              + (f" ({r['note']})" if r["note"] else ""), flush=True)
    seconds, tokens = floor_seconds(rows, args.data_model)
    print(f"  {n:,} rows, floor: {seconds:.1f} s for {tokens:,} tokens", flush=True)
    data.unlink()
    return {"rows": n, "runs": runs, "floor_seconds": seconds, "floor_tokens": tokens}


def print_data_tables(results: list[dict]) -> None:
    print("\n| rows | run | workers | wall s | rows/s | peak RSS MB | rows kept | data-check says |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for res in results:
        for name, r in res["runs"].items():
            kind, workers = name.split()
            print(f"| {res['rows']:,} | {kind} | {workers} | {r['seconds']:.1f} | {res['rows'] / r['seconds']:,.0f} "
                  f"| {r['peak_mb']:,.0f} | {r['rows_kept']} | {r['note'] or '-'} |")
        print(f"| {res['rows']:,} | floor: tokenizer(texts), in-process | - | {res['floor_seconds']:.1f} "
              f"| {res['rows'] / res['floor_seconds']:,.0f} | - | - | {res['floor_tokens']:,} tokens |")
    print()
    for res in results:
        cold, warm = res["runs"]["cold 2"]["seconds"], res["runs"]["warm 2"]["seconds"]
        print(f"{res['rows']:,} rows: cold(2 workers) / floor = {cold / res['floor_seconds']:.2f}x (target <= 1.5); "
              f"warm / cold(2 workers) = {warm / cold:.2f}x (target <= 0.1); "
              f"cold(1) / cold(2) = {res['runs']['cold 1']['seconds'] / cold:.2f}x")
    if len(results) >= 2:
        small, large = results[0], results[-1]
        ratio = large["runs"]["cold 2"]["peak_mb"] / small["runs"]["cold 2"]["peak_mb"]
        print(f"peak RSS, cold 2 workers: {large['rows']:,} rows / {small['rows']:,} rows = {ratio:.2f}x "
              "(target <= 1.25 for 12,000 / 1,200)")
    else:
        print("peak RSS ratio: needs two sizes (--sizes)")


def run_data_bench(args) -> list[dict]:
    source = source_rows(Path(args.source))
    sizes = sorted(args.sizes + ([60000] if args.with_60k else []))
    print(f"data: {len(source)} source rows from {args.source}, resampled to {', '.join(f'{n:,}' for n in sizes)}; "
          f"model {args.data_model} (template auto), cutoff_len {args.data_cutoff}")
    results = []
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in sizes:
            results.append(bench_size(Path(tmp), resample(source, n), args))
    print_data_tables(results)
    return results


def add_data_arguments(parser) -> None:
    group = parser.add_argument_group("data (tools/bench data)")
    group.add_argument("--source", default=str(DEFAULT_SOURCE),
                       help="the demo set: dpo_en_demo.json or its folder (default ../shared/data)")
    group.add_argument("--sizes", type=int, nargs="+", default=[1200, 12000], help="row counts to generate")
    group.add_argument("--with-60k", action="store_true", help="add a 60,000-row size")
    group.add_argument("--data-model", dest="data_model", type=Path, default=TINY_MODEL,
                       help="model directory whose tokenizer data-check uses (default: the committed tiny model)")
    group.add_argument("--data-cutoff", dest="data_cutoff", type=int, default=4096, help="cutoff_len of the data-check")
    group.add_argument("--workdir", default=None, help="where the generated rows and outputs go (default: a temp dir)")
