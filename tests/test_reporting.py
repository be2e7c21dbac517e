"""Tests for dpo_lean.reporting: CSV, log history, summary, curves, atomic writes, callback."""

from __future__ import annotations

import csv
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import TrainerControl, TrainerState

from dpo_lean.errors import DpoLeanError
from dpo_lean.reporting import (
    MetricsWriter,
    plot_curves,
    smooth,
    write_metrics_csv,
    write_summary,
)
from dpo_lean.storage import atomic_write_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(step, loss, acc, margin, lr, **more):
    return {"loss": loss, "grad_norm": 0.3, "learning_rate": lr, "rewards/chosen": margin / 2,
            "rewards/rejected": -margin / 2, "rewards/accuracies": acc, "rewards/margins": margin,
            "logps/chosen": -50.0, "logps/rejected": -60.0, "epoch": step / 40, "step": step, **more}


def _eval(step, loss, acc, margin):
    return {"eval_loss": loss, "eval_rewards/accuracies": acc, "eval_rewards/margins": margin,
            "eval_runtime": 3.2, "eval_samples_per_second": 31.0, "epoch": step / 40, "step": step}


@pytest.fixture
def history():
    """Four train logs, two evals (the first is best by accuracy), then the train summary entry."""
    return [
        _train(10, 0.69, 0.50, 0.01, 1e-5, tokens_per_second=1500.0, peak_memory_gb=7.5),
        _train(20, 0.62, 0.60, 0.20, 9e-6, tokens_per_second=1600.0, peak_memory_gb=8.25),
        _eval(20, 0.60, 0.75, 0.30),
        _train(30, 0.55, 0.70, 0.40, 8e-6, tokens_per_second=1550.0, peak_memory_gb=8.0),
        _train(40, 0.50, 0.80, 0.60, 7e-6),
        _eval(40, 0.58, 0.70, 0.45),
        {"train_runtime": 123.4, "train_samples_per_second": 12.0, "train_steps_per_second": 0.3,
         "total_flos": 1.5e15, "train_loss": 0.59, "epoch": 1.0, "step": 40},
    ]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- CSV -------------------------------------------------------------------------------------

def test_csv_rows_splits_and_values(history, tmp_path):
    path = tmp_path / "m" / "training_metrics.csv"
    write_metrics_csv(history, path)
    rows = _read_csv(path)
    assert [(r["split"], r["step"]) for r in rows] == [
        ("train", "10"), ("train", "20"), ("eval", "20"), ("train", "30"), ("train", "40"), ("eval", "40")]
    assert float(rows[1]["loss"]) == 0.62
    assert float(rows[2]["loss"]) == 0.60
    assert float(rows[2]["rewards/accuracies"]) == 0.75
    assert float(rows[2]["runtime"]) == 3.2
    assert float(rows[0]["epoch"]) == 0.25


def test_csv_columns_order_and_empty_cells(history, tmp_path):
    path = tmp_path / "training_metrics.csv"
    write_metrics_csv(history, path)
    header = path.read_text().splitlines()[0].split(",")
    assert header == ["split", "step", "epoch", "loss", "rewards/chosen", "rewards/rejected",
                      "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                      "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_gb",
                      "runtime", "samples_per_second"]
    assert not any(h.startswith("eval_") for h in header)
    rows = _read_csv(path)
    assert rows[2]["grad_norm"] == ""  # eval row: no grad norm
    assert rows[4]["tokens_per_second"] == ""  # train row that did not log it
    assert rows[0]["runtime"] == ""


def test_csv_accepts_numpy_and_torch_scalars(tmp_path):
    path = tmp_path / "training_metrics.csv"
    write_metrics_csv([{"loss": np.float32(0.5), "grad_norm": torch.tensor(0.25), "step": 1, "epoch": 0.1}], path)
    row = _read_csv(path)[0]
    assert float(row["loss"]) == 0.5 and float(row["grad_norm"]) == 0.25


# --- summary ---------------------------------------------------------------------------------

def test_summary_final_best_and_runtime(history, tmp_path):
    path = tmp_path / "summary.json"
    returned = write_summary(history, path, extra={"train_tokens_per_second": 1580.0, "config": {"pref_beta": 0.1}})
    summary = json.loads(path.read_text())
    assert summary == returned
    assert summary["final"]["step"] == 40 and summary["final"]["loss"] == 0.50
    assert summary["final_eval"]["step"] == 40 and summary["final_eval"]["loss"] == 0.58
    assert summary["best_eval"]["step"] == 20  # higher accuracy, though not the last eval
    assert summary["best_eval"]["rewards/accuracies"] == 0.75
    assert summary["runtime_seconds"] == 123.4
    assert summary["train_tokens_per_second"] == 1580.0
    assert summary["peak_memory_gb"] == 8.25
    assert "peak_memory_reserved_gb" not in summary  # no log has it (a CPU run): left out, not null
    assert summary["global_step"] == 40 and summary["epochs"] == 1.0
    assert summary["config"] == {"pref_beta": 0.1}
    assert path.read_text().startswith("{\n  ")


def test_summary_best_eval_tie_goes_to_lowest_loss(tmp_path):
    history = [_eval(10, 0.60, 0.8, 0.1), _eval(20, 0.40, 0.8, 0.1), _eval(30, 0.50, 0.8, 0.1)]
    assert write_summary(history, tmp_path / "s.json")["best_eval"]["step"] == 20


def test_summary_without_eval_and_extra_overrides(tmp_path):
    history = [_train(5, 0.69, 0.5, 0.0, 1e-5)]
    summary = write_summary(history, tmp_path / "s.json", extra={"runtime_seconds": 9.0})
    assert "final_eval" not in summary and "best_eval" not in summary
    assert summary["runtime_seconds"] == 9.0
    assert summary["final"]["step"] == 5


def test_nan_and_inf_become_null(tmp_path):
    history = [_train(1, float("nan"), 0.5, 0.0, 1e-5, grad_norm=float("inf"))]
    summary = write_summary(history, tmp_path / "s.json", extra={"x": np.float64("nan"), "y": torch.tensor(2.0)})
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded["final"]["loss"] is None and loaded["final"]["grad_norm"] is None
    assert loaded["x"] is None and loaded["y"] == 2.0
    assert summary == loaded


# --- plotting --------------------------------------------------------------------------------

def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000


def test_plot_curves_full_history(history, tmp_path):
    path = tmp_path / "training_curves.png"
    plot_curves(history, path)
    _assert_png(path)


def test_plot_curves_single_point_no_eval(tmp_path):
    path = tmp_path / "training_curves.png"
    plot_curves([{"loss": 0.69, "step": 1, "epoch": 0.01}], path)
    _assert_png(path)


def test_plot_curves_empty_history(tmp_path):
    path = tmp_path / "training_curves.png"
    plot_curves([], path)
    _assert_png(path)


def test_smooth_hand_computed():
    assert smooth([]) == []
    assert smooth([1.0, 2.0, 4.0], alpha=0.5) == [1.0, 1.5, 2.75]
    assert smooth([0.0, 10.0], alpha=0.2) == pytest.approx([0.0, 2.0])
    values = [3.0, 1.0]
    smooth(values, alpha=0.5)
    assert values == [3.0, 1.0]


def test_smooth_skips_nan():
    out = smooth([float("nan"), 2.0, float("nan"), 4.0], alpha=0.5)
    assert math.isnan(out[0])
    assert out[1:] == [2.0, 2.0, 3.0]


# --- atomic writes ---------------------------------------------------------------------------

def test_atomic_write_creates_parents_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "b" / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert os.listdir(path.parent) == ["f.txt"]


def test_atomic_write_failure_names_path(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    path = blocker / "metrics" / "training_metrics.csv"
    with pytest.raises(DpoLeanError, match="training_metrics.csv") as err:
        atomic_write_text(path, "a,b\n")
    assert str(blocker) in str(err.value) and "\n" not in str(err.value)


def test_failed_replace_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "log_history.json"
    path.write_text("old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(DpoLeanError, match="No space left on device"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["log_history.json"]


# --- callback --------------------------------------------------------------------------------

def _drive(writer, state, history):
    """Replay ``history`` the way Trainer.log does: append to state.log_history, then on_log."""
    args, control = SimpleNamespace(output_dir="unused"), TrainerControl()
    for entry in history:
        logs = {k: v for k, v in entry.items() if k != "step"}
        state.global_step = entry["step"]
        state.epoch = entry["epoch"]
        state.log_history.append({**logs, "step": state.global_step})
        writer.on_log(args, state, control, logs=logs)
    writer.on_train_end(args, state, control)


def test_callback_writes_all_files(history, tmp_path):
    metrics_dir = tmp_path / "out" / "dpo_metrics"
    writer = MetricsWriter(metrics_dir, extra_summary=lambda: {"cache_fingerprint": "abc123"})
    state = TrainerState()
    _drive(writer, state, history)

    assert sorted(os.listdir(metrics_dir)) == [
        "log_history.json", "summary.json", "training_curves.png", "training_metrics.csv"]
    assert json.loads((metrics_dir / "log_history.json").read_text()) == history
    assert len(_read_csv(metrics_dir / "training_metrics.csv")) == 6
    summary = json.loads((metrics_dir / "summary.json").read_text())
    assert summary["cache_fingerprint"] == "abc123"
    assert summary["best_eval"]["step"] == 20 and summary["runtime_seconds"] == 123.4
    assert summary["global_step"] == 40
    _assert_png(metrics_dir / "training_curves.png")


def test_callback_on_log_records_logs_missing_from_state(tmp_path):
    writer = MetricsWriter(tmp_path, plot=False)
    state = TrainerState(global_step=7)
    writer.on_log(SimpleNamespace(), state, TrainerControl(), logs={"loss": 0.6, "epoch": 0.5})
    rows = _read_csv(tmp_path / "training_metrics.csv")
    assert [(r["split"], r["step"], r["loss"]) for r in rows] == [("train", "7", "0.6")]


def test_callback_plot_off_skips_png(history, tmp_path):
    writer = MetricsWriter(tmp_path, plot=False)
    _drive(writer, TrainerState(), history)
    assert not (tmp_path / "training_curves.png").exists()
    assert (tmp_path / "summary.json").exists()


def test_callback_non_zero_rank_writes_nothing(history, tmp_path):
    metrics_dir = tmp_path / "dpo_metrics"
    writer = MetricsWriter(metrics_dir)
    state = TrainerState()
    state.is_world_process_zero = False
    _drive(writer, state, history)
    assert not metrics_dir.exists()


def test_summary_peak_reserved_is_the_highest_logged(tmp_path):
    history = [_train(10, 0.69, 0.5, 0.0, 1e-5, peak_memory_gb=7.5, peak_memory_reserved_gb=9.0),
               _train(20, 0.60, 0.6, 0.1, 1e-5, peak_memory_gb=8.0, peak_memory_reserved_gb=11.5),
               _train(30, 0.55, 0.7, 0.2, 1e-5, peak_memory_gb=7.9, peak_memory_reserved_gb=10.0)]
    summary = write_summary(history, tmp_path / "summary.json")
    assert summary["peak_memory_gb"] == 8.0 and summary["peak_memory_reserved_gb"] == 11.5
