"""Benchmark dpo-lean against single-model SFT and TRL's DPOTrainer: peak memory, step time, tokens/s.

    python tools/bench.py train       [--vocab 32000 151936] [--rows 24] [--cutoff 512] [--batch 2]
    python tools/bench.py precompute  [--vocab 32000 151936] [--rows 24] [--cutoff 512] [--batch 2]
    python tools/bench.py all         # both tables
    python tools/bench.py data        [--sizes 1200 12000] [--with-60k] [--source ../shared/data]   (bench_data.py)
    python tools/bench.py real-shapes [--shapes Qwen2.5-0.5B Qwen2.5-1.5B] [--shape-steps 2]  (bench_shapes.py)
    python tools/bench.py all --real-shapes   # both tables, then the real-shape rows
    python tools/bench.py train --model Qwen/Qwen2.5-0.5B-Instruct   # any hub or local model (on a GPU)

Every contender runs in its own fresh process on the same model, the same rows, batch size, sequence cap,
LoRA settings and quantisation. Default models are built offline: Qwen2 architecture, hidden 256, 4 layers,
NF4 4-bit, with the vocabulary sizes given (the tiny tokenizer's ids are a subset of it). Rows are the first
rows of ../shared/data/dpo_en_demo.json (long multi-turn chats) where present, else generated ones.

train (cache prepared beforehand, not timed):
  dpo-lean          `dpo-lean train` against the cache, two sequences per pair; the same batches as the others
  dpo-lean+shared   the same with prefix sharing on every batch: one [prompt | chosen | rejected] sequence per pair
  dpo-lean+auto     prefix_sharing: auto, the default: the shared layout on the batches where it saves FLOPs
  dpo-lean+groups   `dpo-lean train` with its defaults: prefix_sharing auto and length-grouped batches
  sft               the same model and LoRA, ordinary transformers causal-LM loss on the same chosen and
                    rejected sequences (the single-model SFT yardstick)
  trl               TRL DPOTrainer as QLoRA users run it: PEFT adapter, no ref_model (reference = adapter off)
  trl+precompute    the same with precompute_ref_log_probs=True (precompute not timed)
precompute:
  dpo-lean          `dpo-lean precompute` (the pass, after loading), two sequences per pair
  dpo-lean+shared   the same with prefix sharing on every batch
  dpo-lean+auto     prefix_sharing: auto (the default)
  trl               TRL's precompute_ref_log_probs pass
  bare-forward      a plain no-grad forward (model(input_ids), full logits) over the same batches: the floor
Peak memory: peak RSS of the process on CPU (CUDA peak allocated on a GPU), measured from the start of
training (train) or over the whole process after imports (precompute). Step time: median after warm-up.
Precompute tokens/s: the median of --passes passes, each in a fresh process, contenders taking turns.

Prefix sharing pays where the layers are most of the work and prompts are long; for that shape:
    python tools/bench.py train --vocab 8192 --hidden 1024 --layers 8 --truncation keep_end --cutoff 1024 \
        --rows 16 --multi-turn --only dpo-lean dpo-lean+shared
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench_data  # noqa: E402  (tools/ is not a package)
import bench_shapes  # noqa: E402

SHARED_DEMO = ROOT.parent / "shared" / "data" / "dpo_en_demo.json"
TRAIN_CONTENDERS = ("dpo-lean", "dpo-lean+shared", "dpo-lean+auto", "dpo-lean+groups", "sft", "trl", "trl+precompute")
PRECOMPUTE_CONTENDERS = ("dpo-lean", "dpo-lean+shared", "dpo-lean+auto", "trl", "bare-forward")
LORA = {"r": 16, "alpha": 32, "targets": "all-linear"}

# ---------------------------------------------------------------- setup (parent process)


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
    gpu = _cuda()
    return {"model_name_or_path": model, "dataset": data, "template": "auto", "cutoff_len": args.cutoff,
            "truncation_mode": args.truncation, "quantization_bit": 4, "bf16": gpu,
            "lora_rank": LORA["r"], "lora_alpha": LORA["alpha"], "lora_target": "all",
            "per_device_train_batch_size": args.batch, "precompute_ref_batch_size": args.batch,
            "max_steps": args.warmup + args.steps, "learning_rate": 1e-5, "logging_steps": 1000,
            "save_strategy": "no", "group_by_length": False, "prefix_sharing": False, "plot_loss": False, "seed": 0,
            "output_dir": str(out), "ref_cache_dir": str(out.parent / "ref_cache")}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- measurement inside a worker


def reset_peak() -> None:
    """Start peak-memory measurement afresh: CUDA peak stats, or the kernel's VmHWM (Linux clear_refs)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak then covers the whole process


def _proc_status_gb(field: str) -> float | None:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak) in GB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def current_gb() -> float | None:
    """Memory in use now: CUDA allocated, or the process's RSS (VmRSS)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 1e9
    return _proc_status_gb("VmRSS")


def read_peak_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    peak = _proc_status_gb("VmHWM")
    if peak is not None:
        return peak
    from dpo_lean.measure import peak_memory_gb

    return peak_memory_gb()


def instrument_trainer(sequential: bool) -> dict:
    """Time every optimizer step and count its tokens in any transformers Trainer (TRL's included).

    ``sequential`` makes every contender see the rows in file order, so all run the same batches.
    """
    import torch
    import transformers

    record = {"step_seconds": [], "step_tokens": [], "peak_gb": None, "start_gb": None}
    tokens = [0]

    class StepTimer(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            reset_peak()
            record["start_gb"] = current_gb()

        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0, tokens[0] = time.perf_counter(), 0

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            record["step_seconds"].append(time.perf_counter() - self.t0)
            record["step_tokens"].append(tokens[0])

        def on_train_end(self, args, state, control, **kw):
            record["peak_gb"] = read_peak_gb()

    init, step = transformers.Trainer.__init__, transformers.Trainer.training_step

    def patched_init(self, *a, **kw):
        init(self, *a, **kw)
        self.add_callback(StepTimer())

    def patched_step(self, model, inputs, *a, **kw):
        # prompt + chosen and prompt + rejected per pair, in every contender and layout
        tokens[0] += inputs["num_tokens"] if "num_tokens" in inputs else int(inputs["attention_mask"].sum())
        return step(self, model, inputs, *a, **kw)

    transformers.Trainer.__init__, transformers.Trainer.training_step = patched_init, patched_step
    if sequential:
        transformers.Trainer._get_train_sampler = lambda self, ds=None: torch.utils.data.SequentialSampler(
            ds if ds is not None else self.train_dataset)
    return record


def summarise_steps(record: dict, warmup: int) -> dict:
    secs, toks = record["step_seconds"][warmup:], record["step_tokens"][warmup:]
    return {"step_seconds": statistics.median(secs), "tokens_per_second": sum(toks) / sum(secs),
            "peak_gb": record["peak_gb"], "start_gb": record["start_gb"], "steps": len(secs)}


# ---------------------------------------------------------------- train contenders


def _config(raw: dict):
    from dpo_lean.config import from_dict

    return from_dict(raw)


def train_dpo_lean(raw: dict, warmup: int, sharing: bool | str = False, grouped: bool = False) -> dict:
    from dpo_lean.train import run_train

    record = instrument_trainer(sequential=not grouped)
    run_train(_config({**raw, "group_by_length": grouped, "prefix_sharing": sharing}))
    return summarise_steps(record, warmup)


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"], lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")


def _training_args(raw: dict, cls=None, **extra):
    from transformers import TrainingArguments

    gpu = _cuda()
    return (cls or TrainingArguments)(
        output_dir=raw["output_dir"], per_device_train_batch_size=raw["per_device_train_batch_size"],
        max_steps=raw["max_steps"], learning_rate=raw["learning_rate"], logging_steps=1000, save_strategy="no",
        report_to="none", use_cpu=not gpu, bf16=gpu, seed=0, activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False,
        disable_tqdm=True, **extra)


def train_sft(raw: dict, warmup: int) -> dict:
    """Causal-LM loss (full logits) on prompt+chosen and prompt+rejected, completion tokens labelled."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer

    from dpo_lean import modeling
    from dpo_lean.data.pipeline import prepare_data
    from dpo_lean.layout import collate_pairs

    record = instrument_trainer(sequential=True)
    config = _config(raw)
    tokenizer = modeling.load_tokenizer(config)
    rows = prepare_data(config, tokenizer).rows
    data = Dataset.from_dict({"p": [r.prompt_ids for r in rows], "c": [r.chosen_ids for r in rows],
                              "r": [r.rejected_ids for r in rows]})

    def collate(features):
        batch = collate_pairs([f["p"] for f in features], [f["c"] for f in features], [f["r"] for f in features],
                              tokenizer.pad_token_id)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}

    base = modeling.load_base_model(config)  # the same NF4 base, dropout off, compute dtype kept
    modeling.enable_checkpointing(base)
    torch.manual_seed(0)
    model = get_peft_model(base, _lora_config())
    Trainer(model=model, args=_training_args(raw), train_dataset=data, data_collator=collate).train()
    return summarise_steps(record, warmup)


def _trl_rows(raw: dict) -> list[dict]:
    """The same rows in TRL's conversational layout (token ids equal dpo-lean's: tests/test_trl_parity.py)."""
    from dpo_lean.data.sources import load_records

    return [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
            for r in load_records(raw["dataset"]).records]


def _trl_trainer(raw: dict, precompute: bool):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dpo_lean import modeling

    config = _config(raw)
    dev = modeling.device()
    dtype = modeling.compute_dtype(config, dev)
    model = AutoModelForCausalLM.from_pretrained(
        raw["model_name_or_path"], dtype=dtype, quantization_config=modeling.quantization_config(config, dtype),
        device_map={"": dev.index} if dev.type == "cuda" else None)
    if precompute and dev.type == "cpu":
        # TRL's precompute pass runs the 4-bit model in eval mode without gradients; on an x86 CPU bitsandbytes
        # then repacks the weights for good and training fails. dpo-lean's guard keeps TRL trainable here.
        modeling.keep_4bit_on_training_kernel(model)
    tokenizer = AutoTokenizer.from_pretrained(raw["model_name_or_path"])
    args = _training_args(raw, DPOConfig, beta=0.1, loss_type=["sigmoid"], max_length=raw["cutoff_len"],
                          truncation_mode="keep_start", precompute_ref_log_probs=precompute,
                          precompute_ref_batch_size=raw["precompute_ref_batch_size"])
    torch.manual_seed(0)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(_trl_rows(raw)),
                      processing_class=tokenizer, peft_config=_lora_config())


def train_trl(raw: dict, warmup: int, precompute: bool = False) -> dict:
    record = instrument_trainer(sequential=True)
    _trl_trainer(raw, precompute).train()
    return summarise_steps(record, warmup)


# ---------------------------------------------------------------- precompute contenders


def _dataset_tokens(raw: dict) -> int:
    """Real (non-padding) tokens of the pass: prompt + chosen and prompt + rejected for every row."""
    return _token_split(raw)[0]


def _token_split(raw: dict) -> tuple[int, int]:
    """(tokens as two sequences per pair, tokens as one shared [prompt | chosen | rejected] sequence)."""
    from dpo_lean import modeling
    from dpo_lean.data.pipeline import prepare_data

    config = _config(raw)
    rows = prepare_data(config, modeling.load_tokenizer(config)).rows
    two = sum(2 * len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in rows)
    return two, two - sum(len(r.prompt_ids) for r in rows)


def precompute_dpo_lean(raw: dict, sharing: bool | str = False) -> dict:
    from dpo_lean.precompute import run_precompute

    cache_dir = Path(raw["ref_cache_dir"])
    shutil.rmtree(cache_dir, ignore_errors=True)  # a complete cache would be reused, and this pass is timed
    summary = run_precompute(_config({**raw, "prefix_sharing": sharing}))
    return {"seconds": summary["seconds"], "tokens": summary["tokens"]}


def precompute_trl(raw: dict) -> dict:
    from trl import DPOTrainer

    timing = {}
    original = DPOTrainer._precompute_ref_logps

    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        out = original(self, *a, **kw)
        timing["seconds"] = time.perf_counter() - t0
        return out

    DPOTrainer._precompute_ref_logps = timed
    _trl_trainer({**raw, "output_dir": raw["output_dir"] + "-trl"}, precompute=True)
    return {"seconds": timing["seconds"], "tokens": _dataset_tokens(raw)}


def precompute_bare(raw: dict) -> dict:
    from dpo_lean import modeling
    from dpo_lean.data.pipeline import prepare_data
    from dpo_lean.layout import collate_pairs
    from dpo_lean.precompute import plan_parts

    config = _config(raw)
    rows = prepare_data(config, modeling.load_tokenizer(config)).rows
    model = modeling.load_base_model(config, reference=True)  # the same NF4 model, ordinary head
    dev, tokens = modeling.device(), 0
    t0 = time.perf_counter()
    with modeling.inference(model), modeling.autocast(modeling.compute_dtype(config, dev), dev):
        for part in plan_parts(rows, config.precompute_ref_batch_size, 10**9):
            for batch_rows in part:
                b = collate_pairs([r.prompt_ids for r in batch_rows], [r.chosen_ids for r in batch_rows],
                                  [r.rejected_ids for r in batch_rows], 0)
                model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev))
                tokens += int(b["attention_mask"].sum())
    return {"seconds": time.perf_counter() - t0, "tokens": tokens}


WORKERS = {
    "train:dpo-lean": lambda raw, w: train_dpo_lean(raw, w),
    "train:dpo-lean+shared": lambda raw, w: train_dpo_lean(raw, w, sharing=True),
    "train:dpo-lean+auto": lambda raw, w: train_dpo_lean(raw, w, sharing="auto"),
    "train:dpo-lean+groups": lambda raw, w: train_dpo_lean(raw, w, sharing="auto", grouped=True),
    "train:sft": train_sft,
    "train:trl": lambda raw, w: train_trl(raw, w),
    "train:trl+precompute": lambda raw, w: train_trl(raw, w, precompute=True),
    "precompute:dpo-lean": lambda raw, _: precompute_dpo_lean(raw),
    "precompute:dpo-lean+shared": lambda raw, _: precompute_dpo_lean(raw, sharing=True),
    "precompute:dpo-lean+auto": lambda raw, _: precompute_dpo_lean(raw, sharing="auto"),
    "precompute:trl": lambda raw, _: precompute_trl(raw),
    "precompute:bare-forward": lambda raw, _: precompute_bare(raw),
}


def worker(name: str, raw: dict, warmup: int) -> None:
    """Runs in a fresh process; prints one RESULT line of JSON."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ["TQDM_DISABLE"] = "1"
    result = WORKERS[name](raw, warmup)
    if result.get("peak_gb") is None:
        result["peak_gb"] = read_peak_gb()
    print("RESULT " + json.dumps(result), flush=True)


def spawn(name: str, raw: dict, warmup: int) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'tools')!r}); import bench; "
            f"bench.worker({name!r}, json.loads(sys.argv[1]), {warmup})")
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(raw)], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1][7:])


# ---------------------------------------------------------------- tables


def _machine() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name}, {os.cpu_count()} cores, torch {torch.__version__}"


def _print_table(title: str, rows: list[tuple], header: tuple) -> None:
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def run_train_bench(args, tmp: Path, model: str, data: str, label: str) -> dict:
    raw = dpo_config(args, model, data, tmp / label / "run")
    cache = spawn("precompute:dpo-lean", raw, 0)  # the cache is prepared beforehand and not timed
    if "error" in cache:
        raise SystemExit(f"precompute for the train benchmark failed: {cache['error']}")
    results = {name: spawn(f"train:{name}", {**raw, "output_dir": str(tmp / label / name)}, args.warmup)
               for name in args.train_contenders}
    base = results["dpo-lean"]
    two, shared = _token_split(raw)
    print(f"\ntokens of the {args.rows} pairs: {two:,} as two sequences per pair, {shared:,} as one shared sequence "
          f"per pair ({shared / two:.2f}; the prompt is {2 * (two - shared) / two:.0%} of the two-sequence tokens)")
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append((name, "failed: " + r["error"], "", "", "", "", ""))
            continue
        rows.append((name, f"{r['peak_gb']:.2f}", f"{r['step_seconds']:.3f}", f"{r['tokens_per_second']:,.0f}",
                     _ratio(r["peak_gb"], base.get("peak_gb")), _ratio(r["step_seconds"], base.get("step_seconds")),
                     _ratio(r["tokens_per_second"], base.get("tokens_per_second"))))
    _print_table(f"train, {label}: peak memory and median step time ({args.steps} steps after {args.warmup} warm-up)",
                 rows, ("contender", "peak GB", "step s", "tokens/s", "peak / dpo-lean", "step / dpo-lean",
                        "tokens/s / dpo-lean"))
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
    for name, r in results.items():
        if "error" in r:
            rows.append((name, "failed: " + r["error"], "", "", ""))
            continue
        tps = r["tokens"] / r["seconds"]
        rows.append((name, f"{r['peak_gb']:.2f}", f"{tps:,.0f}", _ratio(r["peak_gb"], base.get("peak_gb")),
                     _ratio(base["tokens"] / base["seconds"], tps)))
    _print_table(f"precompute, {label}: peak memory and median tokens/s of {args.passes} passes", rows,
                 ("contender", "peak GB", "tokens/s", "peak / dpo-lean", "dpo-lean tokens/s / this"))
    return results


def _median_pass(runs: list[dict]) -> dict:
    """One precompute contender over its passes (each in a fresh process): median time, highest peak."""
    ok = [r for r in runs if "error" not in r]
    if len(ok) < len(runs):
        return next(r for r in runs if "error" in r)
    return {"seconds": statistics.median(r["seconds"] for r in ok), "tokens": ok[0]["tokens"],
            "peak_gb": max(r["peak_gb"] for r in ok)}


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("train", "precompute", "all", "data", "real-shapes"))
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 32000])
    parser.add_argument("--model", help="a hub id or local directory instead of the offline models (use a GPU)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the offline model")
    parser.add_argument("--layers", type=int, default=4, help="layers of the offline model")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--multi-turn", action="store_true", help="only rows whose prompt has a history")
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="preference pairs per step")
    parser.add_argument("--truncation", choices=("keep_start", "keep_end"), default="keep_start",
                        help="keep_start is TRL's (needed for the TRL rows); keep_end keeps long prompts")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3, help="precompute passes per contender, each a fresh process (median)")
    parser.add_argument("--only", nargs="+", choices=TRAIN_CONTENDERS, default=list(TRAIN_CONTENDERS),
                        dest="train_contenders", help="train contenders to run (dpo-lean always runs)")
    parser.add_argument("--json", help="also write all figures to this file")
    bench_data.add_data_arguments(parser)
    bench_shapes.add_shape_arguments(parser)
    args = parser.parse_args()
    if args.command in ("data", "real-shapes"):
        print(f"machine: {_machine()}")
        run = bench_data.run_data_bench if args.command == "data" else bench_shapes.run_real_shapes
        figures = run(args)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
        return
    if "dpo-lean" not in args.train_contenders:
        args.train_contenders.insert(0, "dpo-lean")
    print(f"machine: {_machine()}")
    print(f"rows: {args.rows} ({'multi-turn ' if args.multi_turn else ''}"
          f"{'dpo_en_demo.json' if SHARED_DEMO.exists() else 'generated'}), "
          f"cap {args.cutoff} tokens ({args.truncation}), batch {args.batch} pairs, NF4 base, "
          f"LoRA r={LORA['r']} on all linear layers" + ("" if args.model else
                                                       f", offline Qwen2 hidden {args.hidden}, {args.layers} layers"))
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_rows(tmp / "rows.json", args.rows, args.multi_turn)
        models = ([(args.model, args.model)] if args.model else
                  [(f"vocab {v:,}", build_model(tmp / f"model-{v}", v, args.hidden, args.layers)) for v in args.vocab])
        for label, model in models:
            if args.command in ("train", "all"):
                figures[f"train {label}"] = run_train_bench(args, tmp, model, data, label)
            if args.command in ("precompute", "all"):
                figures[f"precompute {label}"] = run_precompute_bench(args, tmp, model, data, label)
    if args.command == "all" and args.real_shapes:
        figures["real shapes"] = bench_shapes.run_real_shapes(args)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
