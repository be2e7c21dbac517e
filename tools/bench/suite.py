"""`train` and `precompute`: every contender on the offline models (or --model), the same rows, and their tables."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

from bench.contenders import LORA, cuda, dataset_tokens
from bench.tables import print_table, ratio, reserved_column
from bench.worker import spawn

ROOT = Path(__file__).resolve().parents[2]
SHARED_DEMO = ROOT.parent / "shared" / "data" / "dpo_en_demo.json"
TRAIN_CONTENDERS = ("dpo-lean", "dpo-lean+shared", "dpo-lean+auto", "dpo-lean+groups", "sft", "trl", "trl+precompute")
PRECOMPUTE_CONTENDERS = ("dpo-lean", "dpo-lean+shared", "dpo-lean+auto", "trl", "bare-forward")


def build_model(directory: Path, vocab: int, hidden: int = 256, layers: int = 4) -> str:
    from dpo_lean.tiny import build_model, build_tokenizer

    if not (directory / "config.json").exists():
        tokenizer = build_tokenizer()
        build_model(vocab, hidden_size=hidden, num_layers=layers, seed=0).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return str(directory)


def write_rows(path: Path, n: int, multi_turn: bool = False) -> str:
    """A ShareGPT file: the shared demo's first n rows (with ``multi_turn``, the first n whose prompt has a
    history: 3 or more turns), or n generated rows of several hundred tokens."""
    if SHARED_DEMO.exists():
        rows = [r for r in json.loads(SHARED_DEMO.read_text()) if not multi_turn or len(r["conversations"]) >= 3][:n]
    else:
        from dpo_lean.tiny import WORDS

        rng = random.Random(0)
        text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
        rows = [{"conversations": [{"from": "human", "value": text(rng.randint(100, 400))}],
                 "chosen": {"from": "gpt", "value": text(rng.randint(50, 250))},
                 "rejected": {"from": "gpt", "value": text(rng.randint(50, 250))}} for _ in range(n)]
    path.write_text(json.dumps(rows))
    return str(path)


def dpo_config(args, model: str, data: str, out: Path) -> dict:
    """The dpo-lean config every contender mirrors (TRL's keep_start truncation, so all see the same rows)."""
    gpu = cuda()
    return {"model_name_or_path": model, "dataset": data, "template": "auto", "cutoff_len": args.cutoff,
            "truncation_mode": args.truncation, "quantization_bit": 4, "bf16": gpu,
            "lora_rank": LORA["r"], "lora_alpha": LORA["alpha"], "lora_target": "all",
            "per_device_train_batch_size": args.batch, "precompute_ref_batch_size": args.batch,
            "max_steps": args.warmup + args.steps, "learning_rate": 1e-5, "logging_steps": 1000,
            "save_strategy": "no", "group_by_length": False, "prefix_sharing": False, "plot_loss": False, "seed": 0,
            "output_dir": str(out), "ref_cache_dir": str(out.parent / "ref_cache")}


def run_train_bench(args, tmp: Path, model: str, data: str, label: str) -> dict:
    raw = dpo_config(args, model, data, tmp / label / "run")
    cache = spawn("precompute:dpo-lean", raw, 0)  # the cache is prepared beforehand and not timed
    if "error" in cache:
        raise SystemExit(f"precompute for the train benchmark failed: {cache['error']}")
    results = {name: spawn(f"train:{name}", {**raw, "output_dir": str(tmp / label / name)}, args.warmup)
               for name in args.train_contenders}
    base = results["dpo-lean"]
    two, shared = dataset_tokens(raw)
    print(f"\ntokens of the {args.rows} pairs: {two:,} as two sequences per pair, {shared:,} as one shared sequence "
          f"per pair ({shared / two:.2f}; the prompt is {2 * (two - shared) / two:.0%} of the two-sequence tokens)")
    rows = []
    reserved_header, reserved = reserved_column(results)
    for name, r in results.items():
        if "error" in r:
            rows.append((name, "failed: " + r["error"], *[""] * (5 + len(reserved_header))))
            continue
        rows.append((name, f"{r['peak_gb']:.2f}", *reserved(r), f"{r['step_seconds']:.3f}",
                     f"{r['tokens_per_second']:,.0f}", ratio(r["peak_gb"], base.get("peak_gb")),
                     ratio(r["step_seconds"], base.get("step_seconds")),
                     ratio(r["tokens_per_second"], base.get("tokens_per_second"))))
    print_table(f"train, {label}: peak memory and median step time ({args.steps} steps after {args.warmup} warm-up)",
                 rows, ("contender", "peak GB", *reserved_header, "step s", "tokens/s", "peak / dpo-lean",
                        "step / dpo-lean", "tokens/s / dpo-lean"))
    return results


def run_precompute_bench(args, tmp: Path, model: str, data: str, label: str) -> dict:
    raw = dpo_config(args, model, data, tmp / label / "pre")
    passes = {name: [] for name in PRECOMPUTE_CONTENDERS}
    for _ in range(args.passes):  # round-robin, so a slow spell of a shared machine hits every contender alike
        for name in PRECOMPUTE_CONTENDERS:
            passes[name].append(spawn(f"precompute:{name}",
                                      {**raw, "ref_cache_dir": str(tmp / label / f"cache-{name}")}, 0))
    results = {name: _median_pass(runs) for name, runs in passes.items()}
    base = results["dpo-lean"]
    rows = []
    reserved_header, reserved = reserved_column(results)
    for name, r in results.items():
        if "error" in r:
            rows.append((name, "failed: " + r["error"], *[""] * (3 + len(reserved_header))))
            continue
        tps = r["tokens"] / r["seconds"]
        rows.append((name, f"{r['peak_gb']:.2f}", *reserved(r), f"{tps:,.0f}", ratio(r["peak_gb"], base.get("peak_gb")),
                     ratio(base["tokens"] / base["seconds"], tps)))
    print_table(f"precompute, {label}: peak memory and median tokens/s of {args.passes} passes", rows,
                 ("contender", "peak GB", *reserved_header, "tokens/s", "peak / dpo-lean", "dpo-lean tokens/s / this"))
    return results


def _median_pass(runs: list[dict]) -> dict:
    """One precompute contender over its passes (each in a fresh process): median time, highest peak."""
    ok = [r for r in runs if "error" not in r]
    if len(ok) < len(runs):
        return next(r for r in runs if "error" in r)
    reserved = [r["reserved_gb"] for r in ok if r.get("reserved_gb") is not None]
    return {"seconds": statistics.median(r["seconds"] for r in ok), "tokens": ok[0]["tokens"],
            "peak_gb": max(r["peak_gb"] for r in ok), "reserved_gb": max(reserved) if reserved else None}
