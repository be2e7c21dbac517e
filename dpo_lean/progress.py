"""Progress on the terminal: a bar for every long stage (tokenising, hashing, precompute, training), and for training
one line per log step where stderr is not a terminal (a log file a user tails).

    with bar(total, "tokenising", "row") as progress: ...   # tqdm: done/total, rate, ETA; only once it is slow
    TrainProgress(show_bar)                                   # train's bar, its plan line and its log lines
"""

from __future__ import annotations

import sys
import time

import click
from tqdm.auto import tqdm
from transformers import TrainerCallback

from . import launch

DELAY = 2.0  # seconds: a stage that ends sooner shows no bar
FILE_INTERVAL = 30.0  # seconds between a bar's refreshes in a file (a terminal: 0.1)
FIRST = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
         "logps/rejected", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_gb")
SHORT = {"learning_rate": "lr", "tokens_per_second": "tok/s", "peak_memory_gb": "peak GB"}
HIDDEN = ("epoch", "step", "total_flos")


def is_terminal() -> bool:
    return sys.stderr.isatty()


def bar(total: float | None, desc: str, unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar on stderr, as precompute's (done/total, rate, ETA), that shows only once the work has taken DELAY
    seconds, refreshes every FILE_INTERVAL seconds when stderr is a file, and only on the main process."""
    options = dict(total=total, desc=desc, unit=unit, dynamic_ncols=True, delay=DELAY,
                   mininterval=0.1 if is_terminal() else FILE_INTERVAL, disable=not launch.is_main_process())
    return tqdm(**{**options, **kwargs})


def duration(seconds: float) -> str:
    """12 s, 3m05s, 2h07m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    return f"{minutes}m{s:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _value(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1000:
        return f"{int(v):,}"
    return f"{v:.4g}"


def log_line(logs: dict, step: int, max_steps: int) -> str:
    """One log event as one line: 'step 10/48 | loss 0.6931 | rewards/accuracies 0.625 | ...' ('eval at step ...'
    for an evaluation, 'done: ...' for the train summary)."""
    if "train_runtime" in logs:
        loss = f", train_loss {_value(logs['train_loss'])}" if "train_loss" in logs else ""
        return f"done: {step} steps in {duration(logs['train_runtime'])}{loss}"
    is_eval = any(k.startswith("eval_") for k in logs)
    timing = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")  # Trainer's, of the evaluation
    metrics = {k.removeprefix("eval_"): v for k, v in logs.items() if k not in HIDDEN and k not in timing}
    order = [k for k in FIRST if k in metrics] + sorted(set(metrics) - set(FIRST))
    where = f"{'eval at ' if is_eval else ''}step {step}/{max_steps}"
    return " | ".join([where, *(f"{SHORT.get(k, k)} {_value(metrics[k])}" for k in order)])


class TrainProgress(TrainerCallback):
    """What train prints while it runs (main process only): at the start, the optimizer steps, epochs and pairs per
    step it will run; in a terminal, a bar (steps done of the total, rate, ETA) with each log line above it; where
    stderr is not a terminal, or with ``show_bar`` false (disable_tqdm), one line per log step with the time spent
    and the ETA. It replaces transformers' ProgressCallback and PrinterCallback, which print the metrics dict."""

    def __init__(self, show_bar: bool = True):
        self.show_bar = show_bar
        self.bar = self.eval_bar = None
        self.t0, self.first_step = time.perf_counter(), 0

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        self.t0, self.first_step = time.perf_counter(), state.global_step
        click.echo(plan_line(args, state, train_dataloader))
        if self.show_bar and is_terminal():
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bar is None or eval_dataloader is None:
            return
        if self.eval_bar is None:
            self.eval_bar = tqdm(total=len(eval_dataloader), desc="evaluating", unit="batch", leave=False,
                                 dynamic_ncols=True)
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = log_line(logs, state.global_step, state.max_steps)
        if self.bar is not None:
            self.bar.write(line)  # above the bar, on stdout with the run's other lines
            return
        done, elapsed = state.global_step - self.first_step, time.perf_counter() - self.t0
        if done > 0 and "train_runtime" not in logs:
            left = (state.max_steps - state.global_step) * elapsed / done
            line += f" | {duration(elapsed)} elapsed, ETA {duration(left)}"
        click.echo(line)

    def on_train_end(self, args, state, control, **kwargs):
        for b in (self.eval_bar, self.bar):
            if b is not None:
                b.close()
        self.bar = self.eval_bar = None


def plan_line(args, state, train_dataloader=None) -> str:
    """'training: 48 optimizer steps (3 epochs of 16), 4 pairs per step (4 per device x 1 accumulation x 1 process)'."""
    per_device, accumulation, processes = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size
    count, per_epoch = args.num_train_epochs, None
    if train_dataloader is not None and len(train_dataloader):
        per_epoch = -(-len(train_dataloader) // accumulation)  # as Trainer counts them: a last partial step counts
        count = state.max_steps / per_epoch if args.max_steps > 0 else count
    epochs = f"{count:.3g} epoch{'' if count == 1 else 's'}" + (f" of {per_epoch}" if per_epoch else "")
    line = (f"training: {state.max_steps} optimizer steps ({epochs}), {per_device * accumulation * processes} pairs "
            f"per step ({per_device} per device x {accumulation} accumulation x {processes} "
            f"process{'es' if processes > 1 else ''})")
    return line + (f"; from step {state.global_step}" if state.global_step else "")
