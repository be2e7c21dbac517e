"""What a user sees while a long stage runs: train's bar (or a line per log step in a log file) and its plan line,
the tokenising and hashing bars, and nothing else: no library's stray bar, no warning repeated per epoch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dpo_lean import fingerprint, progress, scoring, train
from dpo_lean.data.pipeline import prepare_data
from dpo_lean.modeling import load_tokenizer


@pytest.fixture
def no_delay(monkeypatch):
    """Bars show at once (a real stage shows one only once it has taken progress.DELAY seconds)."""
    monkeypatch.setattr(progress, "DELAY", 0)


def _state(step: int, max_steps: int = 48):
    return SimpleNamespace(is_world_process_zero=True, global_step=step, max_steps=max_steps, num_train_epochs=3)


def _args(**kw):
    return SimpleNamespace(**{"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "world_size": 2,
                              "max_steps": -1, "num_train_epochs": 3.0, **kw})


def test_plan_line_says_steps_epochs_and_pairs_per_step():
    line = progress.plan_line(_args(), _state(0), train_dataloader=list(range(32)))  # 32 batches: 16 steps an epoch
    assert line == ("training: 48 optimizer steps (3 epochs of 16), 16 pairs per step (4 per device x 2 "
                    "accumulation x 2 processes)")
    resumed = progress.plan_line(_args(max_steps=20), _state(12, 20), train_dataloader=list(range(32)))
    assert resumed.startswith("training: 20 optimizer steps (1.25 epochs of 16)") and resumed.endswith("; from step 12")


def test_a_log_step_is_one_line_of_names_and_values_not_a_dict():
    logs = {"loss": 0.693147, "grad_norm": 1.5, "learning_rate": 5e-6, "rewards/accuracies": 0.625, "epoch": 0.5,
            "tokens_per_second": 12345.0}
    assert progress.log_line(logs, 10, 48) == ("step 10/48 | loss 0.6931 | rewards/accuracies 0.625 | lr 5e-06 | "
                                                "grad_norm 1.5 | tok/s 12,345")
    evaluation = {"eval_loss": 0.5, "eval_rewards/accuracies": 0.75, "eval_runtime": 3.2,
                  "eval_samples_per_second": 9.0, "epoch": 1.0}
    assert progress.log_line(evaluation, 16, 48) == "eval at step 16/48 | loss 0.5 | rewards/accuracies 0.75"
    done = {"train_runtime": 125.0, "train_loss": 0.61, "total_flos": 1.0, "epoch": 3.0}
    assert progress.log_line(done, 48, 48) == "done: 48 steps in 2m05s, train_loss 0.61"


def test_in_a_terminal_train_shows_a_bar_with_the_total_and_writes_each_log_above_it(monkeypatch, capsys):
    monkeypatch.setattr(progress, "is_terminal", lambda: True)
    shown = progress.TrainProgress(show_bar=True)
    args, state = _args(), _state(0)
    shown.on_train_begin(args, state, None)
    state.global_step = 12
    shown.on_step_end(args, state, None)
    shown.on_log(args, state, None, logs={"loss": 0.5})
    shown.on_train_end(args, state, None)
    out, err = capsys.readouterr()
    assert "training:  25%" in err and "12/48" in err and "step 12/48 | loss 0.5" in out
    assert "{'loss'" not in out + err


def test_without_a_terminal_each_log_step_is_a_line_with_the_time_left(monkeypatch, capsys):
    monkeypatch.setattr(progress, "is_terminal", lambda: False)
    shown = progress.TrainProgress(show_bar=True)
    args, state = _args(), _state(0)
    shown.on_train_begin(args, state, None)
    shown.t0 -= 30.0  # 30 s for the first 12 steps: 90 s for the 36 left
    state.global_step = 12
    shown.on_step_end(args, state, None)
    shown.on_log(args, state, None, logs={"loss": 0.5})
    shown.on_train_end(args, state, None)
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "step 12/48 | loss 0.5 | 30 s elapsed, ETA 1m30s" and err == ""


def test_tokenising_many_rows_shows_a_bar_with_the_total(tiny_config, no_delay, capsys):
    config = tiny_config(overwrite_cache=True)
    prepare_data(config, load_tokenizer(config))
    err = capsys.readouterr().err
    assert "tokenising" in err and "64/64" in err and "row/s" in err


def test_hashing_a_large_file_shows_a_bar_with_its_size(tmp_path, no_delay, monkeypatch, capsys):
    monkeypatch.setenv("DPO_LEAN_CACHE_HOME", str(tmp_path / "memo"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * (3 << 20))
    fingerprint.file_sha256(weights)
    err = capsys.readouterr().err
    assert "hashing model.safetensors" in err and "3.00M/3.00M" in err


def test_held_out_rows_make_no_flattening_bar(tiny_config, capfd):
    config = tiny_config(val_size=16)
    tokenizer, data, _, ref = scoring.prepare_run(config)
    train_rows, eval_set = scoring.split_eval(config, tokenizer, data, ref)
    capfd.readouterr()
    dataset = scoring.to_dataset(train_rows, ref)
    assert "Flattening" not in capfd.readouterr().err
    expected = {r.id: ref[r.id][0] for r in train_rows}
    assert [row["ref_chosen_logps"] for row in dataset] == [expected[i] for i in train_rows.ids]


def test_more_dataloader_workers_than_cpus_are_capped_and_said_once(tiny_config, monkeypatch, capsys):
    monkeypatch.setattr(train.launch, "cpus", lambda: 2)
    args = train.training_arguments(tiny_config(dataloader_num_workers=4), has_eval=False)
    assert args.dataloader_num_workers == 2
    out = capsys.readouterr().out
    assert out.count("dataloader_num_workers 4: this machine has 2 CPUs; loading batches with 2 worker processes") == 1


def test_curves_of_a_short_run_have_whole_step_ticks():
    from dpo_lean.reporting import draw_curves

    history = [{"loss": 0.69 - 0.01 * s, "learning_rate": 1e-3, "rewards/margins": 0.1 * s, "rewards/accuracies": 0.5,
                "step": s} for s in (1, 2, 3)]
    fig = draw_curves(history)
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks

