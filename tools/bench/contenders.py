"""The contenders, each run inside a worker process (worker.py) on the config suite.dpo_config writes.

train (the reference cache prepared beforehand, not timed): dpo-lean in its layouts, the SFT yardstick, TRL's
DPOTrainer in its two modes. precompute: dpo-lean's pass, TRL's precompute pass, and the bare forward (the floor).
Every one returns a dict of figures; WORKERS names them for the worker.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from bench.patches import instrument_trainer, time_trl_precompute, trace_phases

LORA = {"r": 16, "alpha": 32, "targets": "all-linear"}


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def summarise_steps(record: dict, warmup: int) -> dict:
    secs, toks = record["step_seconds"][warmup:], record["step_tokens"][warmup:]
    return {"step_seconds": statistics.median(secs), "tokens_per_second": sum(toks) / sum(secs),
            "peak_gb": record["peak_gb"], "reserved_gb": record["reserved_gb"], "start_gb": record["start_gb"],
            "steps": len(secs)}


def _config(raw: dict):
    from dpo_lean.config import from_dict

    return from_dict(raw)


# ---------------------------------------------------------------- train contenders


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

    gpu = cuda()
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
    from dpo_lean.families import ATTN_IMPLEMENTATIONS

    config = _config(raw)
    dev = modeling.device()
    dtype = modeling.compute_dtype(config, dev)
    model = AutoModelForCausalLM.from_pretrained(
        raw["model_name_or_path"], dtype=dtype, quantization_config=modeling.quantization_config(config, dtype),
        device_map={"": dev.index} if dev.type == "cuda" else None,
        attn_implementation=ATTN_IMPLEMENTATIONS[config.flash_attn])  # the attention dpo-lean's rows use
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


def dataset_tokens(raw: dict) -> tuple[int, int]:
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
    timing = time_trl_precompute()
    _trl_trainer({**raw, "output_dir": raw["output_dir"] + "-trl"}, precompute=True)
    return {"seconds": timing["seconds"], "tokens": dataset_tokens(raw)[0]}


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
            for positions in part:
                batch_rows = rows.take(positions)
                b = collate_pairs([r.prompt_ids for r in batch_rows], [r.chosen_ids for r in batch_rows],
                                  [r.rejected_ids for r in batch_rows], 0)
                model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev))
                tokens += int(b["attention_mask"].sum())
    return {"seconds": time.perf_counter() - t0, "tokens": tokens}


def traced(train, raw: dict, warmup: int) -> dict:
    """A train contender with its steps' memory noted phase by phase (patches.trace_phases)."""
    trace = trace_phases()
    train(raw, warmup)
    return {"trace": trace}


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
    "phases:dpo-lean": lambda raw, w: traced(train_dpo_lean, raw, w),
    "phases:trl": lambda raw, w: traced(train_trl, raw, w),
}
