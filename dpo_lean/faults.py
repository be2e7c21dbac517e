"""Training under faults: Ctrl-C, non-finite steps, and which checkpoint is safe to resume from.

- The first Ctrl-C lets the current step finish, saves a checkpoint and stops; a second one quits at once.
- A non-finite loss or gradient stops training before the optimizer applies it (the last checkpoint stays
  the last good one), naming the step and the rows of its batch; ``skip_nonfinite_steps`` skips such a
  step instead, and counts it. All processes agree on it, and a step the fp16 grad scaler skips is counted too.
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


def finite_flag(grads: list[torch.Tensor], losses_finite: torch.Tensor | None, device) -> torch.Tensor:
    """1.0 where every gradient and loss is finite, else 0.0, as a device tensor: no host sync.

    One fused max-abs per gradient (``torch._foreach_norm(grads, inf)``, which is NaN or inf exactly when the
    tensor holds one, and cannot overflow as a 2-norm can), stacked and tested at once.
    """
    flag = torch.ones((), device=device)
    if grads:
        norms = torch._foreach_norm(grads, float("inf"))
        norms = torch.stack(norms if len({n.dtype for n in norms}) == 1 else [n.float() for n in norms])
        flag = flag * torch.isfinite(norms).all().to(flag.device)
    if losses_finite is not None:
        flag = flag * losses_finite.to(flag.device)
    return flag


def _local(grad: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP gradient (a DTensor); other gradients as they are. Every process checks its
    own shard and _agreed combines the verdicts, so the whole gradient is checked."""
    from torch.distributed.tensor import DTensor

    return grad.to_local() if isinstance(grad, DTensor) else grad


def _agreed(flag: torch.Tensor) -> bool:
    """The flag, all-reduced (MIN) over the processes of a distributed run: all of them step, or none does."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())  # the step's one host sync


class NonFiniteGuard(TrainerCallback):
    """Checks every optimizer step before it applies: a non-finite loss or gradient stops training
    (NonFiniteStep) or, with ``skip``, skips the step and counts it. The decision is agreed by every process
    (one process skipping while the others step would desynchronise DDP). A step the fp16 grad scaler skips
    (gradients overflowed at its loss scale) is counted and reported alike, in ``grad_scaler_steps_skipped``.

    The trainer calls :meth:`observe` on each training micro-batch and :meth:`wrap` on its optimizer.
    """

    def __init__(self, skip: bool):
        self.skip = skip
        self.skipped = 0  # non-finite steps skipped by dpo-lean
        self.scaler_skipped = 0  # steps the fp16 grad scaler skipped
        self.accelerator = None  # the trainer's, to ask whether its grad scaler skipped the step
        self._rows: list[torch.Tensor] = []  # row indices of the micro-batches of the step being accumulated
        self._losses_finite: torch.Tensor | None = None
        self._checked = False  # the wrapped step ran for this step (else the scaler skipped it)

    def observe(self, row_index: torch.Tensor, losses: torch.Tensor) -> None:
        """Note a training micro-batch's rows and whether its losses are finite, without a host sync."""
        self._rows.append(row_index.detach())
        finite = torch.isfinite(losses.detach()).all()
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite

    def rows(self) -> list[int]:
        return torch.cat(self._rows).tolist() if self._rows else []

    def wrap(self, optimizer: torch.optim.Optimizer, step_number) -> None:
        """Check the gradients (of the parameters the optimizer holds at step time) before every step."""
        step = optimizer.step

        def guarded_step(*args, **kwargs):
            self._checked = True
            grads = [_local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            device = grads[0].device if grads else optimizer.param_groups[0]["params"][0].device
            if _agreed(finite_flag(grads, self._losses_finite, device)):
                return step(*args, **kwargs)
            self._nonfinite(step_number())
            return None

        optimizer.step = guarded_step

    def _nonfinite(self, step: int) -> None:
        if not self.skip:
            raise NonFiniteStep(step, self.rows())
        self.skipped += 1
        click.echo(f"step {step}: non-finite loss or gradients; step skipped (rows {self.rows()[:20]})", err=True)

    def on_optimizer_step(self, args, state, control, **kwargs):
        """After every optimizer step (applied or not): account a step the fp16 grad scaler skipped, reset."""
        scaler_skipped = self.accelerator is not None and self.accelerator.optimizer_step_was_skipped
        if scaler_skipped and not self._checked:
            losses_finite = self._losses_finite is None or _agreed(self._losses_finite.float())
            if not losses_finite:  # a non-finite loss, not a loss-scale overflow: as dpo-lean's own check
                self._nonfinite(state.global_step + 1)
            else:
                self.scaler_skipped += 1
                click.echo(f"step {state.global_step + 1}: fp16 gradients overflowed at the grad scaler's loss "
                           f"scale; it skipped the step and lowers the scale (rows {self.rows()[:20]})", err=True)
        self._rows, self._losses_finite, self._checked = [], None, False


def check_deepspeed(deepspeed: str | None) -> None:
    """Refuse a DeepSpeed config that brings its own optimizer: DeepSpeed builds it instead of the Trainer, so
    dpo-lean's non-finite-step guard (faults.NonFiniteGuard) would never see its steps."""
    if not deepspeed:
        return
    try:
        text = deepspeed if deepspeed.lstrip().startswith("{") else Path(deepspeed).read_text(encoding="utf-8")
        ds = json.loads(text)
    except (OSError, ValueError) as e:
        raise DpoLeanError(f"config key 'deepspeed': cannot read {deepspeed!r} as a JSON DeepSpeed config ({e})") from None
    if isinstance(ds, dict) and "optimizer" in ds:
        raise DpoLeanError(f"config key 'deepspeed': {deepspeed} defines an \"optimizer\", which bypasses dpo-lean's "
                           "non-finite-step guard; remove that block (optim, learning_rate and the adam_* keys set the optimizer)")


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
