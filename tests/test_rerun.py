"""Running `dpo-lean train CONFIG.yaml` again: a plain rerun resumes from the newest complete checkpoint (as
LLaMA-Factory 0.9.5 does), overwrite_output_dir: true starts over, each said in one line; and what the first run
printed where its output is not a terminal (a log file): its plan, one line per log step, each evaluation once."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import FIXTURES

from dpo_lean import faults
from dpo_lean.cli import main

RUN = dict(per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=6, learning_rate=5e-3,
           pref_beta=0.5, lora_rank=4, logging_steps=2, save_steps=3, val_size=8, eval_steps=3,
           lr_scheduler_type="linear")


def _train(config: Path, *overrides: str):
    return CliRunner().invoke(main, ["train", str(config), *overrides], catch_exceptions=False)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A first run of 6 steps (checkpoints at 3 and 6, evaluations at 3 and 6), through the command line."""
    import shutil

    from make_fixtures import fixture_config

    tmp = tmp_path_factory.mktemp("rerun")
    shutil.copytree(FIXTURES / "demo" / "ref_cache", tmp / "ref_cache")
    raw = {**fixture_config(FIXTURES), **RUN, "output_dir": str(tmp / "out"), "ref_cache_dir": str(tmp / "ref_cache")}
    config = tmp / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = _train(config)
    assert result.exit_code == 0, result.output
    return config, tmp / "out", result


def test_the_first_run_says_its_plan_then_one_line_per_log_step(first):
    _, _, result = first
    lines = result.stdout.splitlines()
    assert ("training: 6 optimizer steps (0.429 epochs of 14), 4 pairs per step (4 per device x 1 accumulation x 1 "
            "process)") in result.stdout
    steps = [line.split(" | ")[0] for line in lines if re.match(r"(eval at )?step \d+/\d+", line)]
    assert steps == ["step 1/6", "step 2/6", "eval at step 3/6", "step 4/6", "step 6/6", "eval at step 6/6"]
    assert all("elapsed, ETA" in line for line in lines if re.match(r"step \d+/", line))
    assert "{'loss'" not in result.output and "Flattening" not in result.output and "\r" not in result.output


def test_the_final_evaluation_is_logged_and_written_once(first):
    _, out, _ = first
    with open(out / "dpo_metrics" / "training_metrics.csv") as f:
        evals = [row["step"] for row in csv.DictReader(f) if row["split"] == "eval"]
    assert evals == ["3", "6"]
    summary = json.loads((out / "dpo_metrics" / "summary.json").read_text())
    assert summary["final_eval"]["step"] == 6


def test_a_plain_rerun_resumes_from_the_newest_checkpoint_and_says_so(first):
    config, out, _ = first
    result = _train(config, "max_steps=8")
    assert result.exit_code == 0, result.output
    assert (f"resuming from {out / 'checkpoint-6'} (step 6 of 6, a finished run), the newest complete checkpoint in "
            f"{out}; set overwrite_output_dir: true to start over instead") in result.stdout
    history = json.loads((out / "dpo_metrics" / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 4, 6, 8]  # the first run's steps, then 7-8


def test_overwrite_output_dir_starts_over_without_the_earlier_checkpoints(first):
    config, out, _ = first
    before = sorted(p.name for p in faults.checkpoints(out))
    result = _train(config, "overwrite_output_dir=true", "max_steps=2", "val_size=0", "save_steps=2")
    assert result.exit_code == 0, result.output
    assert (f"overwrite_output_dir: true: training starts from step 0 in {out}; removing the earlier run's "
            f"{', '.join(reversed(before))}") in result.stdout
    assert [p.name for p in faults.checkpoints(out)] == ["checkpoint-2"]
    history = json.loads((out / "dpo_metrics" / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2]


def test_an_adapter_without_a_checkpoint_is_not_trained_over(first, tmp_path):
    import shutil

    config, out, _ = first
    finished = tmp_path / "finished"
    finished.mkdir()
    shutil.copy(out / "adapter_model.safetensors", finished)
    result = CliRunner().invoke(main, ["train", str(config), f"output_dir={finished}"])
    assert result.exit_code == 1
    assert (f"Error: output_dir {finished} already holds a trained adapter (adapter_model.safetensors) and no checkpoint "
            "to resume from; set overwrite_output_dir: true to train over it, or choose another output_dir"
            ) == result.stderr.strip()
