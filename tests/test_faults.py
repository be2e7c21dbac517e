"""Faults: kill anywhere, Ctrl-C, a full disk, a damaged cache, NaN steps, and run-to-run determinism."""

from __future__ import annotations

import errno
import json
import math
import random
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import FIXTURES
from killing import Point, kill_at, run_until

from dpo_lean import cache, faults, scoring, train
from dpo_lean.errors import DpoLeanError
from dpo_lean.precompute import run_precompute

SEED = 20261126
FIXTURE_CACHE = FIXTURES / "demo" / "ref_cache"


def _cached(cache_dir) -> pd.DataFrame:
    state = cache.scan(cache_dir)
    assert state.complete, state.problems
    return state.table.to_pandas().sort_values("row_index").reset_index(drop=True)


def _write_config(config, path):
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def _missing_parts(config) -> int:
    """Parts of the plan still to compute (8 rows, one batch, per part in these tests)."""
    if not (config.resolved_ref_cache_dir / cache.MANIFEST).exists():
        return 8
    return 8 - len(cache.scan(config.resolved_ref_cache_dir).parts)


# ---------------------------------------------------------------- kill anywhere


def precompute_point(rng: random.Random, remaining: int) -> Point:
    """A kill point that fires in this run and completes at most one more part (so ten kills fit)."""
    kind = rng.choice(["forward", "part-write", "after-part"] if remaining > 1 else ["forward", "part-write"])
    if kind == "forward":  # mid-part: during the n-th batch of this run (one batch per part here)
        return Point("dpo_lean.precompute", None, "batch_logps", rng.randint(1, min(2, remaining)), True)
    if kind == "part-write":  # the part's bytes are on disk under the temporary name, not yet renamed
        return Point("pyarrow.parquet", None, "write_table", 1, False)
    return Point("dpo_lean.cache", None, "write_part", 1, False)  # between parts


def test_precompute_killed_ten_times_ends_with_the_uninterrupted_cache(tiny_config, tmp_path):
    straight = tiny_config(copy_cache=False, ref_cache_dir=str(tmp_path / "straight"), cache_part_rows=8)
    run_precompute(straight)
    config = tiny_config(copy_cache=False, ref_cache_dir=str(tmp_path / "killed"), cache_part_rows=8)
    path = _write_config(config, tmp_path / "cfg.yaml")
    rng, kills = random.Random(SEED), []
    while len(kills) < 10:
        point = precompute_point(rng, _missing_parts(config))
        assert kill_at(point, "precompute", path) == -9, point
        kills.append(str(point))
    assert _missing_parts(config) > 0
    assert {k.split(" of ")[1] for k in kills} == {"dpo_lean.precompute.batch_logps", "pyarrow.parquet.write_table",
                                                  "dpo_lean.cache.write_part"}
    summary = run_precompute(config)
    assert summary["complete"] and not list(config.resolved_ref_cache_dir.glob(".part-*.tmp"))
    pd.testing.assert_frame_equal(_cached(config.resolved_ref_cache_dir), _cached(tmp_path / "straight"))


TRAIN = dict(per_device_train_batch_size=4, max_steps=16, save_steps=2, logging_steps=2, learning_rate=5e-3,
             pref_beta=0.5, lora_rank=4, lr_scheduler_type="linear", val_size=0, save_total_limit=3)


def train_point(rng: random.Random) -> Point:
    kind = rng.choice(["step", "checkpoint-optimizer", "checkpoint-rng", "checkpoint-state"])
    if kind == "step":  # mid-training, between checkpoints or right after one
        return Point("transformers", "Trainer", "training_step", rng.randint(1, 4), True)
    n = rng.randint(1, 2)  # during the run's first or second checkpoint save
    if kind == "checkpoint-optimizer":  # adapter written, optimizer not yet
        return Point("transformers", "Trainer", "_save_optimizer_and_scheduler", n, True)
    if kind == "checkpoint-rng":  # adapter and optimizer written, RNG state and trainer_state.json not
        return Point("transformers", "Trainer", "_save_rng_state", n, True)
    return Point("transformers", "TrainerState", "save_to_json", n, True)  # all but trainer_state.json


def test_train_killed_ten_times_resumes_to_the_uninterrupted_result(tiny_config, tmp_path):
    straight = tiny_config(**{**TRAIN, "max_steps": 24}, output_dir=str(tmp_path / "straight"))
    train.run_train(straight)
    expected = json.loads((straight.metrics_dir / "summary.json").read_text())

    config = tiny_config(**{**TRAIN, "max_steps": 24}, output_dir=str(tmp_path / "killed"))
    first = _write_config(config, tmp_path / "first.yaml")
    config.resume_from_checkpoint = True
    resumed = _write_config(config, tmp_path / "resume.yaml")
    rng = random.Random(SEED)
    for i in range(10):
        point = train_point(rng)
        has_checkpoint = faults.latest_complete(tmp_path / "killed") is not None
        assert kill_at(point, "train", resumed if has_checkpoint else first) == -9, f"kill {i}, {point}"
        newest = faults.checkpoints(tmp_path / "killed")
        if "checkpoint" in point.attr or "save" in point.attr:
            assert newest and not faults.is_complete(newest[0])  # a half-written checkpoint is left behind
    assert (faults.latest_complete(tmp_path / "killed") is None
            or int(faults.latest_complete(tmp_path / "killed").name.split("-")[1]) < 24)
    train.run_train(config)  # resume_from_checkpoint: true skips (and removes) any half-written checkpoint
    got = json.loads((config.metrics_dir / "summary.json").read_text())
    assert got["global_step"] == expected["global_step"] == 24
    for key, value in expected["final"].items():
        if key.startswith(("rewards/", "logps/", "loss", "grad_norm", "learning_rate")):
            assert got["final"][key] == pytest.approx(value, abs=1e-4), key


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_in_training_saves_a_checkpoint_and_says_how_to_resume(tiny_config, tmp_path):
    config = tiny_config(**{**TRAIN, "save_steps": 100}, output_dir=str(tmp_path / "out"))
    path = _write_config(config, tmp_path / "cfg.yaml")
    proc = run_until(Point("transformers", "Trainer", "training_step", 5, True), "train", path,
                     signal="signal.SIGINT")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "interrupted at step 5; checkpoint saved to" in proc.stderr
    assert "rerun `dpo-lean train CONFIG.yaml` to resume from it" in proc.stderr and "Traceback" not in proc.stderr
    assert faults.is_complete(tmp_path / "out" / "checkpoint-5")
    config.resume_from_checkpoint = True
    train.run_train(config)
    assert json.loads((config.metrics_dir / "summary.json").read_text())["global_step"] == 16


def test_sigterm_in_training_saves_a_checkpoint_and_a_plain_rerun_resumes_from_it(tiny_config, tmp_path):
    """What SLURM, Kubernetes, `timeout` and a preempted machine send: treated as the first Ctrl-C, exit 143."""
    config = tiny_config(**{**TRAIN, "save_steps": 100, "max_steps": 8}, output_dir=str(tmp_path / "out"))
    path = _write_config(config, tmp_path / "cfg.yaml")
    proc = run_until(Point("transformers", "Trainer", "training_step", 5, True), "train", path,
                     signal="signal.SIGTERM")
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "SIGTERM: finishing this step and saving a checkpoint" in proc.stderr
    assert (f"interrupted by SIGTERM at step 5; checkpoint saved to {tmp_path / 'out' / 'checkpoint-5'}; rerun "
            "`dpo-lean train CONFIG.yaml` to resume from it") in proc.stderr and "Traceback" not in proc.stderr
    train.run_train(config)  # the same config: resumes from checkpoint-5
    history = json.loads((config.metrics_dir / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 4, 6, 8]  # 6 and 8 after the resume


def test_sigterm_before_anything_can_be_saved_stops_with_one_line(tiny_config, tmp_path):
    config = tiny_config(output_dir=str(tmp_path / "out"))
    path = _write_config(config, tmp_path / "cfg.yaml")
    proc = run_until(Point("dpo_lean.data.pipeline", None, "encode_batches", 1, True), "train", path,
                     signal="signal.SIGTERM")  # while the dataset is tokenised
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == "stopped by SIGTERM" and "Traceback" not in proc.stderr


@pytest.mark.parametrize("signal, status, said", [("SIGINT", 130, "Ctrl-C"), ("SIGTERM", 143, "SIGTERM")])
def test_ctrl_c_or_sigterm_in_precompute_keeps_every_finished_batch(signal, status, said, tiny_config, tmp_path):
    config = tiny_config(copy_cache=False, ref_cache_dir=str(tmp_path / "cache"), cache_part_rows=16)
    path = _write_config(config, tmp_path / "cfg.yaml")
    proc = run_until(Point("dpo_lean.precompute", None, "batch_logps", 5, True), "precompute", path,
                     signal=f"signal.{signal}")
    assert proc.returncode == status, proc.stderr[-2000:]
    assert f"{said}: finishing this batch, saving the rows done and stopping" in proc.stderr
    # 8 rows a batch: two parts of 16, then the 5th batch, which the signal let finish, in a part of its own
    assert "interrupted: 40 of 64 rows are cached in complete parts" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert run_precompute(config)["rows"] == 24
    pd.testing.assert_frame_equal(_cached(config.resolved_ref_cache_dir), _cached(FIXTURE_CACHE), check_exact=False,
                                  atol=1e-4, rtol=0)


# ---------------------------------------------------------------- a full disk


def _no_space(path):
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return fail


def test_disk_full_while_writing_a_part(tiny_config, tmp_path, monkeypatch):
    config = tiny_config(copy_cache=False, ref_cache_dir=str(tmp_path / "cache"))
    real, calls = pq.write_table, []

    def second_fails(table, where, *a, **k):
        if ".part-" in str(where):  # parts only, not the _expected.parquet row list
            calls.append(where)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(where))
        return real(table, where, *a, **k)

    monkeypatch.setattr(pq, "write_table", second_fails)
    with pytest.raises(DpoLeanError) as err:
        run_precompute(config)
    assert "No space left on device" in str(err.value) and ".parquet" in str(err.value)
    assert len(list((tmp_path / "cache").glob("part-*.parquet"))) == 1  # nothing incomplete looks complete
    assert not list((tmp_path / "cache").glob(".part-*"))


def test_disk_full_while_writing_a_checkpoint(tiny_config, tmp_path, monkeypatch):
    from transformers import Trainer

    config = tiny_config(**TRAIN, output_dir=str(tmp_path / "out"))
    real, calls = Trainer._save_rng_state, []

    def third_fails(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 3:
            _no_space(output_dir)()
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", third_fails)
    with pytest.raises(DpoLeanError) as err:
        train.run_train(config)
    message = str(err.value)
    assert "No space left on device" in message and "checkpoint-6" in message and "checkpoint-4" in message
    assert not faults.is_complete(tmp_path / "out" / "checkpoint-6")
    config.resume_from_checkpoint = True
    assert faults.resume_target(config).endswith("checkpoint-4")
    assert not (tmp_path / "out" / "checkpoint-6").exists()  # the half-written one is removed


def test_an_explicit_incomplete_checkpoint_is_refused(tiny_config, tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(DpoLeanError, match="incomplete"):
        faults.resume_target(tiny_config(resume_from_checkpoint=str(tmp_path / "checkpoint-3")))


# ---------------------------------------------------------------- a damaged or edited cache


def _foreign_part(tiny_config, tmp_path):
    other = tiny_config(copy_cache=False, ref_cache_dir=str(tmp_path / "other"), cutoff_len=64)
    run_precompute(other)
    return sorted((tmp_path / "other").glob("part-*.parquet"))[0]


@pytest.mark.parametrize("damage", ["foreign-part", "duplicate-part", "duplicate-row", "edited-manifest",
                                    "truncated-manifest"])
def test_damaged_cache_is_detected_then_repaired(damage, tiny_config, tmp_path):
    from click.testing import CliRunner

    from dpo_lean.cli import main

    config = tiny_config()
    cache_dir = config.resolved_ref_cache_dir
    before = _cached(cache_dir)
    parts = sorted(cache_dir.glob("part-*.parquet"))
    manifest = cache_dir / cache.MANIFEST
    if damage == "foreign-part":
        shutil.copy(_foreign_part(tiny_config, tmp_path), cache_dir / "part-00009-0000000000.parquet")
    elif damage == "duplicate-part":
        shutil.copy(parts[1], cache_dir / "part-00009-0000000000.parquet")
    elif damage == "duplicate-row":  # one part rewritten with its first row twice
        table = pq.read_table(parts[2])
        pq.write_table(pa.concat_tables([table, table.slice(0, 1)]).replace_schema_metadata(table.schema.metadata),
                       parts[2])
    elif damage == "edited-manifest":
        data = json.loads(manifest.read_text())
        data["fingerprint"]["cutoff_len"] = 4096
        manifest.write_text(json.dumps(data))
    else:
        manifest.write_text(manifest.read_text()[:100])

    with pytest.raises(DpoLeanError) as err:
        scoring.prepare_run(config)
    assert "\n" not in str(err.value) and "precompute" in str(err.value)
    result = CliRunner().invoke(main, ["cache-info", str(cache_dir)])
    assert result.exit_code == 1

    damaged = {"duplicate-part": parts[1], "duplicate-row": parts[2]}.get(damage)
    redone = set(pq.read_table(damaged).column("row_index").to_pylist()) if damaged else set()
    summary = run_precompute(config)  # repairs: recomputes only what the damage touched
    assert summary["complete"]
    assert summary["rows"] == len(redone)
    # Rows kept from the committed fixture are its values exactly. Recomputed rows are compared with an
    # uninterrupted run on this machine (exact), not with the fixture, which another CPU's kernels computed.
    repaired = _cached(cache_dir)
    is_redone = repaired["row_index"].isin(redone)
    pd.testing.assert_frame_equal(repaired[~is_redone], before[~is_redone], check_exact=True)
    if redone:
        run_precompute(tiny_config(copy_cache=False, ref_cache_dir=str(tmp_path / "straight")))
        straight = _cached(tmp_path / "straight")
        pd.testing.assert_frame_equal(repaired[is_redone], straight[is_redone], check_exact=True)
        pd.testing.assert_frame_equal(repaired, before, check_exact=False, atol=1e-4, rtol=0)  # and near the fixture
    scoring.prepare_run(config)


# ---------------------------------------------------------------- NaN or inf


def _poison_step(monkeypatch, step: int, factor: float = float("nan")):
    """Multiply the loss by ``factor`` (NaN: a non-finite step) for the micro-batch of the given optimizer step
    (1-based). tests/test_nonfinite_guard.py's GPU test patches with it too, so its patch runs here on any CPU."""
    real, calls = train.pair_metrics, []

    def poisoned(config, scores, batch, **kwargs):
        losses, stats = real(config, scores, batch, **kwargs)
        if scores["logps"].requires_grad:
            calls.append(1)
            if len(calls) == step:
                losses = losses * factor
        return losses, stats

    monkeypatch.setattr(train, "pair_metrics", poisoned)


def test_nan_stops_training_with_the_step_and_its_rows(tiny_config, tmp_path, monkeypatch):
    _poison_step(monkeypatch, 5)
    config = tiny_config(**TRAIN, output_dir=str(tmp_path / "out"))
    with pytest.raises(DpoLeanError) as err:
        train.run_train(config)
    message = str(err.value)
    assert "non-finite loss or gradients at step 5 (batch rows " in message
    assert "checkpoint-4" in message and "skip_nonfinite_steps" in message
    assert faults.latest_complete(tmp_path / "out").name == "checkpoint-4"  # nothing saved after the bad step


def test_nan_step_can_be_skipped_and_counted(tiny_config, tmp_path, monkeypatch):
    _poison_step(monkeypatch, 5)
    config = tiny_config(**TRAIN, output_dir=str(tmp_path / "out"), skip_nonfinite_steps=True)
    train.run_train(config)
    summary = json.loads((config.metrics_dir / "summary.json").read_text())
    assert summary["nonfinite_steps_skipped"] == 1 and summary["global_step"] == 16
    final_loss = summary["final"]["loss"]  # NaN is written as null, which approx(None) would accept
    assert isinstance(final_loss, float) and math.isfinite(final_loss), final_loss
    history = json.loads((config.metrics_dir / "log_history.json").read_text())
    assert [h["nonfinite_steps_skipped"] for h in history if "loss" in h][-1] == 1


# ---------------------------------------------------------------- determinism


def test_same_config_and_seed_give_identical_caches_and_metrics(tiny_config, tmp_path):
    caches, finals = [], []
    for run in ("a", "b"):
        run_precompute(tiny_config(copy_cache=False, ref_cache_dir=str(tmp_path / f"cache-{run}")))
        caches.append(_cached(tmp_path / f"cache-{run}"))
        config = tiny_config(**{**TRAIN, "max_steps": 6, "save_strategy": "no"}, output_dir=str(tmp_path / run),
                             ref_cache_dir=str(tmp_path / f"cache-{run}"))
        train.run_train(config)
        history = json.loads((config.metrics_dir / "log_history.json").read_text())
        finals.append([{k: v for k, v in h.items() if "second" not in k and "runtime" not in k
                        and not k.startswith("peak_memory") and k != "tokens_per_second"} for h in history])
    pd.testing.assert_frame_equal(caches[0], caches[1], check_exact=True)
    assert finals[0] == finals[1]
