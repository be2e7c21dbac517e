"""Phase 2: step-0 loss, the cache join's refusals, resume after SIGKILL, outputs, adapter and export."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import FIXTURES

from dpo_lean import modeling, scoring, train
from dpo_lean.errors import DpoLeanError
from dpo_lean.tiny import build_tokenizer, write_tiny_model

SHORT = dict(per_device_train_batch_size=4, per_device_eval_batch_size=8, num_train_epochs=2.0, learning_rate=5e-3,
             pref_beta=0.5, lora_rank=8, logging_steps=4, save_steps=8, val_size=16, eval_steps=8,
             eval_on_start=True, lr_scheduler_type="linear")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run on the fixture data (48 train / 16 eval pairs, 24 steps), shared by several tests."""
    from make_fixtures import fixture_config

    from dpo_lean.config import from_dict
    raw = {**fixture_config(FIXTURES), **SHORT, "output_dir": str(tmp_path_factory.mktemp("run") / "out")}
    config = from_dict(raw)
    result = train.run_train(config)
    history = json.loads((config.metrics_dir / "log_history.json").read_text())
    return config, result, history


def test_step_0_loss_is_ln2(trained):
    _, _, history = trained
    first_train = next(h for h in history if "loss" in h)
    first_eval = next(h for h in history if "eval_loss" in h)
    assert first_train["step"] == 1 and abs(first_train["loss"] - math.log(2)) < 1e-3
    assert first_eval["step"] == 0 and abs(first_eval["eval_loss"] - math.log(2)) < 1e-3
    assert abs(first_eval["eval_rewards/margins"]) < 1e-3 and first_train["rewards/accuracies"] == pytest.approx(0.5, abs=0.13)


def test_training_lowers_the_loss_and_evals_do_not_break_it(trained):
    _, _, history = trained
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    assert len(evals) >= 4  # start, steps 8, 16, 24 (the final one): 4-bit CPU model survives evals
    assert losses[-1] < losses[0] - 0.1  # training goes on lowering the loss across the evals
    assert all(math.isfinite(x) for x in losses + [e["eval_loss"] for e in evals])


def test_logged_metrics_use_trl_names(trained):
    _, _, history = trained
    train_log = [h for h in history if "loss" in h][-1]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "learning_rate", "grad_norm", "epoch", "tokens_per_second", "peak_memory_gb"):
        assert key in train_log, key
    assert train_log["tokens_per_second"] > 0 and train_log["peak_memory_gb"] > 0
    assert ("peak_memory_reserved_gb" in train_log) == torch.cuda.is_available()  # CUDA only, left out on CPU
    if torch.cuda.is_available():
        assert train_log["peak_memory_reserved_gb"] >= train_log["peak_memory_gb"]
    assert train_log["rewards/margins"] == pytest.approx(train_log["rewards/chosen"] - train_log["rewards/rejected"], abs=1e-5)


def test_output_files(trained):
    config, _, history = trained
    out = config.metrics_dir
    csv_lines = (out / "training_metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("split,step,epoch,loss,rewards/chosen")
    assert len(csv_lines) - 1 == sum(1 for h in history if "loss" in h or "eval_loss" in h)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["pref_beta"] == 0.5 and summary["cache_fingerprint"]["cutoff_len"] == 128
    assert summary["final"]["loss"] == [h for h in history if "loss" in h][-1]["loss"]
    assert summary["final_eval"]["rewards/accuracies"] == [h for h in history if "eval_loss" in h][-1]["eval_rewards/accuracies"]
    assert summary["train_tokens_per_second"] > 0 and summary["runtime_seconds"] > 0
    assert ("peak_memory_reserved_gb" in summary) == torch.cuda.is_available()
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_loads_with_peft_and_export_matches(trained, tmp_path):
    from float64_reference import completion_logp
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo_lean.export import run_export

    config, _, _ = trained
    assert (tmp := config.output_dir) and (FIXTURES / "tiny-model").is_dir()
    base = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, tmp)
    assert any(p.abs().sum() > 0 for n, p in with_adapter.named_parameters() if "lora_B" in n)  # it learned

    config.export_dir = str(tmp_path / "merged")
    run_export(config)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with_adapter.eval()
    for prompt, completion in (([1, 50, 60, 70], [90, 100, 2]), ([1, 7], [200, 2])):  # plain full-logits forwards
        assert completion_logp(with_adapter, prompt, completion) == pytest.approx(
            completion_logp(merged, prompt, completion), abs=1e-4)


def test_training_never_loads_a_reference(tiny_config, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("train loaded a reference model")
    monkeypatch.setattr(modeling, "prepare_reference", forbidden)
    train.run_train(tiny_config(max_steps=1, save_strategy="no"))


# ---------------------------------------------------------------- the cache join refuses what does not match


def _other_model(tmp_path):
    return str(write_tiny_model(tmp_path / "other", seed=1))


def _other_tokenizer(tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(FIXTURES / "tiny-model", d)
    tok = build_tokenizer(vocab_size=700)
    tok.save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("field, overrides", [
    ("model.weights_sha256", lambda p: {"model_name_or_path": _other_model(p)}),
    ("tokenizer_sha256", lambda p: {"model_name_or_path": _other_tokenizer(p)}),
    ("template", lambda p: {"template": "plain"}),
    ("cutoff_len", lambda p: {"cutoff_len": 96}),
    ("truncation_mode", lambda p: {"truncation_mode": "keep_start"}),
    ("reference.precision", lambda p: {"ref_precision": "fp32"}),
])
def test_refuses_a_cache_built_for_something_else(field, overrides, tiny_config, tmp_path, monkeypatch):
    """... before the dataset is tokenised (which would replace the prepared data the cache was made from)."""
    import dpo_lean.data.pipeline as pipeline

    config = tiny_config(**overrides(tmp_path))

    def tokenising(*args, **kwargs):
        raise AssertionError("the dataset was tokenised before the cache was refused")

    monkeypatch.setattr(pipeline, "encode_batches", tokenising)
    with pytest.raises(DpoLeanError) as err:
        scoring.prepare_run(config)
    message = str(err.value)
    assert f"{field}:" in message and "dpo-lean precompute" in message and "\n" not in message


def test_rows_missing_from_the_cache_are_counted(tiny_config):
    config = tiny_config()
    next(config.resolved_ref_cache_dir.glob("part-*.parquet")).unlink()
    with pytest.raises(DpoLeanError) as err:
        scoring.prepare_run(config)
    assert str(err.value).startswith("16 of 64 training rows are not in the cache ")
    assert "run `dpo-lean precompute CONFIG.yaml`" in str(err.value) and "\n" not in str(err.value)


def test_no_cache_says_run_precompute(tiny_config, tmp_path):
    with pytest.raises(DpoLeanError, match="run `dpo-lean precompute"):
        scoring.prepare_run(tiny_config(copy_cache=False, ref_cache_dir=str(tmp_path / "none")))


def test_resume_needs_a_checkpoint(tiny_config):
    with pytest.raises(DpoLeanError, match="no complete checkpoint"):
        train.run_train(tiny_config(resume_from_checkpoint=True))


# ---------------------------------------------------------------- trackers


def test_tensorboard_gets_the_trl_metrics(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(report_to="tensorboard", max_steps=2, logging_steps=1, save_strategy="no")
    train.run_train(config)
    events = list((tmp_path / "output" / "runs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/rewards/accuracies", "train/rewards/margins"} <= set(tags)


def test_a_tracker_that_is_not_installed_is_a_one_line_error(tiny_config, monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_wandb_available", lambda: False)
    with pytest.raises(DpoLeanError, match=r"report_to.*wandb is not installed.*pip install wandb"):
        train.training_arguments(tiny_config(report_to="wandb"), has_eval=False)


def test_a_policy_that_disagrees_with_the_cache_at_step_0_stops_training_in_one_line(tmp_path):
    """The reference is the starting point, so the first step's policy log-probs must equal the cache's up to
    rounding. One cached row, moved by 0.05 nats (a dropout left on in training moves the policy's side by more),
    stops `dpo-lean train` before any update: one line naming the row, the gap and the likely causes, exit 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_cli import assert_one_line_error, invoke, write_config

    shutil.copytree(FIXTURES / "demo" / "ref_cache", tmp_path / "ref_cache")
    shift, parts = 0.05, sorted((tmp_path / "ref_cache").glob("part-*.parquet"))
    part = next(p for p in parts if 0 in pq.read_table(p).column("row_index").to_pylist())  # in the first step
    table = pq.read_table(part)
    values = table.column("ref_rejected_logps").to_pylist()
    first = table.column("row_index").to_pylist().index(0)
    values[first] += shift
    index = table.schema.get_field_index("ref_rejected_logps")
    field = table.schema.field(index)
    table = table.set_column(index, field, pa.array(values, type=field.type))
    pq.write_table(table, part)  # the schema keeps its metadata: the part still belongs to the cache
    config = write_config(tmp_path, max_samples=8, max_steps=1, per_device_train_batch_size=8, save_strategy="no")
    result = invoke("train", config)
    line = assert_one_line_error(result, f"row 0 scores {shift:.4g} nats apart", "float rounding explains",
                                 "dropout", "template", "dtype", "adapters")
    assert "step 0" in line and not (tmp_path / "output" / "adapter_model.safetensors").exists()
