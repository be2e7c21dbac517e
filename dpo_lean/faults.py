"""Training under faults: Ctrl-C, non-finite steps, and which checkpoint is safe to resume from.

- The first Ctrl-C lets the current step finish, saves a checkpoint and stops; a second one quits at once.
- A non-finite loss or gradient stops training before the optimizer applies it (the last checkpoint stays
  the last good one), naming the step and the rows of its batch; ``skip_nonfinite_steps`` skips such a
  step instead, and counts it.
- A checkpoint is complete when its ``trainer_state.json`` (the Trainer writes it last) reads back;
  resuming never picks a checkpoint that a kill or a full disk left half-written.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path

import click
import torch
from transformers import TrainerCallback

from .errors import DpoLeanError

CHECKPOINT_PREFIX = "checkpoint-"


class NonFiniteStep(Exception):
    """A step whose loss or gradients are NaN or infinite (raised before the optimizer applies it)."""

    def __init__(self, step: int, rows: list[int]):
        super().__init__(f"step {step}")
        self.step, self.rows = step, rows


# ---------------------------------------------------------------- checkpoints


def is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders of output_dir, newest (highest N) first."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), reverse=True)


def latest_complete(output_dir: Path, remove_incomplete: bool = False) -> Path | None:
    """The newest complete checkpoint; newer half-written ones are reported (and removed when asked)."""
    for path in checkpoints(output_dir):
        if is_complete(path):
            return path
        if remove_incomplete:
            click.echo(f"{path.name} is incomplete (its save was cut short); removing it", err=True)
            shutil.rmtree(path, ignore_errors=True)
    return None


# ---------------------------------------------------------------- Ctrl-C


class StopOnInterrupt(TrainerCallback):
    """SIGINT: finish the step, save a checkpoint, stop. Processes of a distributed run agree on the step."""

    def __init__(self):
        self.interrupted = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        click.echo("\ninterrupted: finishing this step and saving a checkpoint (Ctrl-C again to quit now)", err=True)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.interrupted
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([float(flag)], device=args.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            self.interrupted = True
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


# ---------------------------------------------------------------- non-finite steps


def _finite(params) -> bool:
    return all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)


def guard_optimizer(optimizer: torch.optim.Optimizer, trainer, skip: bool) -> None:
    """Check the gradients before every optimizer step: stop (NonFiniteStep) or skip and count."""
    step = optimizer.step
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def guarded_step(*args, **kwargs):
        rows, trainer.window_rows = trainer.window_rows, []
        if trainer.window_finite and _finite(params):
            trainer.window_finite = True
            return step(*args, **kwargs)
        trainer.window_finite = True
        if not skip:
            raise NonFiniteStep(trainer.state.global_step + 1, rows)
        trainer.nonfinite_steps_skipped += 1
        click.echo(f"step {trainer.state.global_step + 1}: non-finite loss or gradients; step skipped "
                   f"(rows {rows[:20]})", err=True)
        return None

    optimizer.step = guarded_step


def nonfinite_message(error: NonFiniteStep, output_dir: Path) -> str:
    last = latest_complete(output_dir)
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
    rows = ", ".join(map(str, error.rows[:20])) + (" ..." if len(error.rows) > 20 else "")
    return (f"non-finite loss or gradients at step {error.step} (batch rows {rows}); training stopped and {where}; "
            "lower learning_rate, check those rows, or set skip_nonfinite_steps: true")


def write_error_message(error: OSError, output_dir: Path) -> DpoLeanError:
    last = latest_complete(output_dir)
    resume = (f"; free space and resume from {last} with resume_from_checkpoint=true" if last
              else "; free space or choose another output_dir")
    return DpoLeanError(f"cannot write {error.filename or output_dir}: {error.strerror or error}{resume}")
