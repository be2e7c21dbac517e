"""`dpo-lean evaluate`: it reproduces training's logged evals; eval_dataset gets its own cache from precompute."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner
from conftest import FIXTURES

from dpo_lean import scoring, train
from dpo_lean.cli import main
from dpo_lean.config import from_dict
from dpo_lean.errors import DpoLeanError
from dpo_lean.evaluate import run_evaluate

# 48 train / 16 held-out pairs; eval batches of 6 leave a short last batch (6 + 6 + 4), where averaging
# per batch and per row differ: training's eval and `evaluate` must both average over rows.
SHORT = dict(per_device_train_batch_size=4, per_device_eval_batch_size=6, max_steps=8, learning_rate=5e-3,
             pref_beta=0.5, lora_rank=8, logging_steps=4, save_steps=4, eval_steps=4, val_size=16,
             lr_scheduler_type="linear")
COMPARED = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
            "eval_rewards/rejected", "eval_logps/chosen", "eval_logps/rejected")


def fixture_raw(tmp_path, **overrides) -> dict:
    from make_fixtures import fixture_config

    cache = tmp_path / "ref_cache"
    if not cache.exists():
        shutil.copytree(FIXTURES / "demo" / "ref_cache", cache)
    return {**fixture_config(FIXTURES), "output_dir": str(tmp_path / "out"), "ref_cache_dir": str(cache), **overrides}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = from_dict(fixture_raw(tmp_path_factory.mktemp("eval"), **SHORT))
    train.run_train(config)
    history = json.loads((config.metrics_dir / "log_history.json").read_text())
    return config, [h for h in history if "eval_loss" in h]


def assert_same_eval(results: dict, logged: dict) -> None:
    for key in COMPARED:
        assert results[key] == pytest.approx(logged[key], abs=1e-4), key


def test_evaluate_gives_the_held_out_scores_training_logged_last(trained):
    config, evals = trained
    results = run_evaluate(config)
    assert results["rows"] == 16 and results["rows_from"] == "val_size=16 of demo_case"
    assert_same_eval(results, evals[-1])
    assert abs(results["eval_rewards/margins"]) > 1e-3  # a trained adapter, not the step-0 policy (= reference)
    assert results["eval_logratios/chosen"] == pytest.approx(results["eval_rewards/chosen"] / 0.5, abs=1e-6)
    on_disk = json.loads((config.metrics_dir / "eval_results.json").read_text())
    assert on_disk["eval_loss"] == results["eval_loss"] and on_disk["adapter"] == config.output_dir


def test_trained_adapter_scores_a_checkpoint_like_its_logged_eval(trained):
    config, evals = trained
    at_step_4 = next(e for e in evals if e["step"] == 4)
    checkpoint = f"{config.output_dir}/checkpoint-4"
    results = run_evaluate(from_dict({**config.to_dict(), "trained_adapter": checkpoint}))
    assert_same_eval(results, at_step_4)
    assert results["adapter"] == checkpoint


def test_evaluate_equals_a_float64_computation_of_the_sigmoid_loss(trained):
    """Independent expected values: the trained adapter merged into a float64 copy of the dequantised base, plain
    forwards, the cached reference values read from Parquet, and the DPO formula written out in float64."""
    import math

    import pandas as pd
    from float64_reference import completion_logp, float64_model

    from dpo_lean import modeling
    from dpo_lean.evaluate import eval_rows

    config, evals = trained
    results = run_evaluate(config)
    eval_set, _ = eval_rows(config)
    plain = float64_model(modeling.load_base_model(config), config.model_name_or_path, adapter=config.output_dir)
    ref = pd.read_parquet(config.resolved_ref_cache_dir).set_index("row_index")
    beta, losses, chosen, rejected, wins = config.pref_beta, [], [], [], []
    for row in eval_set.rows:
        r_c = beta * (completion_logp(plain, row.prompt_ids, row.chosen_ids) - ref.loc[row.row_index, "ref_chosen_logps"])
        r_r = beta * (completion_logp(plain, row.prompt_ids, row.rejected_ids) - ref.loc[row.row_index, "ref_rejected_logps"])
        losses.append(math.log1p(math.exp(-(r_c - r_r))))  # -log sigmoid(margin)
        chosen.append(r_c), rejected.append(r_r), wins.append(float(r_c > r_r))
    n = len(eval_set.rows)
    assert n == 16 and config.pref_loss == "sigmoid"
    assert results["eval_loss"] == pytest.approx(sum(losses) / n, abs=1e-4)
    assert results["eval_rewards/chosen"] == pytest.approx(sum(chosen) / n, abs=1e-4)
    assert results["eval_rewards/rejected"] == pytest.approx(sum(rejected) / n, abs=1e-4)
    assert results["eval_rewards/accuracies"] == sum(wins) / n
    assert abs(sum(losses) / n - math.log(2)) > 1e-2  # a trained adapter, not the reference


def test_the_cli_prints_a_table(trained, tmp_path):
    config, _ = trained
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    result = CliRunner().invoke(main, ["evaluate", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "rewards/accuracies" in result.output and "eval_results.json" in result.output


def test_eval_dataset_gets_its_own_cache_from_precompute_and_train_evaluates_on_it(tmp_path):
    rows = json.loads((FIXTURES / "demo" / "demo_case.json").read_text())[:12]
    (tmp_path / "held_out.json").write_text(json.dumps(rows))
    raw = fixture_raw(tmp_path, eval_dataset=str(tmp_path / "held_out.json"), max_steps=2, save_strategy="no",
                      per_device_train_batch_size=4, per_device_eval_batch_size=8, eval_steps=2)
    config = from_dict(raw)
    with pytest.raises(DpoLeanError, match=r"no reference cache at .*ref_cache_eval; run `dpo-lean precompute"):
        scoring.prepare_run(config)  # train reads both caches: a missing one is refused before anything is tokenised

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["precompute", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    eval_cache = tmp_path / "ref_cache_eval"
    manifest = json.loads((eval_cache / "_manifest.json").read_text())
    assert manifest["expected_rows"] == 12 and len(list(eval_cache.glob("part-*.parquet"))) == 1
    assert not list((tmp_path / "ref_cache").glob("*eval*"))  # the training cache stays one table

    train.run_train(config)
    summary = json.loads((config.metrics_dir / "summary.json").read_text())
    assert summary["rows"] == {"train": 64, "eval": 12, "skipped": 0}
    assert summary["eval_cache_fingerprint"]["dataset"]["rows"] == 12
    shutil.rmtree(tmp_path / "ref_cache")  # evaluating on eval_dataset needs its cache only
    results = run_evaluate(config)
    assert results["rows"] == 12 and results["rows_from"].startswith("eval_dataset=")
    assert_same_eval(results, {f"eval_{k}": v for k, v in summary["final_eval"].items()})


@pytest.mark.parametrize("overrides, fragments", [
    (dict(output_dir="{tmp}/nothing", val_size=16), ("config key 'output_dir'", "holds no adapter", "dpo-lean train")),
    (dict(trained_adapter="{tmp}", val_size=16), ("config key 'trained_adapter'", "holds no adapter")),
    (dict(adapter_name_or_path="{tmp}", val_size=16), ("config key 'adapter_name_or_path'", "holds no adapter")),
    (dict(val_size=0), ("val_size", "eval_dataset", "evaluate needs rows")),
])
def test_user_mistakes_are_one_line_errors(trained, tmp_path, overrides, fragments):
    config, _ = trained
    raw = {**config.to_dict(), **{k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}}
    with pytest.raises(DpoLeanError) as err:
        run_evaluate(from_dict(raw))
    assert "\n" not in str(err.value) and all(f in str(err.value) for f in fragments)


def test_val_size_and_eval_dataset_together_are_refused():
    with pytest.raises(DpoLeanError, match="'val_size' and 'eval_dataset' are both set"):
        from_dict({"val_size": 0.1, "eval_dataset": "x.json"})


@pytest.mark.parametrize("keys", [
    {"pref_loss": "simpo", "ref_cache_dir": "absent"},  # reference-free: no cache anywhere
    {"pref_loss": "sigmoid,sft", "pref_bco_weight": 0.5, "pref_use_weighting": True, "ld_alpha": 0.5},
], ids=["simpo-without-cache", "bco-wpo-ld"])
def test_evaluate_reproduces_the_logged_evals_of_every_kind_of_loss(keys, tmp_path):
    keys = {**keys, "ref_cache_dir": str(tmp_path / keys["ref_cache_dir"])} if "ref_cache_dir" in keys else keys
    config = from_dict(fixture_raw(tmp_path, **SHORT, **keys))
    train.run_train(config)
    evals = [h for h in json.loads((config.metrics_dir / "log_history.json").read_text()) if "eval_loss" in h]
    assert_same_eval(run_evaluate(config), evals[-1])
    if config.pref_bco_weight:  # a checkpoint's reward baseline is the one its step's eval used
        at_4 = next(e for e in evals if e["step"] == 4)
        assert_same_eval(run_evaluate(from_dict(fixture_raw(
            tmp_path, **SHORT, **keys, trained_adapter=str(tmp_path / "out" / "checkpoint-4")))), at_4)
