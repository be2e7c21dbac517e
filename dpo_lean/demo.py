"""``dpo-lean demo``: data-check, precompute and train on a tiny offline model and generated data, on CPU.

The data follows a rule (answer in the case the prompt asks for); held-out reward accuracy starts at
0.5 (policy = reference, every pair a tie) and rises as the policy learns the rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from .config import load_config

DEMO_CONFIG = {
    "stage": "dpo", "finetuning_type": "lora",
    "quantization_bit": 4, "template": "auto", "dataset": "demo_case", "cutoff_len": 128,
    "pref_beta": 0.5, "pref_loss": "sigmoid", "lora_rank": 32, "lora_target": "all",
    "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "gradient_accumulation_steps": 1,
    "learning_rate": 1.5e-3, "num_train_epochs": 3.0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.05,
    "val_size": 200, "eval_on_start": True, "eval_steps": 100, "logging_steps": 10, "save_steps": 250, "seed": 0,
    "overwrite_output_dir": True,  # a rerun of the demo trains afresh rather than resuming the last run's checkpoints
}


def write_demo_config(output: Path, epochs: float | None = None) -> Path:
    from .tiny import write_demo_dataset, write_tiny_model

    model_dir, data_dir = output / "tiny-model", output / "data"
    if not (model_dir / "config.json").is_file():
        click.echo(f"building the tiny offline model in {model_dir}")
        write_tiny_model(model_dir)
    write_demo_dataset(data_dir)
    config = {"model_name_or_path": str(model_dir), "dataset_dir": str(data_dir),
              "output_dir": str(output / "run"), **DEMO_CONFIG}
    if epochs is not None:
        config["num_train_epochs"] = epochs
    path = output / "demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _accuracy_at_ends(history: list[dict]) -> tuple[float | None, float | None]:
    evals = [h["eval_rewards/accuracies"] for h in history if "eval_rewards/accuracies" in h]
    return (evals[0], evals[-1]) if evals else (None, None)


def run_demo(output: str | Path, epochs: float | None = None) -> dict:
    from .data_check import run_data_check
    from .precompute import run_precompute
    from .train import run_train

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config_path = write_demo_config(output, epochs)
    click.echo(f"config: {config_path}\n\n== 1/3 data-check ==")
    config = load_config(config_path)
    run_data_check(config)
    click.echo("\n== 2/3 precompute (the reference runs once) ==")
    run_precompute(config)
    click.echo("\n== 3/3 train (4-bit LoRA policy against the cache) ==")
    run_train(config)
    history = json.loads((config.metrics_dir / "log_history.json").read_text())
    before, after = _accuracy_at_ends(history)
    click.echo(f"\nheld-out reward accuracy: {before:.2f} before training -> {after:.2f} after")
    click.echo(f"curves: {config.metrics_dir / 'training_curves.png'}")
    click.echo(f"adapter: {config.output_dir}   rerun a phase with: dpo-lean train {config_path}")
    return {"before": before, "after": after, "config": str(config_path)}
