"""load -> normalise -> template + tokenise: the data path that data-check, precompute and train share."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, require
from ..errors import DpoLeanError
from ..files import atomic_write_text
from .records import SKIP_FIXES, Skip
from .sources import load_records
from .templates import definition_text, template_for
from .text import escape_surrogates
from .tokenize import TokenizedRow, tokenize_record


@dataclass
class PreparedData:
    rows: list[TokenizedRow]  # kept rows, in row_index order
    skips: list[Skip]  # every row not kept, from any stage
    num_rows: int  # rows loaded
    sources: list[dict]  # per dataset file: name, path, sha256, rows
    content_sha256: str  # hash of the normalised rows (row_index, id) as loaded, before tokenisation
    chat_template: str = field(repr=False, default="")  # the template's definition (its Jinja, or an LF template's fields)

    @property
    def num_truncated(self) -> int:
        return sum(r.truncated for r in self.rows)

    def skip_counts(self) -> Counter:
        return Counter(s.reason for s in self.skips)


def _content_hash(records) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.row_index}:{r.id}\n".encode())
    return h.hexdigest()


def prepare_data(config: Config, tokenizer, dataset: str | None = None, require_rows: bool = True) -> PreparedData:
    """Rows of ``dataset`` (default ``config.dataset``) as token ids, with every skipped row counted.

    ``require_rows=False`` returns even when every row was skipped (data-check reports them, then fails).
    """
    require(config, "dataset")
    loaded = load_records(dataset or config.dataset, config.dataset_dir, config.max_samples)
    template = template_for(config, tokenizer)
    rows, skips = [], list(loaded.skips)
    for record in loaded.records:
        out = tokenize_record(record, tokenizer, template, config.cutoff_len, config.truncation_mode)
        (skips if isinstance(out, Skip) else rows).append(out)
    skips.sort(key=lambda s: s.row_index)
    prepared = PreparedData(rows, skips, loaded.num_rows, loaded.sources, _content_hash(loaded.records),
                            definition_text(template))
    _check_skips(prepared, config)
    if require_rows:
        check_rows_kept(prepared, config)
    return prepared


def _check_skips(data: PreparedData, config: Config) -> None:
    if data.skips and config.strict:
        s = data.skips[0]
        raise DpoLeanError(f"{s.source} (row {s.row_index}): {s.reason} ({s.detail}); strict: true makes every "
                           f"skipped row an error ({len(data.skips)} row(s) would be skipped)")


def check_rows_kept(data: PreparedData, config: Config, shown_above: bool = False) -> None:
    """Raise (one line: counts, the first skipped row and its fix) if no row was kept."""
    if data.rows:
        return
    counts = ", ".join(f"{k}: {v}" for k, v in data.skip_counts().most_common())
    message = f"dataset {config.dataset!r}: all {data.num_rows} rows were skipped ({counts})"
    if shown_above:
        raise DpoLeanError(message + "; the table above gives the first example of each reason and its fix")
    if data.skips:
        s = data.skips[0]
        message += f"; first: {s.source}: {s.reason} ({s.detail}); fix: {SKIP_FIXES[s.reason]}"
    raise DpoLeanError(message + "; `dpo-lean data-check CONFIG.yaml` gives the first example of each reason")


def first_skip_by_reason(data: PreparedData) -> dict[str, Skip]:
    """The first skipped row of each reason, most frequent reason first."""
    first: dict[str, Skip] = {}
    for s in data.skips:
        first.setdefault(s.reason, s)
    return {reason: first[reason] for reason, _ in data.skip_counts().most_common()}


def skip_summary(data: PreparedData) -> str:
    """One line: rows kept, and skips by reason."""
    line = f"{len(data.rows)} of {data.num_rows} rows kept"
    if data.skips:
        line += ", skipped: " + ", ".join(f"{k} {v}" for k, v in data.skip_counts().most_common())
    if data.num_truncated:
        line += f"; {data.num_truncated} truncated to cutoff_len"
    return line


def write_skip_report(data: PreparedData, directory: Path) -> Path:
    """``skipped_rows.json``: counts by reason and every skipped row (index, where, reason, detail)."""
    report = {"rows_loaded": data.num_rows, "rows_kept": len(data.rows), "rows_truncated": data.num_truncated,
              "skipped_by_reason": dict(data.skip_counts()),
              "skipped": [{"row_index": s.row_index, "source": s.source, "reason": s.reason, "detail": s.detail}
                          for s in data.skips]}
    path = Path(directory) / "skipped_rows.json"
    text = json.dumps(report, indent=1, ensure_ascii=False)
    # A lone surrogate (a file name from undecodable bytes) cannot be written as UTF-8; JSON escapes it.
    text = escape_surrogates(text)
    atomic_write_text(path, text + "\n")
    return path



def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n q / 100)
    return sorted_values[int(rank) - 1]


def length_stats(rows: list[TokenizedRow]) -> dict[str, dict[str, int]]:
    """p50, p90, p99 and max token counts of prompt, chosen and rejected (after truncation)."""
    out = {}
    for name, attr in (("prompt", "prompt_ids"), ("chosen", "chosen_ids"), ("rejected", "rejected_ids")):
        values = sorted(len(getattr(r, attr)) for r in rows)
        out[name] = {f"p{q}": _percentile(values, q) for q in (50, 90, 99)} | {"max": values[-1] if values else 0}
    return out
