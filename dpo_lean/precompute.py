"""Phase 1: run the frozen reference once over the dataset into the Parquet cache.

    rows = prepare_data(config)                       # the one tokenisation path
    plan = rows sorted by length -> batches -> parts  # deterministic, so a rerun redoes exactly what is missing
    for each part of this shard not yet in the cache:
        for each batch: ref logps = batch_logps(reference, batch)   # the one log-prob function
        write the part (temp name, then rename)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import click
import torch
from tqdm.auto import tqdm

from . import cache, modeling
from .config import Config, require
from .data.collate import Sharing, collate, describe_layout
from .data.pipeline import prepare_data, skip_summary, write_skip_report
from .data.tokenize import TokenizedRow
from .errors import Interrupted
from .logprobs import batch_logps
from .measure import peak_memory_gb


def plan_parts(rows: list[TokenizedRow], batch_size: int, part_rows: int) -> list[list[list[TokenizedRow]]]:
    """Parts of batches of rows, longest first (an out-of-memory batch shows up at once), ties by row_index."""
    ordered = sorted(rows, key=lambda r: (-r.length, r.row_index))
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    per_part = max(1, part_rows // batch_size)
    return [batches[i:i + per_part] for i in range(0, len(batches), per_part)]


def shard_of(config: Config) -> tuple[int, int]:
    """(num_shards, shard_index): the config's, or one shard per process under torchrun/accelerate launch."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if config.num_shards == 1 and world > 1:
        return world, int(os.environ.get("RANK", 0))
    return config.num_shards, config.shard_index


def pending_parts(plan, done: set[int], num_shards: int, shard_index: int):
    """(plan index, batches of rows not yet cached) for this shard's parts that still miss rows."""
    for i, part in enumerate(plan):
        if i % num_shards != shard_index:
            continue
        batches = [[r for r in b if r.row_index not in done] for b in part]
        batches = [b for b in batches if b]
        if batches:
            yield i, batches


def score_batch(model, rows: list[TokenizedRow], pad_id: int, chunk_size, dev, dtype,
                sharing: Sharing | None = None) -> torch.Tensor:
    """[2B, 2] for ``rows``: rows chosen..., rejected...; columns the summed log-prob and its tail (past the
    pair's shorter completion, for LD-DPO). On CUDA out-of-memory, halves the batch and retries.

    ``sharing``: prefix sharing (one [prompt | chosen | rejected] sequence per pair where it pays);
    None for two sequences per pair.
    """
    ids = [r.prompt_ids for r in rows], [r.chosen_ids for r in rows], [r.rejected_ids for r in rows]
    batch = modeling.batch_to(collate(*ids, pad_id, sharing, tails=True), dev)
    try:
        with modeling.inference(model), modeling.autocast(dtype, dev):
            return batch_logps(model, batch, chunk_size).cpu()
    except torch.cuda.OutOfMemoryError:
        if len(rows) == 1:
            raise
        del batch
        torch.cuda.empty_cache()
        half = len(rows) // 2
        a = score_batch(model, rows[:half], pad_id, chunk_size, dev, dtype, sharing)
        b = score_batch(model, rows[half:], pad_id, chunk_size, dev, dtype, sharing)
        return torch.cat([a[:half], b[:len(rows) - half], a[half:], b[len(rows) - half:]])


@dataclass
class _PartResult:
    columns: dict
    tokens: int


def compute_part(model, batches, pad_id, chunk_size, dev, dtype, sharing, progress) -> _PartResult:
    cols = {name: [] for name in cache.SCHEMA.names}
    tokens = 0
    for rows in batches:
        logps = score_batch(model, rows, pad_id, chunk_size, dev, dtype, sharing)
        n = len(rows)
        for i, r in enumerate(rows):
            cols["row_index"].append(r.row_index)
            cols["id"].append(r.id)
            cols["ref_chosen_logps"].append(float(logps[i, 0]))
            cols["ref_rejected_logps"].append(float(logps[n + i, 0]))
            cols["ref_chosen_tail_logps"].append(float(logps[i, 1]))
            cols["ref_rejected_tail_logps"].append(float(logps[n + i, 1]))
            cols["chosen_tokens"].append(len(r.chosen_ids))
            cols["rejected_tokens"].append(len(r.rejected_ids))
            cols["prompt_tokens"].append(len(r.prompt_ids))
        batch_tokens = sum(2 * len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in rows)
        tokens += batch_tokens
        progress.update(n)
        progress.tokens += batch_tokens
        progress.set_postfix_str(f"{progress.tokens / max(time.perf_counter() - progress.t0, 1e-9):,.0f} tok/s")
    return _PartResult(cols, tokens)


def run_precompute(config: Config) -> dict:
    require(config, "model_name_or_path", "dataset")
    tokenizer = modeling.load_tokenizer(config)
    data = prepare_data(config, tokenizer)
    click.echo(f"data: {skip_summary(data)}")
    if data.skips:
        click.echo(f"skipped rows listed in {write_skip_report(data, config.metrics_dir)}")
    fingerprint = cache.build_fingerprint(config, tokenizer, data, modeling.reference_spec(config))
    cache_dir = config.resolved_ref_cache_dir
    cache.open_for_writing(cache_dir, fingerprint, {r.row_index: r.id for r in data.rows}, config.overwrite_cache)
    done = _usable_rows(cache_dir)

    num_shards, shard_index = shard_of(config)
    plan = plan_parts(data.rows, config.precompute_ref_batch_size, config.cache_part_rows)
    todo = list(pending_parts(plan, done, num_shards, shard_index))
    shard = f" (shard {shard_index + 1} of {num_shards})" if num_shards > 1 else ""
    if not todo:
        click.echo(f"cache {cache_dir}: nothing to compute{shard}; {len(done)} rows already cached")
        return _finish(cache_dir, {"rows": 0, "tokens": 0, "seconds": 0.0})

    dev = modeling.device()
    dtype = modeling.compute_dtype(config, dev, config.ref_precision)
    model = modeling.prepare_reference(config)
    sharing = modeling.prefix_sharing(config, model, dtype)
    chunk = config.logprob_chunk_size
    n_rows = sum(len(b) for _, batches in todo for b in batches)
    layout = describe_layout(sharing)
    click.echo(f"precompute: {n_rows} rows in {len(todo)} parts{shard}, {layout} -> {cache_dir}")
    t0 = time.perf_counter()
    try:
        with tqdm(total=n_rows, unit="row", desc="reference log-probs", dynamic_ncols=True) as progress:
            progress.tokens, progress.t0 = 0, t0
            for plan_index, batches in todo:
                part = compute_part(model, batches, tokenizer.pad_token_id, chunk, dev, dtype, sharing, progress)
                name = cache.part_name(plan_index, part.columns["row_index"])
                cache.write_part(cache_dir, name, part.columns, fingerprint)
    except KeyboardInterrupt:
        state = cache.scan(cache_dir)
        raise Interrupted(f"interrupted: {state.table.num_rows} of {state.manifest['expected_rows']} rows are "
                          f"cached in complete parts in {cache_dir}; rerun `dpo-lean precompute CONFIG.yaml` "
                          "to compute the rest") from None
    seconds = time.perf_counter() - t0
    return _finish(cache_dir, {"rows": n_rows, "tokens": progress.tokens, "seconds": round(seconds, 3),
                               "shard": f"{shard_index}/{num_shards}", "device": str(dev),
                               "peak_memory_gb": round(peak_memory_gb(dev), 3)})


def _usable_rows(cache_dir) -> set[int]:
    """Row indices of the complete, matching parts; parts that are unreadable or foreign are removed."""
    state = cache.scan(cache_dir)
    for problem in state.problems:
        name = problem.split(":", 1)[0]
        if name.startswith("part-"):
            click.echo(f"cache: removing {name} ({problem.split(': ', 1)[1]}); its rows are recomputed")
            (cache_dir / name).unlink(missing_ok=True)
    if state.problems:
        state = cache.scan(cache_dir)
    return set(state.table.column("row_index").to_pylist())


def _finish(cache_dir, summary: dict) -> dict:
    if summary["rows"]:
        summary["tokens_per_second"] = round(summary["tokens"] / max(summary["seconds"], 1e-9), 1)
        summary["finished"] = cache._now()
        cache.record_run(cache_dir, summary)
        click.echo(f"precompute: {summary['rows']} rows, {summary['tokens']:,} tokens in {summary['seconds']:.1f} s "
                   f"({summary['tokens_per_second']:,.0f} tokens/s), peak memory {summary['peak_memory_gb']:.2f} GB")
    state = cache.scan(cache_dir)
    expected = state.manifest["expected_rows"]
    status = "complete" if state.complete else f"{state.table.num_rows} of {expected} rows so far"
    click.echo(f"cache {cache_dir}: {status}")
    return {**summary, "complete": state.complete, "cached_rows": state.table.num_rows}
