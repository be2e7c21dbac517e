"""The learning-rate schedule: lr_scheduler_kwargs read as LLaMA-Factory reads them and checked when the config
loads, and the learning rates training really steps through, against schedules computed by hand."""

from __future__ import annotations

import inspect
import math

import pytest
import yaml

from dpo_lean import lr_schedule
from dpo_lean.config import SCHEDULERS, load_config
from dpo_lean.errors import DpoLeanError


def write(tmp_path, raw: dict, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def base(tmp_path):
    from conftest import FIXTURES
    from make_fixtures import fixture_config

    return {**fixture_config(FIXTURES), "output_dir": str(tmp_path / "out")}


@pytest.mark.parametrize("how", ["yaml mapping", "yaml json string", "command line json", "command line flow"])
def test_lr_scheduler_kwargs_are_read_as_llamafactory_reads_them(base, tmp_path, how):
    """A mapping in the YAML (LF's examples), a JSON string (what transformers' TrainingArguments parses), or either
    on the command line; numbers written as strings (YAML 1.1 reads 1e-1 so) become numbers."""
    raw = {**base, "lr_scheduler_type": "cosine_with_min_lr"}
    overrides = []
    if how == "yaml mapping":
        raw["lr_scheduler_kwargs"] = {"min_lr_rate": "1e-1", "num_cycles": 0.5}
    elif how == "yaml json string":
        raw["lr_scheduler_kwargs"] = '{"min_lr_rate": 0.1, "num_cycles": 0.5}'
    elif how == "command line json":
        overrides = ['lr_scheduler_kwargs={"min_lr_rate": 0.1, "num_cycles": 0.5}']
    else:
        overrides = ["lr_scheduler_kwargs={min_lr_rate: 0.1, num_cycles: 0.5}"]
    config = load_config(write(tmp_path, raw), overrides)
    assert config.lr_scheduler_kwargs == {"min_lr_rate": 0.1, "num_cycles": 0.5}
    assert type(config.lr_scheduler_kwargs["min_lr_rate"]) is float


@pytest.mark.parametrize("kind, kwargs, fragments", [
    ("cosine_with_min_lr", None, ["cosine_with_min_lr needs min_lr", "min_lr_rate"]),
    ("cosine_with_min_lr", {"min_lr": 1e-7, "min_lr_rate": 0.1}, ["only one of min_lr", "min_lr_rate"]),
    ("warmup_stable_decay", {"num_decay_step": 5}, ["'num_decay_step' is not an argument", "num_decay_steps"]),
    ("warmup_stable_decay", {"decay_type": "exp"}, ["decay_type", "'exp'", "linear, cosine, 1-sqrt"]),
    ("warmup_stable_decay", {"num_decay_steps": 2.5}, ["num_decay_steps", "2.5", "an integer"]),
    ("linear", {"num_cycles": 1}, ["'num_cycles' is not an argument of lr_scheduler_type linear",
                                   "takes no lr_scheduler_kwargs"]),
    ("constant", {"min_lr": 0.0}, ["lr_scheduler_type constant", "takes no lr_scheduler_kwargs"]),
    ("polynomial", {"lr_end": 1e-3}, ["lr_end (0.001) must be smaller than learning_rate"]),
    ("cosine_with_restarts", {"num_cycles": "two"}, ["num_cycles", "'two'", "an integer"]),
    ("cosine", {"num_cycles": float("nan")}, ["num_cycles", "nan"]),
    ("reduce_lr_on_plateau", {"factor": 2}, ["factor 2 must be < 1"]),
])
def test_a_wrong_combination_is_one_line_naming_the_argument(base, tmp_path, kind, kwargs, fragments):
    raw = {**base, "lr_scheduler_type": kind, "learning_rate": 1e-4, "val_size": 8,
           **({"lr_scheduler_kwargs": kwargs} if kwargs is not None else {})}
    with pytest.raises(DpoLeanError) as err:
        load_config(write(tmp_path, raw))
    message = str(err.value)
    assert "'lr_scheduler_kwargs'" in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("text, fragment", [('{"min_lr_rate": 0.1', "not valid JSON"), ("[0.1]", "not allowed"),
                                            ("{1: 2}", "not allowed")])
def test_lr_scheduler_kwargs_that_are_no_mapping_are_refused(base, tmp_path, text, fragment):
    with pytest.raises(DpoLeanError) as err:
        load_config(write(tmp_path, {**base, "lr_scheduler_type": "cosine"}), [f"lr_scheduler_kwargs={text}"])
    assert "'lr_scheduler_kwargs'" in str(err.value) and fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("raw, fragment", [
    ({"lr_scheduler_type": "constant", "warmup_ratio": 0.1}, "constant has no warmup; set warmup_ratio to 0 or use "
                                                             "constant_with_warmup"),
    ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "needs evaluation"),
])
def test_a_schedule_that_would_ignore_or_lack_what_it_needs_is_refused(base, tmp_path, raw, fragment):
    with pytest.raises(DpoLeanError) as err:
        load_config(write(tmp_path, {**base, **raw}))
    assert fragment in str(err.value)


def test_the_cli_refuses_the_combination_before_anything_loads(base, tmp_path, monkeypatch):
    """`dpo-lean train` with cosine_with_min_lr and no kwargs: exit 1, one line, and no model or data loaded."""
    from click.testing import CliRunner

    from dpo_lean import cli, modeling

    def loaded(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the config was checked")

    monkeypatch.setattr(modeling, "load_tokenizer", loaded)
    monkeypatch.setattr(modeling, "prepare_policy", loaded)
    result = CliRunner().invoke(cli.main, ["train", str(write(tmp_path, {**base, "lr_scheduler_type": "cosine_with_min_lr"}))])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "min_lr_rate" in lines[0], result.output


def test_every_argument_the_table_allows_is_one_the_installed_transformers_takes():
    """SCHEDULER_KWARGS against the schedule functions transformers' get_scheduler calls (torch's ReduceLROnPlateau
    for reduce_lr_on_plateau); constant and constant_with_warmup are called with no extra arguments at all."""
    import torch
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    assert set(lr_schedule.SCHEDULER_KWARGS) == set(SCHEDULERS)
    for kind, allowed in lr_schedule.SCHEDULER_KWARGS.items():
        function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(kind)]
        if kind == "reduce_lr_on_plateau":
            function = torch.optim.lr_scheduler.ReduceLROnPlateau
        params = set(inspect.signature(function).parameters) - {"optimizer", "num_warmup_steps",
                                                                 "num_training_steps", "last_epoch"}
        assert set(allowed) <= params, (kind, set(allowed) - params)
        if kind in ("constant", "constant_with_warmup"):
            assert not allowed


# ---------------------------------------------------------------- the learning rates training steps through

LR, STEPS = 1e-3, 8


def linear_warmup_then(decay):
    """Hand-written schedules: multiplier of the learning rate at optimizer step s (0-based), warmup w steps."""
    def at(s, w):
        return s / max(1, w) if s < w else decay(s, w)
    return at


def cosine_min(rate):
    return linear_warmup_then(lambda s, w: rate + (1 - rate) * 0.5 * (1 + math.cos(math.pi * (s - w) / (STEPS - w))))


def wsd(stable, decay_steps):
    def after_warmup(s, w):
        if s < w + stable:
            return 1.0
        progress = (s - w - stable) / max(1, decay_steps)
        return 0.5 * (1 + math.cos(math.pi * progress)) if s < w + stable + decay_steps else 0.0
    return linear_warmup_then(after_warmup)


CASES = {
    # warmup_ratio 1.0: the whole run warms up (transformers 5 reads a warmup_steps of 1.0 as one step)
    "warmup_ratio_1": ({"lr_scheduler_type": "linear", "warmup_ratio": 1.0}, STEPS, linear_warmup_then(lambda s, w: 0.0)),
    "warmup_ratio_0.3": ({"lr_scheduler_type": "linear", "warmup_ratio": 0.3}, 3,  # ceil(0.3 x 8)
                         linear_warmup_then(lambda s, w: (STEPS - s) / (STEPS - w))),
    "cosine_with_min_lr": ({"lr_scheduler_type": "cosine_with_min_lr", "warmup_ratio": 0.25,
                            "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}, 2, cosine_min(0.1)),
    # LF's split of the 6 steps after warmup: a third stable (2), the rest decaying (4)
    "wsd_lf_split": ({"lr_scheduler_type": "warmup_stable_decay", "warmup_steps": 2}, 2, wsd(2, 4)),
    "wsd_decay_given": ({"lr_scheduler_type": "warmup_stable_decay", "warmup_steps": 1,
                         "lr_scheduler_kwargs": {"num_decay_steps": 3}}, 1, wsd(4, 3)),
}


@pytest.mark.parametrize("case", CASES)
def test_the_trainers_scheduler_steps_through_the_hand_computed_learning_rates(tiny_config, case):
    """The scheduler DPOLeanTrainer builds from the config for an 8-step run: its learning rate at each step equals
    learning_rate x the hand-written schedule."""
    import torch
    import transformers

    from dpo_lean import train

    settings, warmup, multiplier = CASES[case]
    config = tiny_config(max_steps=STEPS, learning_rate=LR, **settings)
    trainer = train.DPOLeanTrainer(model=torch.nn.Linear(2, 2), args=train.training_arguments(config, False), dpo=config)
    transformers.Trainer.create_optimizer(trainer)  # the plain optimizer (the non-finite guard needs a live step)
    trainer.create_scheduler(STEPS, trainer.optimizer)
    seen = []
    for _ in range(STEPS):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    expected = [LR * multiplier(s, warmup) for s in range(STEPS)]
    assert seen == pytest.approx(expected, rel=1e-6, abs=1e-12), (seen, expected)


def test_training_warms_up_over_the_whole_run_with_warmup_ratio_1(tiny_config):
    """A real run of 4 steps with warmup_ratio 1.0: each step's learning rate, read from the optimizer as the step
    begins, is learning_rate x step / 4 (it was the full rate from step 2 on)."""
    import transformers

    from dpo_lean import train

    seen = []

    class Record(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            seen.append(optimizer.param_groups[0]["lr"])

    real_init = train.DPOLeanTrainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.add_callback(Record())

    config = tiny_config(max_steps=4, learning_rate=LR, warmup_ratio=1.0, lr_scheduler_type="linear", logging_steps=4,
                         save_strategy="no", plot_loss=False, lora_rank=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.DPOLeanTrainer, "__init__", init)
        train.run_train(config)
    assert seen == pytest.approx([0.0, LR / 4, LR / 2, 3 * LR / 4], rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("given, total, warmup, expected", [
    ({}, 8, 2, {"num_decay_steps": 4}),  # LF: a third of the 6 steps after warmup stable, the rest decaying
    ({}, 100, 10, {"num_decay_steps": 60}),
    ({"num_decay_steps": 3}, 8, 1, {"num_decay_steps": 3}),  # transformers gives the stable phase the rest (4)
    ({"num_stable_steps": 5}, 8, 1, {"num_stable_steps": 5, "num_decay_steps": 2}),
    ({"num_stable_steps": 5, "num_decay_steps": 1}, 8, 1, {"num_stable_steps": 5, "num_decay_steps": 1}),
])
def test_warmup_stable_decay_fills_in_what_is_missing(given, total, warmup, expected):
    assert lr_schedule.scheduler_kwargs("warmup_stable_decay", given, total, warmup) == expected


@pytest.mark.parametrize("given", [{"num_decay_steps": 9}, {"num_stable_steps": 9}])
def test_warmup_stable_decay_phases_longer_than_the_run_are_one_line(given):
    with pytest.raises(DpoLeanError) as err:
        lr_schedule.scheduler_kwargs("warmup_stable_decay", given, 8, 1)
    assert "do not fit the 7 steps after warmup (8 optimizer steps in all, 1 warming up)" in str(err.value)
