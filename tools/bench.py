"""Benchmark: peak memory and speed of the precompute pass, each contender in its own fresh process.

    python tools/bench.py precompute [--vocab 32000 151936] [--rows 16] [--cutoff 1024] [--batch 2]

Models are built offline: Qwen2 architecture, hidden 256, 4 layers, NF4 4-bit, with the vocabulary
sizes given (the tiny tokenizer's ids are a subset). Rows come from ../shared/data/dpo_en_demo.json
when present (long multi-turn chats), else generated ones of several hundred tokens.

Contenders (one fresh process each, same rows, batch and cap):
  dpo-lean   `run_precompute`: chunked log-probs at completion positions only
  full-logits  the usual way: model(input_ids).logits -> log_softmax -> gather, under no_grad
Peak memory is the process's peak RSS on CPU (CUDA peak allocated on a GPU).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DEMO = ROOT.parent / "shared" / "data" / "dpo_en_demo.json"


def build_model(directory: Path, vocab: int) -> Path:
    from dpo_lean.tiny import build_model, build_tokenizer

    if not (directory / "config.json").exists():
        tokenizer = build_tokenizer()
        build_model(vocab, hidden_size=256, num_layers=4, seed=0).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def write_rows(path: Path, n: int) -> str:
    """A ShareGPT file of n rows: the shared demo's first rows, or generated long ones."""
    if SHARED_DEMO.exists():
        rows = json.loads(SHARED_DEMO.read_text())[:n]
    else:
        from dpo_lean.tiny import WORDS
        rng = random.Random(0)
        text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
        rows = [{"conversations": [{"from": "human", "value": text(300)}], "chosen": {"from": "gpt", "value": text(250)},
                 "rejected": {"from": "gpt", "value": text(200)}} for _ in range(n)]
    path.write_text(json.dumps(rows))
    return str(path)


def worker_config(args, model: str, data: str, out: Path) -> dict:
    return {"model_name_or_path": model, "dataset": data, "quantization_bit": 4, "cutoff_len": args.cutoff,
            "precompute_ref_batch_size": args.batch, "output_dir": str(out), "ref_cache_dir": str(out / "cache"),
            "template": "chatml"}


def run_dpo_lean(raw: dict) -> dict:
    from dpo_lean.config import from_dict
    from dpo_lean.precompute import run_precompute

    summary = run_precompute(from_dict(raw))
    return {"seconds": summary["seconds"], "tokens": summary["tokens"]}


def run_full_logits(raw: dict) -> dict:
    import torch

    from dpo_lean import modeling
    from dpo_lean.config import from_dict
    from dpo_lean.data.collate import collate_pairs
    from dpo_lean.data.pipeline import prepare_data
    from dpo_lean.precompute import plan_parts

    config = from_dict(raw)
    rows = prepare_data(config, modeling.load_tokenizer(config)).rows
    model = modeling.load_base_model(config, reference=True)  # same 4-bit model, head not deferred
    tokens, t0 = 0, time.perf_counter()
    with modeling.inference(model):
        for part in plan_parts(rows, config.precompute_ref_batch_size, 10**9):
            for batch_rows in part:
                b = collate_pairs([r.prompt_ids for r in batch_rows], [r.chosen_ids for r in batch_rows],
                                  [r.rejected_ids for r in batch_rows], 0)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                logp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(2, b["input_ids"][:, 1:, None]).squeeze(2)
                (logp * b["completion_mask"][:, 1:]).sum(1)
                tokens += int(b["attention_mask"].sum())
    return {"seconds": time.perf_counter() - t0, "tokens": tokens}


WORKERS = {"dpo-lean": run_dpo_lean, "full-logits": run_full_logits}


def worker(name: str, raw: dict) -> None:
    """Runs in a fresh process; prints one JSON line with the figures."""
    from dpo_lean.measure import peak_memory_gb

    result = WORKERS[name](raw)
    result["peak_gb"] = peak_memory_gb()
    print("RESULT " + json.dumps(result))


def spawn(name: str, raw: dict) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'tools')!r}); import bench; "
            f"bench.worker({name!r}, json.loads(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(raw)], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def precompute(args) -> None:
    rows_note = "dpo_en_demo.json" if SHARED_DEMO.exists() else "generated"
    print(f"precompute: {args.rows} rows ({rows_note}), cutoff {args.cutoff}, batch {args.batch} pairs, NF4, hidden 256, 4 layers")
    print(f"{'vocab':>8} {'contender':<12} {'peak GB':>8} {'tokens/s':>10} {'full logits of a batch, GB':>28}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_rows(tmp / "rows.json", args.rows)
        peaks = {}
        for vocab in args.vocab:
            model = str(build_model(tmp / f"model-{vocab}", vocab))
            logits_gb = 2 * args.batch * args.cutoff * vocab * 4 / 1e9
            for name in WORKERS:
                raw = worker_config(args, model, data, tmp / f"out-{vocab}-{name}")
                r = spawn(name, raw)
                peaks[(vocab, name)] = r["peak_gb"]
                print(f"{vocab:>8} {name:<12} {r['peak_gb']:>8.2f} {r['tokens'] / r['seconds']:>10,.0f} {logits_gb:>28.2f}")
        if len(args.vocab) == 2:
            lo, hi = sorted(args.vocab)
            for name in WORKERS:
                print(f"{name}: peak rises {peaks[(hi, name)] - peaks[(lo, name)]:+.2f} GB from vocab {lo} to {hi}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("precompute", help="precompute pass: dpo-lean vs full logits, per vocabulary size")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--cutoff", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    {"precompute": precompute}[args.command](args)


if __name__ == "__main__":
    main()
