"""`dpo-lean sweep`: every combination against one cache, a comparison table and plot, resume where it stopped."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import yaml
from conftest import FIXTURES

from dpo_lean import modeling, train
from dpo_lean.errors import DpoLeanError
from dpo_lean.sweep import parse_sweep, run_folder_name, run_sweep

LOSSES = ["sigmoid", "simpo", "ipo,bco_pair"]  # DPO, a reference-free loss, and a mix (';' separates alternatives)
RUNS = [f"pref_beta={beta}_pref_loss={loss}" for beta in ("0.1", "0.5") for loss in LOSSES]


# ---------------------------------------------------------------- which values are swept


def test_comma_lists_are_swept_except_for_keys_whose_value_is_a_comma_list():
    fixed, axes = parse_sweep(["pref_beta=0.05,0.1,0.3", "pref_loss=sigmoid,ipo", "lora_target=q_proj,v_proj",
                               "dataset=a,b", "learning_rate=1e-4"])
    assert axes == [("pref_beta", ["0.05", "0.1", "0.3"]), ("pref_loss", ["sigmoid", "ipo"])]
    assert fixed == ["lora_target=q_proj,v_proj", "dataset=a,b", "learning_rate=1e-4"]


def test_semicolons_separate_alternatives_for_any_key():
    _, axes = parse_sweep(["lora_target=q_proj,v_proj;all", "pref_beta=0.1;0.2"])
    assert axes == [("lora_target", ["q_proj,v_proj", "all"]), ("pref_beta", ["0.1", "0.2"])]
    assert run_folder_name({"lora_target": "q_proj,v_proj", "dataset": "data/a b.json"}) == \
        "lora_target=q_proj,v_proj_dataset=data-a-b.json"


@pytest.mark.parametrize("overrides, fragments", [
    (["cutoff_len=64,128"], ("'cutoff_len'", "changes the reference cache")),
    (["output_dir=a,b"], ("'output_dir'", "set by the sweep")),
    (["pref_beta=0.1"], ("no key has several values", "pref_beta=0.05,0.1")),
    (["pref_beta=0.1,"], ("pref_beta=0.1,", "empty value")),
    (["pref_btea=0.1,0.2"], ("unknown config key 'pref_btea'", "did you mean 'pref_beta'")),
    (["pref_beta=0.1,0.2", "pref_beta=0.3,0.4"], ("'pref_beta' is listed twice",)),
])
def test_sweep_mistakes_are_one_line_errors(overrides, fragments):
    with pytest.raises(DpoLeanError) as err:
        parse_sweep(overrides)
    assert "\n" not in str(err.value) and all(f in str(err.value) for f in fragments), str(err.value)


def test_a_bad_value_is_refused_before_any_run(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out")}))
    with pytest.raises(DpoLeanError, match="config key 'pref_loss': 'dpo' is not supported"):
        run_sweep(path, ["pref_loss=sigmoid,dpo"])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- a sweep on the fixture data


@pytest.fixture
def sweep_config(tmp_path):
    from make_fixtures import fixture_config

    shutil.copytree(FIXTURES / "demo" / "ref_cache", tmp_path / "ref_cache")
    raw = {**fixture_config(FIXTURES), "output_dir": str(tmp_path / "out"), "ref_cache_dir": str(tmp_path / "ref_cache"),
           "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16, "max_steps": 4, "learning_rate": 5e-3,
           "lora_rank": 8, "logging_steps": 2, "eval_steps": 2, "save_steps": 2, "val_size": 16}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sweep_trains_every_combination_against_one_cache_and_resumes_where_it_stopped(sweep_config, tmp_path,
                                                                                       monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("the sweep ran the reference model")
    monkeypatch.setattr(modeling, "prepare_reference", forbidden)
    overrides = ["pref_beta=0.1,0.5", f"pref_loss={';'.join(LOSSES)}", "lora_target=q_proj,v_proj"]
    result = run_sweep(sweep_config, overrides)
    folder = tmp_path / "out" / "sweep"
    assert result["status"] == dict.fromkeys(RUNS, "trained")
    names = sorted(p.name for p in (tmp_path / "ref_cache").iterdir())
    assert names == sorted([p.name for p in (FIXTURES / "demo" / "ref_cache").iterdir()] + ["_lock"])  # one cache

    rows = list(csv.DictReader((folder / "sweep_results.csv").open()))
    assert [r["run"] for r in rows] == RUNS
    for row in rows:
        summary = json.loads((folder / row["run"] / "dpo_metrics" / "summary.json").read_text())
        assert summary["config"]["ref_cache_dir"] == str(tmp_path / "ref_cache")
        assert summary["config"]["lora_target"] == "q_proj,v_proj"  # a comma value given once is not split
        assert (row["pref_beta"], row["pref_loss"]) == (str(summary["config"]["pref_beta"]), summary["config"]["pref_loss"])
        assert float(row["eval_rewards/accuracies"]) == summary["final_eval"]["rewards/accuracies"]
        assert float(row["eval_loss"]) == summary["final_eval"]["loss"]
        assert float(row["train_loss"]) == summary["train_loss"] and float(row["runtime_seconds"]) > 0
        assert not (folder / row["run"] / "ref_cache").exists()
    assert len({row["eval_loss"] for row in rows}) == len(RUNS)  # six different objectives
    markdown = (folder / "sweep_results.md").read_text().splitlines()
    assert markdown[0] == "| pref_beta | pref_loss | eval_rewards/accuracies | eval_rewards/margins | eval_loss | " \
                          "train_loss | runtime_seconds |" and len(markdown) == 2 + 6
    assert [line.split(" | ")[:2] for line in markdown[2:]] == [[f"| {b}", loss] for b in ("0.1", "0.5") for loss in LOSSES]
    assert (folder / "sweep_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Interrupt one run between its checkpoints; the rerun skips the others and resumes it from checkpoint-2.
    interrupted = folder / RUNS[3]
    (interrupted / "dpo_metrics" / "summary.json").unlink()
    shutil.rmtree(interrupted / "checkpoint-4")
    seen = []
    real_run_train = train.run_train
    monkeypatch.setattr(train, "run_train", lambda c: seen.append(c.resume_from_checkpoint) or real_run_train(c))
    again = run_sweep(sweep_config, overrides)
    assert again["status"] == {**dict.fromkeys(RUNS, "skipped"), RUNS[3]: "resumed"} and seen == [True]
    summary = json.loads((interrupted / "dpo_metrics" / "summary.json").read_text())
    assert summary["finished"] is True and summary["global_step"] == 4


def test_sweep_under_a_launcher_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DpoLeanError, match="sweep runs in one process; run `dpo-lean sweep CONFIG.yaml ...` without"):
        run_sweep(tmp_path / "cfg.yaml", ["pref_beta=0.1,0.2"])
