"""load -> normalise -> template + tokenise: the data path that data-check, precompute and train share."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import click

from .. import launch, progress, storage
from ..config import Config, require
from ..errors import DpoLeanError
from ..fingerprint import prepared_digest, prepared_fingerprint
from ..storage import atomic_write_text
from . import prepared
from .parallel import CHUNK_ROWS, encode_batches
from .prepared import PreparedRows
from .records import SKIP_FIXES, Skip
from .sources import LoadedData, load_records, source_identity, stream_records
from .templates import definition_text, template_for
from .text import escape_surrogates


@dataclass
class PreparedData:
    rows: PreparedRows  # kept rows, in row_index order, memory-mapped (see data.prepared)
    skips: list[Skip]  # every row not kept, from any stage
    num_rows: int  # rows loaded
    sources: list[dict]  # per dataset file: name, path, sha256, rows
    content_sha256: str  # hash of the normalised rows (row_index, id) as loaded, before tokenisation
    chat_template: str = field(repr=False, default="")  # the template's definition (its Jinja, or an LF template's fields)
    path: Path | None = None  # the prepared Arrow file
    reused: bool = False  # read from an earlier command's prepared data, not tokenised now
    seconds: float = 0.0  # to tokenise and write it, or to find and open it
    workers: int = 1
    truncation_mode: str = "keep_end"  # how rows over cutoff_len were cut

    @property
    def num_truncated(self) -> int:
        return int(self.rows.column("truncated").sum())

    def skip_counts(self) -> Counter:
        return Counter(s.reason for s in self.skips)

    def describe(self) -> str:
        """How the rows were prepared: reused, or tokenised now with how many processes."""
        if self.reused:
            return f"reused prepared data {self.path} ({self.seconds:.1f} s)"
        workers = f"{self.workers} worker{'s' if self.workers > 1 else ''}"
        return f"prepared {self.num_rows:,} rows in {self.seconds:.1f} s ({workers}) -> {self.path}"


def _content_hash(records) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.row_index}:{r.id}\n".encode())
    return h.hexdigest()


def prepare_data(config: Config, tokenizer, dataset: str | None = None, require_rows: bool = True) -> PreparedData:
    """Rows of ``dataset`` (default ``config.dataset``) as token ids, with every skipped row counted.
    ``require_rows=False`` returns even when every row was skipped (data-check reports them, then fails).

    Tokenised once (in ``preprocessing_num_workers`` processes) into prepared data keyed by everything the ids
    depend on; every later call with the same key memory-maps it (``overwrite_cache`` tokenises again, as LF).
    """
    require(config, "dataset")
    if dataset:
        config = dataclasses.replace(config, dataset=dataset)
    t0 = time.perf_counter()
    template = template_for(config, tokenizer)
    template_text = definition_text(template)
    identity = source_identity(config.dataset, config.dataset_dir)
    loaded = None
    if identity is None:  # no stable identity: the loaded rows' content keys it
        loaded = load_records(config.dataset, config.dataset_dir, config.max_samples)
        identity = {"content_sha256": _content_hash(loaded.records), "rows": loaded.num_rows}
    fp = prepared_fingerprint(config, tokenizer, template_text, identity)
    key, directory = prepared_digest(fp), config.resolved_prepared_dir
    with prepared.locked(directory):
        found = None if config.overwrite_cache else _reusable(directory, key)
        reused = found is not None
        if found is None:
            storage.remove_stale_temporaries(directory)  # a killed build's
            reason = prepared.stale_reason(directory, key, config.dataset, fp)
            if reason:
                click.echo(f"prepared data in {directory} was made for other settings ({reason}); tokenising again")
            _build(config, tokenizer, template, template_text, directory, key, fp, loaded)
            found = prepared.read(directory, key)
    meta, rows = found
    data = PreparedData(rows, prepared.skips_of(meta), meta["num_rows"], meta["sources"], meta["content_sha256"],
                        meta["chat_template"], rows.path, reused, time.perf_counter() - t0,
                        1 if reused else _workers(config), config.truncation_mode)
    _check_skips(data, config)
    if require_rows:
        check_rows_kept(data, config)
    return data


def _workers(config: Config) -> int:
    """preprocessing_num_workers, at most the CPUs this process may run on (said once)."""
    asked = config.preprocessing_num_workers or 1
    cpus = launch.cpus()
    if asked > cpus:
        message = f"preprocessing_num_workers {asked}: this machine has {cpus} CPUs; tokenising in {cpus} processes"
        if message not in _SAID:
            _SAID.add(message)
            click.echo(message)
    return min(asked, cpus)


_SAID: set[str] = set()


def _reusable(directory: Path, key: str):
    try:
        return prepared.read(directory, key)
    except prepared.Damaged as e:
        click.echo(f"prepared data {directory / key}.arrow is unreadable ({e}); tokenising again")
        return None


def _build(config: Config, tokenizer, template, template_text: str, directory: Path, key: str, fp: dict,
           loaded: LoadedData | None) -> None:
    """Stream the rows (or take the ``loaded`` ones) through the tokenizer into prepared data ``key``."""
    summary = loaded or LoadedData()
    if loaded is not None:
        n = CHUNK_ROWS
        chunks = chain([([], list(loaded.skips))], ((loaded.records[i:i + n], []) for i in range(0, len(loaded.records), n)))
    else:
        chunks = stream_records(config.dataset, config.dataset_dir, config.max_samples, summary, CHUNK_ROWS)
    content = hashlib.sha256()

    def hashed():
        for records, skips in chunks:
            for r in records:
                content.update(f"{r.row_index}:{r.id}\n".encode())
            yield records, skips

    def counted(batches, shown):
        for batch, skips in batches:
            if summary.rows_found > (shown.total or 0):  # a streamed file's rows are counted before they are read
                shown.total = summary.rows_found
            shown.update(batch.num_rows + len(skips))
            yield batch, skips

    batches = encode_batches(hashed(), tokenizer, template, config.cutoff_len, config.truncation_mode, _workers(config))
    with progress.bar(summary.rows_found or None, "tokenising", "row") as shown:
        prepared.write(directory, key, counted(batches, shown), lambda: {
            "dataset": config.dataset, "fingerprint": fp, "num_rows": summary.num_rows, "sources": summary.sources,
            "content_sha256": content.hexdigest(), "chat_template": template_text})


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
        line += f"; {data.num_truncated} truncated to cutoff_len ({data.truncation_mode})"
    return line


_CUTS = {"keep_end": "lost their prompt's start or their completions' end",
         "keep_start": "kept their whole prompt and lost their completions' end"}


def truncation_note(data: PreparedData) -> str:
    """One line where rows were cut otherwise than LLaMA-Factory cuts them (its mode and how LF differs); ''
    where none was, or truncation_mode is llamafactory."""
    if not data.num_truncated or data.truncation_mode not in _CUTS:
        return ""
    return (f"truncation_mode {data.truncation_mode}: the {data.num_truncated} truncated rows "
            f"{_CUTS[data.truncation_mode]}; LLaMA-Factory cuts otherwise (prompt and completions keep their starts, "
            "cutoff_len shared by their lengths), so these rows differ from LF's; truncation_mode: llamafactory cuts "
            "as LF does")


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


def length_stats(rows) -> dict[str, dict[str, int]]:
    """p50, p90, p99 and max token counts of prompt, chosen and rejected (after truncation), from the length columns."""
    out = {}
    for name in ("prompt", "chosen", "rejected"):
        values = sorted(rows.column(f"{name}_len").tolist())
        out[name] = {f"p{q}": _percentile(values, q) for q in (50, 90, 99)} | {"max": values[-1] if values else 0}
    return out
