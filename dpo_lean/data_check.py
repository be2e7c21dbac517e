"""``dpo-lean data-check``: the data path of training, printed. Rows loaded, kept and skipped (each reason's first
row, field and fix), truncation, token-length percentiles; optionally rows as the model sees them and their ids."""

from __future__ import annotations

import click

from .config import Config, require
from .data.display import render_row, write_ids
from .data.pipeline import (
    PreparedData,
    check_rows_kept,
    first_skip_by_reason,
    length_stats,
    prepare_data,
    skip_summary,
    truncation_note,
    write_skip_report,
)
from .data.records import SKIP_FIXES
from .modeling import load_tokenizer


def run_data_check(config: Config, show: int = 0, dump_ids: str | None = None) -> PreparedData:
    """Print the report; a one-line error (after the skip table) if no row is kept."""
    require(config, "model_name_or_path", "dataset")
    tokenizer = load_tokenizer(config)
    data = prepare_data(config, tokenizer, require_rows=False)
    click.echo(data.describe())
    click.echo(f"dataset: {config.dataset}")
    click.echo(f"template: {config.template}" + (" (the tokenizer's own)" if config.template == "auto" else ""))
    _print_counts(data)
    if not data.rows:
        if data.skips:
            click.echo(f"skipped rows: {write_skip_report(data, config.metrics_dir)}")
        check_rows_kept(data, config, shown_above=True)
    click.echo(f"rows truncated to cutoff_len={config.cutoff_len}: {data.num_truncated}")
    if truncation_note(data):
        click.echo(truncation_note(data))
    click.echo(f"{'tokens':<10}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
    for name, stats in length_stats(data.rows).items():
        click.echo(f"{name:<10}" + "".join(f"{stats[k]:>8}" for k in ("p50", "p90", "p99", "max")))
    if data.skips:
        click.echo(f"skipped rows: {write_skip_report(data, config.metrics_dir)}")
    click.echo(skip_summary(data))
    for row in data.rows[:show]:
        click.echo("\n" + render_row(tokenizer, row))
    if dump_ids:
        click.echo(f"ids of {len(data.rows)} kept rows: {write_ids(data.rows, dump_ids)}")
    return data


def _print_counts(data: PreparedData) -> None:
    click.echo(f"rows loaded: {data.num_rows}")
    click.echo(f"rows kept: {len(data.rows)}")
    click.echo(f"rows skipped: {len(data.skips)}")
    counts = data.skip_counts()
    for reason, s in first_skip_by_reason(data).items():
        click.echo(f"  {reason}: {counts[reason]}, first {s.source}: {s.detail}; fix: {SKIP_FIXES[reason]}")
