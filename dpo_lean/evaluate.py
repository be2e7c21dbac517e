"""``dpo-lean evaluate``: score an adapter on cached preference rows with training's own code.

    rows, ref = scoring.split_eval(...)               # val_size rows held out by seed, or eval_dataset + its cache
    policy    = base (4-bit or plain) + the trained adapter (trained_adapter, default output_dir), on the
                starting point's merged adapters      # loaded as training builds it: head deferred, 4-bit pinned
    per batch of per_device_eval_batch_size rows, in order:
        losses, stats = pair_metrics(config, batch_scores(policy, batch), batch)
    metrics   = mean over all rows of every per-row value

Training's evaluation logs the same means over all rows (DPOLeanTrainer keeps per-row values), so
`evaluate` on the trained adapter reproduces the last eval in its log history.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from . import adapters, launch, modeling, scoring
from .config import Config
from .errors import DpoLeanError
from .layout import prefix_sharing
from .logprobs import batch_scores
from .objective import pair_metrics
from .storage import atomic_write_text

RESULTS_NAME = "eval_results.json"
SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
         "logratios/chosen", "logratios/rejected", "logps/chosen", "logps/rejected")


def adapter_path(config: Config) -> str:
    """The trained adapter: trained_adapter, or the one training saved in output_dir (never adapter_name_or_path,
    which names where training started)."""
    adapter = config.trained_adapter or config.output_dir
    if not (Path(adapter) / "adapter_config.json").is_file():
        key = "trained_adapter" if config.trained_adapter else "output_dir"
        raise DpoLeanError(f"config key '{key}': {adapter} holds no adapter (adapter_config.json); "
                           "train first with `dpo-lean train CONFIG.yaml` or set trained_adapter")
    return adapter


def load_policy(config: Config, adapter: str):
    """The base exactly as training loads it, the starting point's merged adapters, and the trained adapter on top,
    ready for batch_logps."""
    model = adapters.apply(modeling.load_base_model(config), adapters.trained_stack(config, adapter), config)
    modeling.defer_output_head(model)
    modeling.keep_4bit_on_training_kernel(model)
    return model


def score(config: Config, model, eval_set: scoring.EvalSet, pad_id: int,
          reward_baseline: float = 0.0) -> dict[str, float]:
    """Means over all rows of the loss, the reward stats and the log-ratios (TRL's names, ``eval_`` prefix);
    for a reference-free loss, ``logratios/*`` are the length-averaged policy log-probs its rewards use."""
    dataset = scoring.to_dataset(eval_set.rows, eval_set.ref)
    dev = modeling.device()
    dtype = modeling.compute_dtype(config, dev)
    collate = scoring.PairCollator(pad_id, prefix_sharing(config, model, dtype), tails=config.ld_alpha is not None)
    per_row: dict[str, list[torch.Tensor]] = {}
    size = config.per_device_eval_batch_size
    for start in range(0, len(dataset), size):
        features = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
        batch = modeling.batch_to(collate(features), dev)
        with modeling.inference(model), modeling.autocast(dtype, dev):
            scores = batch_scores(model, batch, config.logprob_chunk_size, wpo=config.pref_use_weighting)
            losses, stats = pair_metrics(config, scores, batch, bco_baseline=lambda _: reward_baseline)
        stats["loss"] = losses
        for key, values in stats.items():
            per_row.setdefault(key, []).append(values.double().cpu())
    means = {key: torch.cat(values).mean().item() for key, values in per_row.items()}
    for side in ("chosen", "rejected"):
        means[f"logratios/{side}"] = means[f"rewards/{side}"] / config.pref_beta  # mean of pi - ref
    return {f"eval_{key}": means[key] for key in SHOWN}


def eval_rows(config: Config) -> tuple[scoring.EvalSet, int]:
    """(the rows to score, the pad id): eval_dataset with its own cache, or the val_size rows training held out."""
    if config.eval_dataset:  # the training cache is not needed
        tokenizer = modeling.load_tokenizer(config)
        return scoring.load_eval_dataset(config, tokenizer), tokenizer.pad_token_id
    if not config.val_size:
        raise DpoLeanError("config key 'val_size' is 0 and eval_dataset is unset: evaluate needs rows; set val_size "
                           "(rows held out of dataset, as in training) or eval_dataset (then run precompute)")
    tokenizer, data, _, ref = scoring.prepare_run(config)
    return scoring.split_eval(config, tokenizer, data, ref)[1], tokenizer.pad_token_id


def run_evaluate(config: Config) -> dict:
    """Score the adapter, print a table, write <output_dir>/dpo_metrics/eval_results.json."""
    launch.refuse_launcher("evaluate")
    adapter = adapter_path(config)
    eval_set, pad_id = eval_rows(config)
    click.echo(f"evaluate: adapter {adapter} on {len(eval_set.rows)} pairs ({eval_set.source})")
    metrics = score(config, load_policy(config, adapter), eval_set, pad_id, reward_baseline_of(config, adapter))
    click.echo(format_table(metrics))
    results = {**metrics, "rows": len(eval_set.rows), "rows_from": eval_set.source, "adapter": str(adapter),
               "pref_loss": config.pref_loss, "pref_beta": config.pref_beta}
    path = config.metrics_dir / RESULTS_NAME
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    click.echo(f"results: {path}")
    return results


def reward_baseline_of(config: Config, adapter: str) -> float:
    """pref_bco_weight's delta where training left it: a checkpoint's trainer_state.json, or the run's summary.json."""
    if not config.pref_bco_weight:
        return 0.0
    state, summary = Path(adapter) / "trainer_state.json", Path(adapter) / "dpo_metrics" / "summary.json"
    if state.is_file():
        saved = json.loads(state.read_text(encoding="utf-8")).get("stateful_callbacks", {}).get("RewardBaseline")
        if saved:
            return saved["args"]["mean"]
    elif summary.is_file() and "reward_baseline" in (run := json.loads(summary.read_text(encoding="utf-8"))):
        return run["reward_baseline"]["mean"]
    raise DpoLeanError(f"config key 'pref_bco_weight': {adapter} records no reward baseline (the BCO term's delta); "
                       "evaluate an adapter trained with pref_bco_weight > 0, or set pref_bco_weight: 0")


def format_table(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join([f"{'metric':<{width}}  {'value':>10}"]
                     + [f"{key:<{width}}  {value:>10.4f}" for key, value in metrics.items()])
