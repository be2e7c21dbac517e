"""``dpo-lean sweep CONFIG.yaml pref_beta=0.05,0.1 pref_loss=sigmoid,ipo``: many runs against one reference cache.

    axes, fixed = the overrides with several values (key=a,b,c), and the rest
    precompute  = once, for the whole sweep (a no-op when the cache is complete)
    for every combination of the axes' values, in order:
        <output_dir>/sweep/<key=value_key=value>/ : trained against the shared cache; skipped when finished,
                                                    resumed from its latest checkpoint when interrupted
    then        = sweep_results.csv, sweep_results.md and sweep_curves.png in <output_dir>/sweep/

Splitting rule: ``key=a,b`` sweeps a and b, except for the keys whose value is itself a comma list
(dataset, eval_dataset, lora_target, report_to, pref_loss_weights), where ``key=a,b`` is one value. ``;``
separates alternatives for every key: ``'lora_target=q_proj,v_proj;all'`` sweeps two LoRA targets, and
``'pref_loss=sigmoid,bco_pair,sft;ipo'`` a loss mix (MPO) against ipo.

Every loss trains from the one cache; a sweep whose runs are all reference-free (orpo, simpo) needs none.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import io
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import click

from . import launch, train
from .config import FIELDS, Config, load_config, unknown_key_error
from .errors import DpoLeanError
from .fingerprint import identity_keys
from .reporting import save_figure
from .storage import atomic_write_text

# Keys the reference cache depends on (fingerprint.IDENTITY_KEYS): one shared cache cannot serve several values.
CACHE_KEYS = identity_keys()
# Keys the sweep sets for each run itself.
RUN_KEYS = frozenset({"output_dir", "ref_cache_dir", "eval_ref_cache_dir", "prepared_dir", "resume_from_checkpoint",
                      "overwrite_cache"})
RESULT_COLUMNS = ("eval_rewards/accuracies", "eval_rewards/margins", "eval_loss", "train_loss", "runtime_seconds")
CSV_NAME, MARKDOWN_NAME, PLOT_NAME = "sweep_results.csv", "sweep_results.md", "sweep_curves.png"


@dataclass
class Run:
    name: str  # its folder under <output_dir>/sweep
    values: dict[str, str]  # the swept keys' values
    config: Config


def split_values(key: str, raw: str) -> list[str]:
    """The alternatives in ``raw``: split on ';' if it has one, else on ',' unless the key's value is a comma list."""
    if ";" in raw:
        values = raw.split(";")
    elif "," in raw and not FIELDS[key].metadata["comma_list"]:
        values = raw.split(",")
    else:
        return [raw]
    values = [v.strip() for v in values]
    if "" in values:
        raise DpoLeanError(f"sweep: {key}={raw} has an empty value; list the values as {key}=a,b (no empty ones)")
    return values


def parse_sweep(overrides: list[str] | tuple[str, ...]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(fixed overrides for every run, [(key, values)] axes in command-line order)."""
    fixed, axes = [], []
    for item in overrides:
        if "=" not in item:
            raise DpoLeanError(f"override {item!r} must look like key=value or key=v1,v2,...")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if key not in FIELDS:
            raise unknown_key_error(key)
        values = split_values(key, raw)
        if len(values) == 1:
            fixed.append(f"{key}={values[0]}")
            continue
        if key in CACHE_KEYS or key in RUN_KEYS:
            why = "changes the reference cache, which a sweep shares" if key in CACHE_KEYS else "is set by the sweep per run"
            raise DpoLeanError(f"sweep: config key '{key}' {why}; sweep training keys only (give {key} one value)")
        if key in dict(axes):
            raise DpoLeanError(f"sweep: config key '{key}' is listed twice; give all its values in one {key}=a,b")
        axes.append((key, values))
    if not axes:
        raise DpoLeanError("sweep: no key has several values; list them as key=v1,v2 (pref_beta=0.05,0.1), or with "
                           "';' for dataset, eval_dataset, lora_target and report_to ('lora_target=q_proj,v_proj;all')")
    return fixed, axes


def run_folder_name(values: dict[str, str]) -> str:
    """``key=value_key=value``, with characters that do not belong in a folder name replaced by '-'."""
    return "_".join(f"{k}={re.sub(r'[^A-Za-z0-9_.+=,-]', '-', v)}" for k, v in values.items())


def plan_runs(config_path, fixed: list[str], axes: list[tuple[str, list[str]]], base: Config) -> list[Run]:
    """Every combination, validated up front, each in its own folder and pointed at the shared caches."""
    keys = [k for k, _ in axes]
    runs = []
    for combo in itertools.product(*(values for _, values in axes)):
        values = dict(zip(keys, combo))
        config = load_config(config_path, [*fixed, *(f"{k}={v}" for k, v in values.items())])
        name = run_folder_name(values)
        config = dataclasses.replace(
            config, output_dir=str(sweep_dir(base) / name), ref_cache_dir=str(base.resolved_ref_cache_dir),
            eval_ref_cache_dir=str(base.resolved_eval_ref_cache_dir), prepared_dir=str(base.resolved_prepared_dir),
            resume_from_checkpoint=None)
        runs.append(Run(name, values, config))
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        raise DpoLeanError(f"sweep: two runs would share the folder {max(names, key=names.count)}; "
                           "make the listed values differ in letters or digits")
    return runs


def sweep_dir(base: Config) -> Path:
    return Path(base.output_dir) / "sweep"


def is_finished(config: Config) -> bool:
    """summary.json is there and says the run completed (it is rewritten as the run's very last step)."""
    path = config.metrics_dir / "summary.json"
    return path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("finished") is True


def train_run(run: Run, position: str) -> str:
    """Train one run unless it is finished; resume it from its latest checkpoint if it has one."""
    from transformers.trainer_utils import get_last_checkpoint

    label = " ".join(f"{k}={v}" for k, v in run.values.items())
    if is_finished(run.config):
        click.echo(f"\n== sweep run {position}: {label}: finished before, skipped ==")
        return "skipped"
    out = Path(run.config.output_dir)
    checkpoint = get_last_checkpoint(str(out)) if out.is_dir() else None
    run.config.resume_from_checkpoint = True if checkpoint else None
    click.echo(f"\n== sweep run {position}: {label}" + (f" (resuming {Path(checkpoint).name})" if checkpoint else "")
               + f" -> {out} ==")
    train.run_train(run.config)
    gc.collect()  # the last run's model and optimizer state go before the next run loads its own
    return "resumed" if checkpoint else "trained"


def run_sweep(config_path, overrides) -> dict:
    """Precompute once, train every combination, write the comparison table and plot."""
    from .precompute import run_precompute

    launch.refuse_launcher("sweep", "CONFIG.yaml ...")
    fixed, axes = parse_sweep(overrides)
    base = load_config(config_path, fixed)
    runs = plan_runs(config_path, fixed, axes, base)
    click.echo(f"sweep: {len(runs)} runs ({' x '.join(f'{len(v)} {k}' for k, v in axes)}) in {sweep_dir(base)}, "
               f"all against {base.resolved_ref_cache_dir}")
    if any(run.config.needs_reference for run in runs):
        for c in base.cache_configs():  # computes only what the cache lacks: nothing, when it is complete
            run_precompute(c)
    else:
        click.echo("sweep: every run is reference-free; no reference cache is needed")
    status = {run.name: train_run(run, f"{i}/{len(runs)}") for i, run in enumerate(runs, 1)}
    rows = [result_row(run) for run in runs]
    paths = write_results(rows, [k for k, _ in axes], runs, sweep_dir(base))
    click.echo("\n" + markdown_table(rows, [k for k, _ in axes]))
    click.echo(f"\nsweep results: {', '.join(str(p) for p in paths)}")
    return {"status": status, "rows": rows, "paths": paths}


# ---------------------------------------------------------------- the comparison


def result_row(run: Run) -> dict:
    """The swept values, then final eval accuracy, margin and loss, train loss, runtime, and the run's folder."""
    summary = json.loads((run.config.metrics_dir / "summary.json").read_text(encoding="utf-8"))
    final_eval = summary.get("final_eval") or {}
    return {**run.values,
            "eval_rewards/accuracies": final_eval.get("rewards/accuracies"),
            "eval_rewards/margins": final_eval.get("rewards/margins"),
            "eval_loss": final_eval.get("loss"),
            "train_loss": summary.get("train_loss"), "runtime_seconds": summary.get("runtime_seconds"),
            "run": run.name}


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict], keys: list[str]) -> str:
    columns = [*keys, *RESULT_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(rows: list[dict], keys: list[str], runs: list[Run], folder: Path) -> list[Path]:
    """sweep_results.csv, sweep_results.md and sweep_curves.png in ``folder``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*keys, *RESULT_COLUMNS, "run"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / CSV_NAME, buf.getvalue())
    atomic_write_text(folder / MARKDOWN_NAME, markdown_table(rows, keys) + "\n")
    plot_runs(runs, folder / PLOT_NAME)
    return [folder / CSV_NAME, folder / MARKDOWN_NAME, folder / PLOT_NAME]


def eval_curve(run: Run, metric: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one eval metric from the run's log history."""
    history = json.loads((run.config.metrics_dir / "log_history.json").read_text(encoding="utf-8"))
    points = [(h["step"], h[f"eval_{metric}"]) for h in history if f"eval_{metric}" in h]
    return [s for s, _ in points], [v for _, v in points]


def plot_runs(runs: list[Run], path: Path) -> None:
    """Eval reward accuracy and margins against step, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    try:
        for ax, metric in zip(axes, ("rewards/accuracies", "rewards/margins")):
            for run in runs:
                steps, values = eval_curve(run, metric)
                ax.plot(steps, values, marker="o", markersize=3, label=" ".join(f"{k}={v}" for k, v in run.values.items()))
            ax.set_title(f"eval {metric}")
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        axes[0].legend(loc="best", fontsize="small")
        save_figure(fig, path)
    finally:
        plt.close(fig)
