"""Training under faults: Ctrl-C, non-finite steps, and which checkpoint is safe to resume from.

- The first Ctrl-C or SIGTERM lets the current step finish, saves a checkpoint and stops; a second one quits at once.
- A non-finite loss or gradient stops training before the optimizer applies it (the last checkpoint stays
  the last good one), naming the step and the rows of its batch; ``skip_nonfinite_steps`` skips such a
  step instead, and counts it. All processes agree on it, and a step the fp16 grad scaler skips is counted too.
- A checkpoint is complete when its ``trainer_state.json`` (the Trainer writes it last) reads back;
  resuming never picks a checkpoint that a kill or a full disk left half-written. A plain rerun resumes from the
  newest complete one, as LLaMA-Factory does; overwrite_output_dir starts over.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import click
import torch
from transformers import TrainerCallback

from . import launch
from .errors import DpoLeanError, Interrupted, Stopped

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


def describe_checkpoint(checkpoint: Path) -> str:
    """'step 40 of 100' from a complete checkpoint's trainer_state.json (', a finished run' at its last step)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    step, total = state.get("global_step"), state.get("max_steps")
    return f"step {step} of {total}" + (", a finished run" if step and total and step >= total else "")


def resume_plan(config) -> tuple[str | None, str]:
    """Where train starts, decided without touching output_dir (:func:`resume_target` acts on it, `dpo-lean config`
    shows it): the checkpoint to resume from (or None) and the line that says so; a one-line error where train
    refuses. As LLaMA-Factory: unset, the newest complete checkpoint in output_dir (a plain rerun continues an
    interrupted run) unless overwrite_output_dir starts over; an adapter there without a checkpoint is refused.
    true: the newest complete one, which must exist; a folder: that checkpoint; false: step 0.
    """
    target, out = config.resume_from_checkpoint, Path(config.output_dir)
    if target is None and config.overwrite_output_dir:
        old = ", ".join(p.name for p in checkpoints(out))
        removing = f"; removing the earlier run's {old}" if old else ""
        return None, f"overwrite_output_dir: true: training starts from step 0 in {out}{removing}"
    if target is False or str(target).lower() == "false":
        return None, "resume_from_checkpoint: false: training starts from step 0"
    if target is None or target is True or str(target).lower() == "true":
        latest = latest_complete(out)
        if latest is not None:
            return str(latest), (f"resuming from {latest} ({describe_checkpoint(latest)}), the newest complete "
                                 f"checkpoint in {out}" + ("; set overwrite_output_dir: true to start over instead"
                                                           if target is None else ""))
        if target is not None:
            raise DpoLeanError(f"config key 'resume_from_checkpoint': true, but {out} holds no complete checkpoint-* "
                               "folder; set it to null to start fresh")
        _check_no_finished_adapter(out)
        return None, ""
    if not Path(target).is_dir():
        raise DpoLeanError(f"config key 'resume_from_checkpoint': {target!r} is not a checkpoint folder")
    if not is_complete(Path(target)):
        raise DpoLeanError(f"config key 'resume_from_checkpoint': {target} is incomplete (no readable "
                           "trainer_state.json; its save was cut short); use an earlier checkpoint or true")
    return str(target), f"resuming from {target} ({describe_checkpoint(Path(target))})"


def resume_target(config) -> str | None:
    """The checkpoint Trainer.train resumes from (:func:`resume_plan`), said in one line. A checkpoint a kill or a
    full disk left half-written is never picked, and is removed; overwrite_output_dir removes the earlier run's
    checkpoints, so that no later rerun resumes from them."""
    out, main = Path(config.output_dir), launch.is_main_process()
    if config.resume_from_checkpoint in (None, True, "true"):
        latest_complete(out, remove_incomplete=main)
    checkpoint, line = resume_plan(config)
    if line:
        launch.say(line)
    if config.resume_from_checkpoint is None and config.overwrite_output_dir and main:
        for path in checkpoints(out):
            shutil.rmtree(path, ignore_errors=True)
    return checkpoint


def _check_no_finished_adapter(out: Path) -> None:
    """Refuse, as LLaMA-Factory does, to train over an adapter output_dir holds with no checkpoint to resume from."""
    found = [n for n in ("adapter_model.safetensors", "adapter_model.bin") if (out / n).is_file()]
    if found:
        raise DpoLeanError(f"output_dir {out} already holds a trained adapter ({found[0]}) and no checkpoint to resume "
                           "from; set overwrite_output_dir: true to train over it, or choose another output_dir")


# ---------------------------------------------------------------- Ctrl-C and SIGTERM

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def launcher_note() -> str:
    """Under torchrun or accelerate launch (torch elastic), how long the launcher lets this process finish after it
    forwards a signal before it SIGKILLs it; '' in a plain run."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and launch.world_size() == 1:
        return ""
    value = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    timeout = (f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={value}" if value else
               "TORCH_ELASTIC_SHUTDOWN_TIMEOUT is unset (30 s, unless torchrun --shutdown-timeout set another)")
    return (f"; under a launcher: {timeout}: the launcher SIGKILLs this process that long after it forwards the "
            "signal, so raise it if a step and a save take longer")


class GracefulStop:
    """SIGINT (Ctrl-C) and SIGTERM (SLURM, Kubernetes, `timeout`, a preempted machine; torchrun forwards both): the
    first asks the running loop to stop at its next safe point (``requested``, ``signum``); a second one stops at
    once (:class:`Stopped`). Handlers are installed from :meth:`start` (main thread only) until :meth:`close`."""

    def __init__(self, doing: str):
        self.doing = doing  # what happens now, for the message: "finishing this step and saving a checkpoint"
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Stopped(signum)
        self.signum = signum
        if launch.is_main_process():
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            click.echo(f"\n{name}: {self.doing} (a second Ctrl-C or SIGTERM stops at once)"
                       f"{launcher_note()}", err=True)

    def start(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> GracefulStop:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class AgreedStop:
    """``stop.requested``, asked before each step of a loop; with ``agree`` (a collective: the largest signal number
    over the processes), agreed by all processes, so that they stop before the same step even where only one was
    signalled (FSDP's forwards are collective). ``decided``: the last answer, without asking again; ``signum``: the
    signal agreed on."""

    def __init__(self, stop: GracefulStop, agree: Callable[[int], int] | None = None):
        self.stop, self.agree, self.signum = stop, agree, None

    @property
    def decided(self) -> bool:
        return self.signum is not None

    @property
    def requested(self) -> bool:
        signum = self.stop.signum or 0
        self.signum = (self.agree(signum) if self.agree is not None else signum) or None
        return self.decided


def until_stopped(items, stop: GracefulStop | AgreedStop):
    """``items`` until ``stop`` is requested (checked before each one is taken)."""
    for item in items:
        if stop.requested:
            return
        yield item


class StopOnInterrupt(TrainerCallback):
    """Ctrl-C or SIGTERM: finish the step, save a checkpoint, stop. Processes of a distributed run agree on the step
    (and on the signal, for the exit status)."""

    def __init__(self):
        self.stop = GracefulStop("finishing this step and saving a checkpoint")
        self.signum: int | None = None  # the signal, once every process agreed to stop

    @property
    def interrupted(self) -> bool:
        return self.signum is not None

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.start()

    def on_step_end(self, args, state, control, **kwargs):
        signum = launch.agree_max(self.stop.signum or 0, args.device)
        if signum:
            self.signum = signum
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.stop.close()

    def error(self, step: int, output_dir: Path) -> Interrupted:
        """What train raises once stopped: the step, the checkpoint saved, how to go on; the signal's exit status."""
        by = "" if self.signum == signal.SIGINT else f" by {signal.Signals(self.signum).name}"
        return Interrupted(f"interrupted{by} at step {step}; checkpoint saved to {latest_complete(output_dir)}; rerun "
                           "`dpo-lean train CONFIG.yaml` to resume from it", self.signum)


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
    resume = (f"; free space and rerun `dpo-lean train CONFIG.yaml`: it resumes from {last}" if last
              else "; free space or choose another output_dir")
    return DpoLeanError(f"cannot write {error.filename or output_dir}: {error.strerror or error}{resume}")
