"""What ``dpo-lean cache-info`` prints: fingerprint, completeness, parts, value distributions."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc

from . import cache
from .fingerprint import compared, flatten

VALUE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens", "prompt_tokens")


def _stats_line(table, column: str) -> str:
    col = table.column(column)
    q = pc.quantile(col, q=[0.5, 0.9]).to_pylist()
    return (f"  {column:<20} min {pc.min(col).as_py():>10.2f}  p50 {q[0]:>10.2f}  mean {pc.mean(col).as_py():>10.2f}"
            f"  p90 {q[1]:>10.2f}  max {pc.max(col).as_py():>10.2f}")


def _fingerprint_lines(fp: dict) -> list[str]:
    model, ref, ds = fp.get("model", {}), fp.get("reference", {}), fp.get("dataset", {})
    ident = model.get("commit") or (model.get("weights_sha256") or "")[:16]
    runtime = fp.get("runtime", {})
    info = sorted(set(flatten(fp)) - set(compared(fp)))
    return [
        f"model: {model.get('name_or_path')} ({ident})",
        f"reference: precision {ref.get('precision')}, quantization {ref.get('quantization')}, dtype {ref.get('dtype')}",
        f"tokenizer: {str(fp.get('tokenizer_sha256'))[:16]}  template: {fp.get('template')}  "
        f"cutoff_len: {fp.get('cutoff_len')}  truncation_mode: {fp.get('truncation_mode')}",
        f"dataset: {ds.get('spec')} ({ds.get('rows')} rows loaded, content {str(ds.get('content_sha256'))[:16]})",
        f"written by dpo-lean {fp.get('dpo_lean_version')}, cache format {fp.get('format_version')}; "
        + ", ".join(f"{k} {v}" for k, v in runtime.items()),
        f"compared when reused: {len(compared(fp))} fields; recorded only (information): {', '.join(info)}",
    ]


def describe(cache_dir: str | Path) -> tuple[bool, list[str]]:
    """(complete and sound, lines to print)."""
    state = cache.scan(Path(cache_dir))
    m = state.manifest
    lines = [f"cache: {cache_dir}", *_fingerprint_lines(m.get("fingerprint", {}))]
    if state.format_version == cache.FLOAT32_FORMAT:
        lines.append(cache.float32_notice(Path(cache_dir)))
    unused = state.table.num_rows - state.cached_expected
    lines.append(f"rows: {state.cached_expected} of {len(state.expected)} expected, in {len(state.parts)} parts"
                 + (f"; {unused} more cached rows are not in the dataset precompute last ran on (unused)" if unused
                    else ""))
    for run in m.get("runs", [])[-3:]:
        lines.append(f"run {run.get('finished', '?')}: {run.get('rows')} rows, {run.get('tokens_per_second')} tokens/s,"
                     f" peak {run.get('peak_memory_gb')} GB"
                     + (f" ({run['peak_memory_reserved_gb']} GB reserved)" if "peak_memory_reserved_gb" in run else "")
                     + f" on {run.get('device')}")
    if state.table.num_rows:
        lines.append("values:")
        lines += [_stats_line(state.table, c) for c in VALUE_COLUMNS]
    lines += [f"problem: {p}" for p in state.problems]
    if state.complete:
        lines.append("status: complete")
    else:
        lines.append("status: INCOMPLETE" if not state.problems else "status: DAMAGED")
        if not state.problems:
            lines.append(cache.missing_message(Path(cache_dir), state))
    return state.complete, lines
