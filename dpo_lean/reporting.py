"""Training metrics on disk: a CSV per log event, the raw log history, a summary and a curves figure.

Everything is written atomically (temp file in the same directory + ``os.replace``), so a reader
never sees a half-written file. Write failures become :class:`DpoLeanError` naming the path.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .errors import DpoLeanError
from .storage import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

TRL_METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_gb",
    "peak_memory_reserved_gb",
)
PLOT_PANELS = ("loss", "rewards/margins", "rewards/accuracies", "learning_rate")
UNSMOOTHED = frozenset({"learning_rate"})  # a schedule, not a noisy measurement: smoothing only adds lag
EVAL_PREFIX = "eval_"
POSITION_KEYS = ("step", "epoch")

CSV_NAME = "training_metrics.csv"
HISTORY_NAME = "log_history.json"
SUMMARY_NAME = "summary.json"
PLOT_NAME = "training_curves.png"


# --- history parsing -------------------------------------------------------------------------

def _is_train_summary(entry: dict) -> bool:
    """The entry transformers logs once at train end (``train_loss``, ``total_flos``, ``train_runtime``...)."""
    return "train_loss" in entry or "total_flos" in entry


def _rows(history: list[dict]) -> Iterator[tuple[str, dict]]:
    """Yield ``(split, metrics)`` per train/eval log; eval keys lose their ``eval_`` prefix.

    ``metrics`` keeps ``step`` and ``epoch``; the final train summary entry is skipped.
    """
    for entry in history:
        if _is_train_summary(entry):
            continue
        if any(k.startswith(EVAL_PREFIX) for k in entry):
            yield "eval", {k.removeprefix(EVAL_PREFIX): v for k, v in entry.items()}
        else:
            yield "train", dict(entry)


def _metric_columns(rows: list[tuple[str, dict]]) -> list[str]:
    """Union of metric names: TRL names first (in TRL order), then the rest alphabetically."""
    seen = {k for _, m in rows for k in m if k not in POSITION_KEYS}
    return [k for k in TRL_METRICS if k in seen] + sorted(seen.difference(TRL_METRICS))


def _scalar(value: Any) -> Any:
    """numpy / torch 0-d values as plain Python numbers; anything else unchanged."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _number(value: Any) -> float | None:
    """A finite-or-NaN float for plotting and ranking, or None for a non-number."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# --- CSV -------------------------------------------------------------------------------------

def write_metrics_csv(history: list[dict], path: str | os.PathLike) -> None:
    """One row per train/eval log: ``split, step, epoch`` then every metric seen; blanks where missing."""
    rows = list(_rows(history))
    header = ["split", *POSITION_KEYS, *_metric_columns(rows)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for split, metrics in rows:
        cells = {k: _scalar(v) for k, v in metrics.items()}
        writer.writerow([split, *("" if cells.get(k) is None else cells[k] for k in header[1:])])
    atomic_write_text(path, buf.getvalue())


# --- JSON ------------------------------------------------------------------------------------

def _json_safe(value: Any) -> Any:
    """Plain JSON types: scalars unwrapped, NaN/inf to None, paths and unknown objects to str."""
    value = _scalar(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_json_safe(v) for v in value), key=str)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _json_safe(dataclasses.asdict(value))
    if hasattr(value, "tolist"):
        return _json_safe(value.tolist())
    return str(value)


def _write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic, indented, strictly valid JSON."""
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")


def write_log_history(history: list[dict], path: str | os.PathLike) -> None:
    """The log history exactly as transformers holds it, JSON-safe."""
    _write_json(path, history)


def _best_eval(evals: list[dict]) -> dict | None:
    """The eval with the highest ``rewards/accuracies``; ties go to the lowest ``loss``. NaN counts as missing."""
    def key(m: dict) -> tuple[float, float]:
        acc, loss = _number(m.get("rewards/accuracies")), _number(m.get("loss"))
        acc = acc if acc is not None and not math.isnan(acc) else -math.inf
        loss = loss if loss is not None and not math.isnan(loss) else math.inf
        return acc, -loss
    return max(evals, key=key) if evals else None


def _summarize(history: list[dict]) -> dict:
    """The summary fields derivable from the history alone."""
    rows = list(_rows(history))
    train = [m for split, m in rows if split == "train"]
    evals = [m for split, m in rows if split == "eval"]
    end = next((e for e in reversed(history) if _is_train_summary(e)), {})
    last = history[-1] if history else {}
    def peak(key: str) -> float | None:
        values = [p for m in train if (p := _number(m.get(key))) is not None and not math.isnan(p)]
        return max(values) if values else None

    summary = {
        "final": train[-1] if train else None,
        "final_eval": evals[-1] if evals else None,
        "best_eval": _best_eval(evals),
        "runtime_seconds": end.get("train_runtime"),
        "train_tokens_per_second": None,
        "peak_memory_gb": peak("peak_memory_gb"),
        "peak_memory_reserved_gb": peak("peak_memory_reserved_gb"),  # CUDA only: left out on CPU
        "global_step": end.get("step", last.get("step")),
        "epochs": end.get("epoch", last.get("epoch")),
        "train_loss": end.get("train_loss"),
    }
    return {k: v for k, v in summary.items()
            if not (k in ("final_eval", "best_eval", "peak_memory_reserved_gb") and v is None)}


def write_summary(history: list[dict], path: str | os.PathLike, extra: dict | None = None) -> dict:
    """Write ``summary.json`` (history-derived fields, then ``extra`` on top) and return it JSON-safe."""
    summary = _json_safe({**_summarize(history), **(extra or {})})
    _write_json(path, summary)
    return summary


# --- plotting --------------------------------------------------------------------------------

def smooth(values: list[float], alpha: float = 0.2) -> list[float]:
    """Exponential moving average: ``s[0] = v[0]``, ``s[i] = alpha*v[i] + (1-alpha)*s[i-1]``.

    A NaN value repeats the previous smoothed value (NaN before any finite value) without poisoning the rest.
    """
    out: list[float] = []
    state = math.nan
    for v in values:
        if not math.isnan(v):
            state = v if math.isnan(state) else alpha * v + (1 - alpha) * state
        out.append(state)
    return out


def _series(rows: list[tuple[str, dict]], split: str, metric: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of one metric in one split, numbers only."""
    points = [(_number(m.get("step")), _number(m.get(metric))) for s, m in rows if s == split]
    points = [(x, y) for x, y in points if x is not None and y is not None]
    return [x for x, _ in points], [y for _, y in points]


def _draw_panel(ax, rows: list[tuple[str, dict]], metric: str) -> None:
    """One metric against step (whole-number ticks: a short run's steps are not 1.25, 1.5): train raw + smoothed,
    eval points."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(metric)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    steps, values = _series(rows, "train", metric)
    marker = "o" if len(steps) == 1 else None
    if steps and metric in UNSMOOTHED:
        ax.plot(steps, values, color="C0", linewidth=2, label="train", marker=marker)
    elif steps:
        alpha = min(0.5, max(0.02, 20 / len(values)))  # the EMA spans ~5% of the run
        ax.plot(steps, values, color="C0", linewidth=0.8, alpha=0.35, marker=marker)
        ax.plot(steps, smooth(values, alpha), color="C0", linewidth=2, label="train (smoothed)", marker=marker)
    eval_steps, eval_values = _series(rows, "eval", metric)
    if eval_steps:
        ax.plot(eval_steps, eval_values, color="C1", linewidth=1.5, marker="o", label="eval")
    if steps or eval_steps:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.grid(True, alpha=0.3)


def plot_curves(history: list[dict], path: str | os.PathLike) -> None:
    """Save a 2x2 PNG of loss, reward margins, reward accuracies and learning rate against step."""
    fig = draw_curves(history)
    import matplotlib.pyplot as plt

    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)


def draw_curves(history: list[dict]):
    """The 2x2 figure of loss, reward margins, reward accuracies and learning rate against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(_rows(history))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, metric in zip(axes.flat, PLOT_PANELS):
        _draw_panel(ax, rows, metric)
    return fig


def save_figure(fig, path: str | os.PathLike) -> None:
    """Lay out ``fig``, render it to PNG and write it atomically."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


# --- callback --------------------------------------------------------------------------------

def step0_report(logratios) -> tuple[dict[str, float], str]:
    """How far policy and reference start apart: the means of [pairs, 2] (policy - reference log-probs of chosen,
    rejected) over the first step's pairs, and the line train prints."""
    chosen, rejected = logratios.double().mean(0).tolist()
    message = (f"step 0: mean log-ratio policy - reference over the first step's {len(logratios)} pairs: chosen "
               f"{chosen:+.4f}, rejected {rejected:+.4f} nats (the reference is not the starting point, so the "
               "step-0 loss is not ln 2)")
    return {"chosen": chosen, "rejected": rejected, "pairs": len(logratios)}, message


def tie_note(accuracies) -> str:
    """Where dpo-lean's reward accuracy differs from TRL's and LLaMA-Factory's: ``accuracies`` holds each pair's
    (1 right, 0 wrong, 0.5 a tie: equal rewards, as where the policy is still the reference); dpo-lean counts a tie
    as half, TRL 1.16 (``(chosen_rewards > rejected_rewards).float()``) and LF as a miss. One line, or '' with no tie."""
    ties, n = int((accuracies == 0.5).sum()), len(accuracies)
    if not ties:
        return ""
    ours, theirs = float(accuracies.double().mean()), float((accuracies == 1).double().mean())
    return (f"rewards/accuracies: {ties} of {n} pairs tie (equal rewards: the policy is still the reference); dpo-lean "
            f"counts a tie as half ({ours:.3f} here), TRL and LLaMA-Factory as wrong (chosen > rejected only: "
            f"{theirs:.3f})")


def _with_logs(history: list[dict], logs: dict | None, state) -> list[dict]:
    """``state.log_history``, plus ``logs`` when the caller did not already append it (Trainer.log does)."""
    if not logs:
        return history
    last = history[-1] if history else {}
    if all(k in last and (last[k] is v or last[k] == v) for k, v in logs.items()):
        return history
    return [*history, {**logs, "step": state.global_step}]


class MetricsWriter(TrainerCallback):
    """Writes the CSV and log history on every log, and the summary and curves at train end (rank 0 only)."""

    def __init__(self, metrics_dir: str | os.PathLike, plot: bool = True,
                 extra_summary: Callable[[], dict] | None = None):
        self.metrics_dir = Path(metrics_dir)
        self.plot = plot
        self.extra_summary = extra_summary

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Rewrite ``training_metrics.csv`` and ``log_history.json``."""
        if not state.is_world_process_zero:
            return
        history = _with_logs(state.log_history, logs, state)
        write_metrics_csv(history, self.metrics_dir / CSV_NAME)
        write_log_history(history, self.metrics_dir / HISTORY_NAME)

    def on_train_end(self, args, state, control, **kwargs):
        """Write ``log_history.json``, ``summary.json`` and (if plotting) ``training_curves.png``."""
        if not state.is_world_process_zero:
            return
        history = state.log_history
        write_log_history(history, self.metrics_dir / HISTORY_NAME)
        extra = {"global_step": state.global_step, "epochs": state.epoch}
        extra.update(self.extra_summary() if self.extra_summary else {})
        write_summary(history, self.metrics_dir / SUMMARY_NAME, extra)
        if self.plot:
            self._plot(history)

    def _plot(self, history: list[dict]) -> None:
        """Plot the curves; a plotting bug must not lose the trained model, so it only warns."""
        try:
            plot_curves(history, self.metrics_dir / PLOT_NAME)
        except DpoLeanError:
            raise
        except Exception as e:  # noqa: BLE001 - cosmetic output
            logger.warning("could not plot training curves to %s: %s", self.metrics_dir / PLOT_NAME, e)
