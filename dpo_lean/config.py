"""The one typed config: YAML + ``key=value`` overrides, validated once.

Keys follow LLaMA-Factory's names where one exists, so a LLaMA-Factory DPO YAML loads as it is.
Nothing else in dpo-lean reads the raw YAML; everything reads a :class:`Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import config_values, lr_schedule
from .config_values import shown
from .errors import DpoLeanError
from .loss_catalog import F_DIVERGENCE_LOSSES, F_DIVERGENCES, PREF_LOSSES, check_loss_keys, needs_reference, parse_losses

TRUNCATION_MODES = ("keep_end", "keep_start", "llamafactory")
REF_PRECISIONS = ("base", "bf16", "fp16", "fp32")
ATTN_CHOICES = ("auto", "disabled", "sdpa", "fa2", "eager")
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
    "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay",
)


def _key(default, help: str, *, group: str, choices=None, min=None, max=None, min_exclusive=False,
         max_exclusive=False, lf: str | None = "honoured", comma_list: bool = False):
    """A config key: default, one-line meaning, and the rules its value must satisfy.

    ``lf``: what the LLaMA-Factory key of this name does here: "honoured" (LF's meaning), "no effect" (accepted,
    means nothing here), or None for a key of dpo-lean's own. ``comma_list``: the value itself is a
    comma-separated list (so `dpo-lean sweep` does not split it on commas).
    """
    meta = dict(help=help, group=group, choices=choices, min=min, max=max, min_exclusive=min_exclusive,
                max_exclusive=max_exclusive, lf=lf, comma_list=comma_list)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # --- model ---
    model_name_or_path: str | None = _key(None, "Hub id or local directory of the base model.", group="model")
    adapter_name_or_path: str | None = _key(None, "The adapter the run starts from, as in LLaMA-Factory (e.g. your SFT LoRA): training continues it and the reference is base + it. A comma list is merged into the base in order and the last one continued. In a config without dataset (LF's export configs): the adapters `export` merges.", group="model", comma_list=True)
    model_revision: str = _key("main", "Hub revision (branch, tag or commit) of the model.", group="model")
    cache_dir: str | None = _key(None, "Where the Hugging Face hub cache keeps downloaded models (as in LLaMA-Factory).", group="model")
    trust_remote_code: bool = _key(False, "Allow model code from the hub repository to run. Off by default.", group="model")
    flash_attn: str = _key("auto", "Attention kernel: auto, sdpa, eager (or disabled), fa2.", group="model", choices=ATTN_CHOICES)
    quantization_bit: int | None = _key(None, "4 = bitsandbytes NF4 base (QLoRA); unset = the plain compute dtype.", group="model", choices=(None, 4))
    quantization_method: str = _key("bnb", "Quantisation library: bnb (bitsandbytes) only.", group="model", choices=("bnb",))
    quantization_type: str = _key("nf4", "4-bit data type for bitsandbytes.", group="model", choices=("nf4", "fp4"))
    double_quantization: bool = _key(True, "Quantise the 4-bit quantisation constants too (saves ~0.4 bit/param).", group="model")
    disable_gradient_checkpointing: bool = _key(False, "Turn off gradient checkpointing (faster, much more activation memory).", group="model")
    use_safetensors_only: bool = _key(True, "Refuse pickle-based weight files (.bin); set false only for weights you trust.", group="model", lf=None)

    # --- reference (precompute loads it; train never does) ---
    ref_precision: str = _key("base", "Reference precision: base = loaded as the policy's starting point is (same quantisation and dtype; step-0 loss is ln 2); bf16/fp16/fp32 = unquantised, in that dtype.", group="reference", choices=REF_PRECISIONS, lf=None)
    ref_model: str | None = _key(None, "Another reference model instead of the starting point (hub id or folder with the same tokenizer vocabulary), loaded unquantised unless ref_model_quantization_bit. E.g. the bare base, as LF's reference is.", group="reference")
    ref_model_adapters: str | None = _key(None, "Adapters on ref_model, merged in order (a 4-bit ref_model takes one, unmerged). Needs ref_model.", group="reference", comma_list=True)
    ref_model_quantization_bit: int | None = _key(None, "4 = load ref_model in NF4 (quantization_type, double_quantization); unset = unquantised, as in LF. Needs ref_model.", group="reference", choices=(None, 4))

    # --- method ---
    stage: str = _key("dpo", "Training stage; dpo-lean does DPO only.", group="method", choices=("dpo",))
    finetuning_type: str = _key("lora", "Fine-tuning type; dpo-lean trains LoRA adapters only.", group="method", choices=("lora",))
    do_train: bool = _key(True, "No effect: `dpo-lean train` always trains.", group="method", lf="no effect")
    pref_beta: float = _key(0.1, "DPO beta: strength of the pull towards the reference.", group="method", min=0.0, min_exclusive=True)
    pref_loss: str = _key("sigmoid", "Preference loss (LLaMA-Factory's and TRL's names), or a comma list mixed by pref_loss_weights: " + ", ".join(PREF_LOSSES) + ". orpo and simpo (alone or with sft) need no reference cache.", group="method")
    pref_loss_weights: str | None = _key(None, "Comma list of weights, one per pref_loss entry (TRL's loss_weights; MPO: pref_loss=sigmoid,bco_pair,sft with 0.8,0.2,1.0); default 1 each.", group="method", comma_list=True, lf=None)
    pref_ftx: float = _key(0.0, "Weight of an SFT term (mean NLL per token of the chosen completion, per pair, as LLaMA-Factory) added to the loss.", group="method", min=0.0)
    dpo_label_smoothing: float = _key(0.0, "Label smoothing eps: conservative DPO on sigmoid (LLaMA-Factory's meaning; TRL's sigmoid ignores it), TRL's label_smoothing for robust, exo_pair (needs > 0), aot and aot_unpaired.", group="method", min=0.0, max=0.5, max_exclusive=True)
    simpo_gamma: float = _key(0.5, "SimPO's target reward margin gamma (simpo only).", group="method", min=0.0)
    pref_bco_weight: float = _key(0.0, "LLaMA-Factory's BCO mix: loss = (loss + w bco) / (1 + w), the BCO term against the running mean of the batch rewards.", group="method", min=0.0)
    ld_alpha: float | None = _key(None, "LD-DPO alpha: weight of each completion's tokens past the pair's shorter completion, in policy and reference log-probs (TRL's ld_alpha); unset = 1.", group="method", min=0.0, max=1.0)
    pref_f_divergence: str = _key("reverse_kl", "f-DPO divergence (TRL's f_divergence_type): reverse_kl (DPO), forward_kl, js_divergence, alpha_divergence; other than reverse_kl only with " + ", ".join(sorted(F_DIVERGENCE_LOSSES)) + ".", group="method", choices=F_DIVERGENCES, lf=None)
    pref_f_alpha_divergence_coef: float = _key(0.5, "alpha of pref_f_divergence: alpha_divergence (TRL's f_alpha_divergence_coef).", group="method", lf=None)
    pref_discopop_tau: float = _key(0.05, "DiscoPOP's temperature tau (discopop only; TRL's discopop_tau).", group="method", min=0.0, min_exclusive=True, lf=None)
    pref_use_weighting: bool = _key(False, "WPO: weight each pair's loss by the policy's length-normalised probability of both completions (TRL's use_weighting); one more no-grad pass of the output head.", group="method", lf=None)
    lora_rank: int = _key(8, "LoRA rank r.", group="method", min=1)
    lora_alpha: int | None = _key(None, "LoRA alpha; default 2 x lora_rank.", group="method", min=1)
    lora_dropout: float = _key(0.0, "Dropout on the LoRA input.", group="method", min=0.0, max=1.0)
    prefix_sharing: bool | str = _key("auto", "Compute the prompt once for chosen and rejected (one sequence per pair, 4-D mask): auto = on the batches where it saves FLOPs, if the model takes the mask; true = every batch; false = never. Every way gives the same log-probs.", group="method", choices=("auto", True, False), lf=None)
    lora_target: str = _key("all", "Modules that get LoRA: all (every linear layer except the output head) or a comma-separated list of names.", group="method", comma_list=True)
    create_new_adapter: bool = _key(False, "With adapter_name_or_path: merge all of it into the (unquantised) base and train a new LoRA (lora_rank, lora_target) on top, instead of continuing the last adapter.", group="method")

    # --- data ---
    dataset: str | None = _key(None, "Comma-separated files (json, jsonl, parquet, csv) or names from dataset_dir/dataset_info.json.", group="data", comma_list=True)
    dataset_dir: str = _key("data", "Folder holding dataset_info.json and the files it names.", group="data")
    eval_dataset: str | None = _key(None, "Evaluation datasets (same syntax as dataset), instead of val_size; precompute caches their reference log-probs in eval_ref_cache_dir.", group="data", comma_list=True)
    template: str | None = _key("auto", "Chat template: auto or null (the tokenizer's own), plain (prompt + completion + EOS), or any LLaMA-Factory 0.9.5 template name (qwen, qwen3, llama3, mistral, gemma, ...), token for token as LLaMA-Factory.", group="data")
    enable_thinking: bool | None = _key(True, "Reasoning templates (qwen3, deepseekr1, ...): true adds an empty thought to a completion without one (trained on); false drops thoughts and puts the empty thought in the prompt (as LLaMA-Factory).", group="data")
    preserve_thinking: bool = _key(False, "Reasoning templates: keep the thoughts of earlier assistant turns in the prompt (as LLaMA-Factory).", group="data")
    default_system: str | None = _key(None, "LLaMA-Factory templates: the system prompt used when a row has none, instead of the template's own.", group="data")
    cutoff_len: int = _key(2048, "Most tokens of prompt + completion, for chosen and for rejected.", group="data", min=2)
    truncation_mode: str = _key("keep_end", "keep_end: cut the prompt's start and the completions' end; keep_start: keep the prompt whole, cut completions' end, skip rows whose prompt fills cutoff_len; llamafactory: LLaMA-Factory's cut (prompt and completions keep their starts, cutoff_len split by their lengths).", group="data", choices=TRUNCATION_MODES, lf=None)
    max_samples: int | None = _key(None, "Use at most this many rows of each dataset (the first ones).", group="data", min=1)
    val_size: float = _key(0.0, "Held-out share of the rows (< 1) or row count (>= 1) for evaluation.", group="data", min=0.0)
    strict: bool = _key(False, "Turn any skipped row into an error.", group="data", lf=None)
    preprocessing_num_workers: int | None = _key(None, "Processes that tokenise the dataset into its prepared data (LF's datasets.map num_proc); null or 1 = this process; more than the machine's CPUs runs as many as it has. Later commands reuse the prepared data.", group="data", min=1)

    # --- reference cache ---
    ref_cache_dir: str | None = _key(None, "Reference log-prob cache directory; default <output_dir>/ref_cache. (LLaMA-Factory's cache_dir is the hub cache, so this key has its own name.)", group="cache", lf=None)
    prepared_dir: str | None = _key(None, "Where the tokenised dataset (prepared data, docs/data.md) is kept and reused by every command; default <output_dir>/prepared. A sweep's runs share their base's.", group="cache", lf=None)
    eval_ref_cache_dir: str | None = _key(None, "Reference log-prob cache of eval_dataset; default <ref_cache_dir>_eval (a sibling folder, so each cache stays one Parquet table).", group="cache", lf=None)
    overwrite_cache: bool = _key(False, "precompute: replace an existing cache whose fingerprint differs; every command: tokenise again instead of reusing the prepared data (as LF re-tokenises instead of reusing its cache).", group="cache")
    precompute_ref_batch_size: int = _key(8, "Rows per batch in precompute (each row is a chosen and a rejected sequence).", group="cache", min=1, lf=None)
    cache_part_rows: int = _key(512, "Rows per Parquet part; a crash loses at most one part of work.", group="cache", min=1, lf=None)
    num_shards: int = _key(1, "precompute: split the rows into this many shards (auto under torchrun/accelerate).", group="cache", min=1, lf=None)
    shard_index: int = _key(0, "precompute: which shard this process computes.", group="cache", min=0, lf=None)
    logprob_chunk_size: int | None = _key(None, "Completion positions per chunk of logits; default keeps one chunk near 128 MB of float32.", group="cache", min=1, lf=None)

    # --- training ---
    output_dir: str = _key("output", "Where the adapter, checkpoints and dpo_metrics/ go.", group="train")
    overwrite_output_dir: bool = _key(False, "train: start from step 0, removing output_dir's earlier checkpoints; by default a rerun resumes from the newest complete checkpoint in output_dir (as LLaMA-Factory).", group="train")
    per_device_train_batch_size: int = _key(1, "Preference pairs per device per step.", group="train", min=1)
    per_device_eval_batch_size: int = _key(1, "Preference pairs per device per eval step.", group="train", min=1)
    gradient_accumulation_steps: int = _key(1, "Micro-batches per optimizer step.", group="train", min=1)
    num_train_epochs: float = _key(3.0, "Epochs over the training rows.", group="train", min=0.0, min_exclusive=True)
    max_steps: int = _key(-1, "Stop after this many optimizer steps (overrides num_train_epochs when > 0).", group="train", min=-1)
    learning_rate: float = _key(5.0e-6, "Peak learning rate.", group="train", min=0.0, min_exclusive=True)
    lr_scheduler_type: str = _key("cosine", "Learning-rate schedule (transformers' names).", group="train", choices=SCHEDULERS)
    lr_scheduler_kwargs: dict | None = _key(None, "The schedule's own arguments, as in LLaMA-Factory (a mapping, or a JSON string): cosine_with_min_lr needs min_lr or min_lr_rate ({min_lr_rate: 0.1}); warmup_stable_decay takes num_decay_steps and num_stable_steps (default: a third of the steps after warmup stable, the rest decaying, as LLaMA-Factory), warmup_type, decay_type, min_lr_ratio; cosine num_cycles; polynomial lr_end, power; inverse_sqrt timescale; reduce_lr_on_plateau factor, patience, ... Checked when the config loads.", group="train", comma_list=True)
    warmup_ratio: float = _key(0.0, "Share of the optimizer steps for linear warmup, rounded up (1.0 = the whole run).", group="train", min=0.0, max=1.0)
    warmup_steps: int = _key(0, "Warmup steps (overrides warmup_ratio when > 0).", group="train", min=0)
    weight_decay: float = _key(0.0, "AdamW weight decay.", group="train", min=0.0)
    max_grad_norm: float = _key(1.0, "Gradient clipping norm (0 = off).", group="train", min=0.0)
    optim: str = _key("adamw_torch", "Optimizer (transformers' names): adamw_torch, paged_adamw_8bit, adamw_bnb_8bit, ...", group="train")
    adam_beta1: float = _key(0.9, "AdamW beta1.", group="train", min=0.0, max=1.0)
    adam_beta2: float = _key(0.999, "AdamW beta2.", group="train", min=0.0, max=1.0)
    adam_epsilon: float = _key(1e-8, "AdamW epsilon.", group="train", min=0.0, min_exclusive=True)
    bf16: bool = _key(False, "bfloat16 compute on GPU (CPU always computes in float32).", group="train")
    fp16: bool = _key(False, "float16 compute on GPU.", group="train")
    seed: int = _key(42, "Seed for LoRA init, shuffling and dropout.", group="train")
    group_by_length: bool = _key(True, "Batch pairs of similar length together (order still random, seeded).", group="train", lf=None)
    logging_steps: int = _key(10, "Log metrics every this many optimizer steps.", group="train", min=1)
    save_steps: int = _key(500, "Save a checkpoint every this many steps.", group="train", min=1)
    save_strategy: str = _key("steps", "When to save checkpoints.", group="train", choices=("no", "steps", "epoch"))
    save_total_limit: int | None = _key(None, "Keep at most this many checkpoints.", group="train", min=1)
    save_only_model: bool = _key(False, "Checkpoints without optimizer/scheduler state (cannot resume exactly).", group="train")
    eval_strategy: str | None = _key(None, "no, steps or epoch; default steps when there are held-out rows.", group="train", choices=(None, "no", "steps", "epoch"))
    eval_steps: int | None = _key(None, "Evaluate every this many steps; default logging_steps.", group="train", min=1)
    eval_on_start: bool = _key(False, "Evaluate once before the first step (the reference's own scores: loss ln 2).", group="train")
    resume_from_checkpoint: bool | str | None = _key(None, "null = the newest complete checkpoint in output_dir if there is one (unless overwrite_output_dir); true = it, which must exist; a checkpoint folder; false = start from step 0.", group="train")
    report_to: str = _key("none", "none, tensorboard or wandb (comma-separated for several).", group="train", comma_list=True)
    run_name: str | None = _key(None, "Run name for the trackers.", group="train")
    dataloader_num_workers: int = _key(0, "Data-loading worker processes.", group="train", min=0)
    ddp_timeout: int = _key(1800, "Seconds a distributed process waits for the others.", group="train", min=1)
    deepspeed: str | None = _key(None, "DeepSpeed config file, as in transformers.", group="train")
    fsdp: bool | str | None = _key(None, "Shard the model, its LoRA and optimizer state over the processes of a torchrun/accelerate launch (FSDP2 through accelerate, as transformers' fsdp): true, or transformers' words full_shard, shard_grad_op, offload, auto_wrap. accelerate launch with an FSDP config file does the same.", group="train")
    fsdp_config: dict | str | None = _key(None, "transformers' fsdp_config (a mapping, or a JSON file): reshard_after_forward, cpu_offload, state_dict_type, auto_wrap_policy, transformer_layer_cls_to_wrap, min_num_params, cpu_ram_efficient_loading, activation_checkpointing, version (2). Needs fsdp.", group="train")
    skip_nonfinite_steps: bool = _key(False, "Skip (and count) an optimizer step whose loss or gradients are NaN/inf, instead of stopping with the step and its rows.", group="train", lf=None)
    disable_tqdm: bool | None = _key(False, "train: true = no progress bar, one line per log step instead (as where the output is not a terminal, e.g. a log file); false or null = a bar in a terminal.", group="train")
    plot_loss: bool = _key(True, "Write dpo_metrics/training_curves.png.", group="train")

    # --- evaluate and export ---
    trained_adapter: str | None = _key(None, "The trained adapter `evaluate` scores and `export` merges (e.g. a checkpoint-* folder); default output_dir. It sits on the starting point: base + the adapters adapter_name_or_path merged into it.", group="evaluate/export", lf=None)
    export_dir: str | None = _key(None, "Where `dpo-lean export` writes the merged model; default <output_dir>/merged.", group="evaluate/export")
    export_size: int = _key(5, "Largest weight file (shard) of the exported model, in GB.", group="evaluate/export", min=1)
    infer_dtype: str = _key("auto", "dtype of the model `export` writes: auto = bfloat16 with bf16, float16 with fp16, else the model's own (its config.json's dtype), as LLaMA-Factory's export; or float16, bfloat16, float32.", group="evaluate/export", choices=("auto", "float16", "bfloat16", "float32"))

    # ------------------------------------------------------------------
    @property
    def resolved_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    @property
    def resolved_ref_cache_dir(self) -> Path:
        return Path(self.ref_cache_dir) if self.ref_cache_dir else Path(self.output_dir) / "ref_cache"

    @property
    def resolved_prepared_dir(self) -> Path:
        return Path(self.prepared_dir) if self.prepared_dir else Path(self.output_dir) / "prepared"

    @property
    def resolved_eval_ref_cache_dir(self) -> Path:
        if self.eval_ref_cache_dir:
            return Path(self.eval_ref_cache_dir)
        ref = self.resolved_ref_cache_dir
        return ref.with_name(ref.name + "_eval")

    def eval_set_config(self) -> Config:
        """This config with eval_dataset as its dataset and the eval cache as its reference cache.

        precompute builds the eval set's cache with it and train/evaluate read that cache with it, so the
        fingerprint rules are the training cache's. Its skip report goes to <output_dir>/eval/dpo_metrics.
        """
        return dataclasses.replace(self, dataset=self.eval_dataset, eval_dataset=None, val_size=0.0,
                                   ref_cache_dir=str(self.resolved_eval_ref_cache_dir),
                                   prepared_dir=str(self.resolved_prepared_dir),
                                   output_dir=str(Path(self.output_dir) / "eval"))

    def cache_configs(self) -> list[Config]:
        """One config per reference cache this run reads: the dataset's, and eval_dataset's if set."""
        return [self, self.eval_set_config()] if self.eval_dataset else [self]

    @property
    def has_eval(self) -> bool:
        """Are there rows to evaluate on: eval_dataset, or rows held out by val_size?"""
        return bool(self.eval_dataset or self.val_size)

    @property
    def pref_losses(self) -> list[str]:
        return parse_losses(self.pref_loss)

    @property
    def pref_loss_weight_values(self) -> list[float] | None:
        if self.pref_loss_weights is None:
            return None
        try:
            weights = [float(w) for w in self.pref_loss_weights.split(",")]
        except ValueError:
            raise DpoLeanError(f"config key 'pref_loss_weights': {shown(self.pref_loss_weights)} must be numbers "
                               "separated by commas (0.8,0.2,1.0)") from None
        if not all(math.isfinite(w) for w in weights):
            raise DpoLeanError(f"config key 'pref_loss_weights': {shown(self.pref_loss_weights)} must be finite")
        return weights

    @property
    def needs_reference(self) -> bool:
        """False for orpo or simpo, alone or with sft (policy-only losses): no reference cache then."""
        return needs_reference(self.pref_losses)

    @property
    def metrics_dir(self) -> Path:
        return Path(self.output_dir) / "dpo_metrics"

    @property
    def lora_target_modules(self) -> str | list[str]:
        """"all" for every linear layer but the output head (PEFT's all-linear), else the listed names."""
        names = [n.strip() for n in self.lora_target.split(",") if n.strip()]
        return "all-linear" if names in (["all"], []) else names

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def allowed_types(name: str) -> tuple[type, ...]:
    """The types a key's value may have (its annotation's union members)."""
    return config_values.types_of(_HINTS[name])


def _coerce(name: str, value: Any) -> Any:
    return config_values.coerce(name, value, allowed_types(name), FIELDS[name].metadata)


def unknown_key_error(name: str) -> DpoLeanError:
    close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; `dpo-lean keys` lists the valid keys"
    return DpoLeanError(f"unknown config key '{name}'{hint}")


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (so numbers, booleans and null have their types)."""
    if "=" not in text:
        raise DpoLeanError(f"override {shown(text)} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an integer of over 4300 digits
        value = raw
    return key, value


def from_dict(raw: dict[str, Any]) -> Config:
    """Validate a mapping of keys to values into a Config (unknown keys, types, ranges, cross-key rules)."""
    from . import lf_keys

    values = {}
    for name, value in raw.items():
        if isinstance(name, str) and name not in FIELDS and lf_keys.check(name, value):
            continue  # an LLaMA-Factory key that means nothing here, or asks for what dpo-lean does anyway
        if not isinstance(name, str) or name not in FIELDS:  # YAML keys may be numbers, dates, null
            raise unknown_key_error(str(name))
        value = _coerce(name, value)
        if name == "template" and value is None:
            value = "auto"  # LLaMA-Factory's way of saying "the tokenizer's own template"
        config_values.check_rules(name, value, FIELDS[name].metadata)
        values[name] = value
    config = Config(**values)
    _check_cross_rules(config)
    return config


def _check_cross_rules(c: Config) -> None:
    if c.bf16 and c.fp16:
        raise DpoLeanError("config keys 'bf16' and 'fp16' are both true; set at most one")
    if c.shard_index >= c.num_shards:
        raise DpoLeanError(f"config key 'shard_index': {c.shard_index} must be < num_shards ({c.num_shards})")
    if c.eval_dataset and c.val_size:
        raise DpoLeanError("config keys 'val_size' and 'eval_dataset' are both set; evaluate on one of them "
                           "(val_size holds rows out of dataset, eval_dataset names other rows)")
    check_loss_keys(c)
    for name in ("ref_model_adapters", "ref_model_quantization_bit"):
        if getattr(c, name) is not None and not c.ref_model:
            raise DpoLeanError(f"config key '{name}' needs ref_model (the model it applies to; it may be "
                               "model_name_or_path itself)")
    if c.ref_model_quantization_bit and c.ref_precision != "base":
        raise DpoLeanError(f"config keys 'ref_model_quantization_bit' and 'ref_precision' ({c.ref_precision}) "
                           "disagree; a 4-bit ref_model computes in the base's dtype: set one of them")
    if c.fsdp_config is not None and c.fsdp in (None, False, ""):
        raise DpoLeanError("config key 'fsdp_config' needs fsdp: true (transformers reads it only then); under "
                           "accelerate launch the fsdp_* keys of its config file apply instead")
    if c.create_new_adapter and not c.adapter_name_or_path:
        raise DpoLeanError("config key 'create_new_adapter': true needs adapter_name_or_path (the adapters to "
                           "merge into the base before the new LoRA)")
    _check_template(c)
    _check_schedule(c)
    for t in (x.strip() for x in c.report_to.split(",")):
        if t not in ("none", "tensorboard", "wandb", "all", ""):
            raise DpoLeanError(f"config key 'report_to': {shown(t)} is not supported; choose none, tensorboard or wandb")


def _check_schedule(c: Config) -> None:
    """lr_scheduler_kwargs checked against lr_scheduler_type (and kept with typed values); warmup and evaluation
    where the schedule needs or ignores them."""
    c.lr_scheduler_kwargs = lr_schedule.check(c.lr_scheduler_type, c.lr_scheduler_kwargs, c.learning_rate) or None
    if c.lr_scheduler_type in lr_schedule.NO_WARMUP and (c.warmup_steps or c.warmup_ratio):
        key = "warmup_steps" if c.warmup_steps else "warmup_ratio"
        fix = "constant_with_warmup" if c.lr_scheduler_type == "constant" else "another schedule"
        raise DpoLeanError(f"config key '{key}': lr_scheduler_type {c.lr_scheduler_type} has no warmup; set {key} to 0 "
                           f"or use {fix}")
    if c.lr_scheduler_type == "reduce_lr_on_plateau" and (not (c.val_size or c.eval_dataset) or c.eval_strategy == "no"):
        raise DpoLeanError("config key 'lr_scheduler_type': reduce_lr_on_plateau lowers the learning rate when eval_loss "
                           "stops improving; it needs evaluation: set val_size or eval_dataset (and eval_strategy not no)")


def _check_template(c: Config) -> None:
    from .data.templates import JINJA_TEMPLATES, check_template_name

    check_template_name(c.template)
    lf_only = {"enable_thinking": True, "preserve_thinking": False, "default_system": None}
    for key, default in lf_only.items():
        if c.template in JINJA_TEMPLATES and getattr(c, key) != default:
            raise DpoLeanError(f"config key '{key}' works with LLaMA-Factory templates; with template: {c.template} "
                               "the chat template decides; set template to the model's LLaMA-Factory name, or drop the key")


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read CONFIG.yaml (safe loader), apply ``key=value`` overrides on top, validate."""
    raw = read_config_file(path) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        raw[key] = value
    return from_dict(raw)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """CONFIG.yaml's mapping of key: value, as written (not validated); a one-line error if it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise DpoLeanError(f"config file {str(p)!r} not found")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise DpoLeanError(f"config file {str(p)!r}{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise DpoLeanError(f"config file {str(p)!r}: not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise DpoLeanError(f"config file {str(p)!r}: cannot be read ({e.strerror or e}); check its permissions") from None
    except RecursionError:
        raise DpoLeanError(f"config file {str(p)!r}: nested too deeply to read; a config is a flat mapping of key: value") from None
    except ValueError as e:  # e.g. an integer of over 4300 digits
        raise DpoLeanError(f"config file {str(p)!r}: a value cannot be read ({str(e).splitlines()[0]}); fix it") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise DpoLeanError(f"config file {str(p)!r} must be a mapping of key: value")
    return loaded


def require(config: Config, *names: str) -> None:
    """Raise a one-line error if any of the named keys is unset."""
    for name in names:
        if getattr(config, name) in (None, ""):
            raise DpoLeanError(f"config key '{name}' is required: {FIELDS[name].metadata['help']}")
