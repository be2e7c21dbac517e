"""Phase 1: run the frozen reference once over the dataset into the Parquet cache.

    rows = prepare_data(config)                       # the one tokenisation path, prepared once, memory-mapped
    plan = rows sorted by length -> batches -> parts  # deterministic, so a rerun redoes exactly what is missing
    for each part of this shard with rows not yet in the cache (by id: added rows only, when the dataset grew):
        for each batch: ref logps = batch_logps(reference, batch)   # the one log-prob function (halved on OOM)
        write the part (temp name, then rename)
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

import click
import numpy as np
import torch

from . import cache, faults, launch, modeling, sharding
from .config import Config, require
from .data.pipeline import prepare_data, skip_summary, truncation_note, write_skip_report
from .data.prepared import PreparedRows
from .data.tokenize import TokenizedRow
from .errors import DpoLeanError, Interrupted
from .fingerprint import build_fingerprint, cheap_fingerprint, setup_fingerprint
from .layout import Sharing, collate, describe_layout, prefix_sharing
from .logprobs import batch_logps
from .measure import memory_metrics
from .progress import bar


def plan_parts(rows: PreparedRows, batch_size: int, part_rows: int) -> list[list[np.ndarray]]:
    """Parts of batches of row positions, longest first (an out-of-memory batch shows up at once), ties by
    row_index; from the length columns, so planning holds no ids."""
    ordered = np.lexsort((rows.column("row_index"), -rows.column("length").astype(np.int64)))
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    per_part = max(1, part_rows // batch_size)
    return [batches[i:i + per_part] for i in range(0, len(batches), per_part)]


def shard_of(config: Config) -> tuple[int, int]:
    """(num_shards, shard_index): the config's, or one shard per process under torchrun/accelerate launch."""
    world = launch.world_size()
    if config.num_shards == 1 and world > 1:
        return world, launch.rank()
    return config.num_shards, config.shard_index


def distinct_positions(ids: list[str]) -> np.ndarray:
    """Positions of the first row of each id: identical rows share one cached entry."""
    first: dict[str, int] = {}
    for position, row_id in enumerate(ids):
        first.setdefault(row_id, position)
    return np.fromiter(first.values(), dtype=np.int64, count=len(first))


def pending_parts(plan, ids: list[str], done: set[str], num_shards: int, shard_index: int):
    """(plan index, batches of row positions not yet cached, by id) for this shard's parts that still miss rows."""
    is_done = np.fromiter((row_id in done for row_id in ids), dtype=bool, count=len(ids))
    for i, part in enumerate(plan):
        if i % num_shards != shard_index:
            continue
        batches = [b[~is_done[b]] for b in part]
        batches = [b for b in batches if len(b)]
        if batches:
            yield i, batches


def is_out_of_memory(error: BaseException) -> bool:
    """An error that a smaller batch may avoid: CUDA's OutOfMemoryError, the out-of-memory RuntimeErrors accelerate
    recognises (HIP, XPU, MPS, CPU allocator, cuDNN's unsupported-size error), and cuBLAS failing to allocate its
    workspace (CUBLAS_STATUS_ALLOC_FAILED, a plain RuntimeError)."""
    from accelerate.utils.memory import should_reduce_batch_size

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and (should_reduce_batch_size(error)
                                                or "CUBLAS_STATUS_ALLOC_FAILED" in str(error))


GROW_AFTER = 16  # clean batches at a halved size before the next larger one is tried


@dataclass
class BatchScorer:
    """Scores batches of rows with the reference: [chosen logps..., rejected logps...] per batch.

    Out of memory (:func:`is_out_of_memory`, moving the batch to the device included): the rows are scored in
    pieces of half the size, retried only after the failed attempt's memory is released (outside the ``except``
    block: the live exception's traceback pins that forward's activations); ``max_rows``, the size that worked,
    stays for the later batches. After ``grow_after`` clean pieces at that size it doubles again (up to the whole
    batch): rows run longest first, so later batches usually fit again. A grown size that runs out of memory again
    halves, and the next try waits twice as many clean pieces.
    ``sharing``: prefix sharing (one [prompt | chosen | rejected] sequence per pair where it pays); None for
    two sequences per pair.
    """

    model: object
    pad_id: int
    chunk_size: int | None
    dev: torch.device
    dtype: torch.dtype
    sharing: Sharing | None = None
    max_rows: int | None = None  # None: whole batches
    grow_after: int = GROW_AFTER
    clean: int = 0  # pieces scored at max_rows since it last changed
    grown: bool = False  # max_rows was reached by growing (an out-of-memory there backs off)
    split_on_oom: bool = True  # False under FSDP: every process must run the same forwards

    def __call__(self, rows: list[TokenizedRow]) -> torch.Tensor:
        pieces, start = [], 0
        while start < len(rows):
            size = min(len(rows) - start, self.max_rows or len(rows))
            logps = self._score(rows[start:start + size])
            if logps is None:  # out of memory, and its memory is free again: halve and retry
                self._halve(size)
                continue
            pieces.append((logps, size))
            start += size
            if size == self.max_rows:
                self._count_clean(len(rows))
        return torch.cat([lp[:n] for lp, n in pieces] + [lp[n:] for lp, n in pieces])

    def _halve(self, size: int) -> None:
        if self.grown and self.clean < self.grow_after:
            self.grow_after *= 2  # the size grown to did not hold: wait longer before the next try
        self.max_rows, self.clean, self.grown = size // 2, 0, False
        click.echo(f"precompute: out of memory at {size} pairs a batch; continuing at {self.max_rows}", err=True)

    def _count_clean(self, batch_rows: int) -> None:
        self.clean += 1
        if self.clean >= self.grow_after and self.max_rows < batch_rows:
            bigger = min(2 * self.max_rows, batch_rows)
            click.echo(f"precompute: {self.clean} clean batches at {self.max_rows} pairs a batch; trying {bigger} again",
                       err=True)
            self.max_rows, self.clean, self.grown = bigger, 0, True

    def _score(self, rows: list[TokenizedRow]) -> torch.Tensor | None:
        """The rows' log-probs, or None when they ran out of memory (with the memory of the attempt freed)."""
        from accelerate.utils.memory import clear_device_cache

        ids = [r.prompt_ids for r in rows], [r.chosen_ids for r in rows], [r.rejected_ids for r in rows]
        batch = collate(*ids, self.pad_id, self.sharing, tails=True)
        try:
            batch = modeling.batch_to(batch, self.dev)
            with modeling.inference(self.model), modeling.autocast(self.dtype, self.dev):
                return batch_logps(self.model, batch, self.chunk_size).cpu()
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
            if not is_out_of_memory(e):
                raise
            if not self.split_on_oom:
                raise DpoLeanError(f"out of memory at {len(rows)} pairs a batch under FSDP (its processes run their "
                                   "forwards together, so one cannot split a batch); lower precompute_ref_batch_size "
                                   "or logprob_chunk_size") from None
            if len(rows) == 1:
                r = rows[0]
                raise DpoLeanError(f"out of memory on row {r.row_index} alone ({len(r.prompt_ids)} prompt + "
                                   f"{len(r.chosen_ids)}/{len(r.rejected_ids)} completion tokens); lower cutoff_len "
                                   "or logprob_chunk_size, or use a smaller reference (quantization_bit: 4)") from None
        del batch
        clear_device_cache(garbage_collection=True)  # frames of the failed forward caught in reference cycles
        return None


def compute_part(score: BatchScorer, batches, progress) -> dict[str, list]:
    """``batches``: lists of rows (TokenizedRow), each materialised only while it is scored."""
    cols = {name: [] for name in cache.SCHEMA.names}
    for rows in batches:
        logps = score(rows)
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
            cols["ids_sha256"].append(cache.ids_digest(r.prompt_ids, r.chosen_ids, r.rejected_ids))
        batch_tokens = sum(2 * len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in rows)
        progress.update(n)
        progress.tokens += batch_tokens
        progress.set_postfix_str(f"{progress.tokens / max(time.perf_counter() - progress.t0, 1e-9):,.0f} tok/s")
    return cols


def _forwards(config: Config, dev: torch.device, todo: list) -> tuple[object, int, int]:
    """(accelerator, this process's forwards, the forwards it runs). Under FSDP the accelerator shards the reference
    and every process runs as many forwards as the busiest one (a forward is collective); else (None, n, n)."""
    forwards = sum(len(batches) for _, batches in todo)
    if not sharding.requested(config):
        return None, forwards, forwards
    accelerator = sharding.inference_accelerator(config, dev)
    return accelerator, forwards, launch.agree_max(forwards, dev)


def _scorer(config: Config, pad_id: int, dev: torch.device, accelerator) -> BatchScorer:
    """The reference and its batch scorer; with an FSDP ``accelerator``, this process keeps its shard of it."""
    dtype = modeling.compute_dtype(config, dev, config.ref_precision)
    model = modeling.prepare_reference(config)
    if accelerator is not None:
        sharding.replicate_head(accelerator, model)
        model = accelerator.prepare(model)
        click.echo(sharding.describe(model))
    sharing = prefix_sharing(config, model, dtype)
    return BatchScorer(model, pad_id, config.logprob_chunk_size, dev, dtype, sharing, split_on_oom=accelerator is None)


def run_precompute(config: Config) -> dict:
    require(config, "model_name_or_path", "dataset")
    if sharding.requested(config):
        sharding.check_precompute(config)
    tokenizer = modeling.load_tokenizer(config)
    if config.ref_model:
        modeling.check_reference_tokenizer(config, tokenizer)
    cache_dir = config.resolved_ref_cache_dir
    _check_cache_first(config, tokenizer)
    data = prepare_data(config, tokenizer)
    click.echo(data.describe())
    click.echo(f"data: {skip_summary(data)}")
    if truncation_note(data):
        click.echo(truncation_note(data))
    if data.skips:
        click.echo(f"skipped rows listed in {write_skip_report(data, config.metrics_dir)}")
    fingerprint = build_fingerprint(config, tokenizer, data, modeling.reference_spec(config))
    distinct = distinct_positions(data.rows.ids)
    rows = data.rows.subset(distinct)
    if len(rows) < len(data.rows):
        click.echo(f"precompute: {len(data.rows) - len(rows)} rows repeat another row's content (same id); "
                   f"{len(rows)} distinct rows, each cached once and used by all its copies")
    ids = rows.ids
    if not config.overwrite_cache and (kept := _kept_float32_cache(cache_dir, fingerprint, rows)):
        return kept
    cache.open_for_writing(cache_dir, fingerprint, dict(zip(ids, rows.column("row_index").tolist())),
                           config.overwrite_cache)
    done = _usable_rows(cache_dir, rows)

    num_shards, shard_index = shard_of(config)
    plan = plan_parts(rows, config.precompute_ref_batch_size, config.cache_part_rows)
    todo = list(pending_parts(plan, ids, done, num_shards, shard_index))
    shard = f" (shard {shard_index + 1} of {num_shards})" if num_shards > 1 else ""
    cached = sum(row_id in done for row_id in ids)
    dev = modeling.device()
    accelerator, forwards, most = _forwards(config, dev, todo)
    if not most:
        click.echo(f"cache {cache_dir}: nothing to compute{shard}; {cached} of {len(rows)} rows already cached")
        return _finish(cache_dir, {"rows": 0, "tokens": 0, "seconds": 0.0})

    score = _scorer(config, tokenizer.pad_token_id, dev, accelerator)
    n_rows = sum(len(b) for _, batches in todo for b in batches)
    click.echo(modeling.describe_reference(config))
    if modeling.lf_reference_note(config):
        click.echo(modeling.lf_reference_note(config))
    kept = f" ({cached} of {len(rows)} rows already cached, kept)" if cached else ""
    idle = f"; {most - forwards} idle forwards in step with the other processes" if most > forwards else ""
    click.echo(f"precompute: {n_rows} rows in {len(todo)} parts{shard}{kept}{idle}, {describe_layout(score.sharing)}"
               f" -> {cache_dir}")
    t0 = time.perf_counter()
    progress = write_parts(score, rows, todo, cache_dir, fingerprint, n_rows,
                           idle=(most - forwards, rows.take(plan[-1][-1][-1:]) if most > forwards else []),
                           lockstep=accelerator is not None)
    seconds = time.perf_counter() - t0
    return _finish(cache_dir, {"rows": n_rows, "tokens": progress.tokens, "seconds": round(seconds, 3),
                               "shard": f"{shard_index}/{num_shards}", "device": str(dev),
                               **memory_metrics(dev)})


def _kept_float32_cache(cache_dir, fingerprint: dict, rows: PreparedRows) -> dict | None:
    """When ``cache_dir`` is a cache of the format before (float32 sums) built for this run that holds every one of
    ``rows``: it is kept as it is, as train reads it (recomputing it all would cost a full precompute unasked), with
    its notice; returns the run's summary. Else None (one that lacks rows is refused by cache.open_for_writing:
    parts of two formats do not mix)."""
    try:
        manifest = cache.read_manifest(cache_dir)
        if not isinstance(manifest, dict) or manifest.get("format_version") != cache.FLOAT32_FORMAT:
            return None
        state = cache.scan(cache_dir)
    except DpoLeanError:  # damaged: open_for_writing says what to do
        return None
    cached = set(state.table.column("id").to_pylist())
    damaged = [p for p in state.problems if not p.startswith(cache.EXPECTED)]  # as train reads it
    if (cache.fingerprint_changes(state.manifest, fingerprint) or damaged or not cached.issuperset(rows.ids)
            or _changed_ids(state, rows)):
        return None
    click.echo(cache.float32_notice(cache_dir))
    click.echo(f"cache {cache_dir}: nothing to compute; all {len(rows)} rows are cached")
    return {"rows": 0, "tokens": 0, "seconds": 0.0, "complete": True, "cached_rows": len(rows)}


def _check_cache_first(config: Config, tokenizer) -> None:
    """Refuse a cache made for other settings before anything is tokenised or loaded: the fields that cost nothing
    first, then the model's and reference's digests (overwrite_cache=true replaces the cache instead)."""
    if config.overwrite_cache:
        return
    cache_dir = config.resolved_ref_cache_dir
    problem, fix = "was built for something else", "use another ref_cache_dir, or overwrite_cache=true to replace it"
    cache.check_setup(cache_dir, cheap_fingerprint(config, tokenizer), problem, fix)
    cache.check_setup(cache_dir, setup_fingerprint(config, tokenizer, modeling.reference_spec(config)), problem, fix)


def write_parts(score: BatchScorer, rows: PreparedRows, todo, cache_dir, fingerprint: dict, n_rows: int,
                idle: tuple[int, list] = (0, []), lockstep: bool = False):
    """Score each part of ``todo`` and write it; the progress bar, with ``tokens`` scored. The first Ctrl-C or
    SIGTERM stops after the batch in hand, keeping every finished batch (a part cut short is written with them);
    Interrupted says how many rows are cached.

    ``idle``: (n, rows) forwards of ``rows`` to run after the parts, their scores discarded, and ``lockstep``: the
    processes agree before each forward whether to stop. Both for FSDP, whose forwards are collective: every process
    runs the busiest one's number of forwards and stops before the same one.
    """
    stop = faults.GracefulStop("finishing this batch, saving the rows done and stopping")
    agreed = faults.AgreedStop(stop, (lambda signum: launch.agree_max(signum, score.dev)) if lockstep else None)
    try:
        with stop, bar(n_rows, "reference log-probs", "row", delay=0) as progress:
            progress.tokens, progress.t0 = 0, time.perf_counter()
            for plan_index, batches in todo:
                columns = compute_part(score, faults.until_stopped((rows.take(b) for b in batches), agreed), progress)
                if columns["id"]:
                    cache.write_part(cache_dir, cache.part_name(plan_index, columns["id"]), columns, fingerprint)
                if agreed.decided:
                    raise KeyboardInterrupt
            for _ in range(idle[0]):
                if agreed.requested:
                    raise KeyboardInterrupt
                score(idle[1])
    except KeyboardInterrupt as e:
        state = cache.scan(cache_dir)
        raise Interrupted(f"interrupted: {state.cached_expected} of {len(state.expected)} rows are "
                          f"cached in complete parts in {cache_dir}; rerun `dpo-lean precompute CONFIG.yaml` "
                          "to compute the rest", stop.signum or agreed.signum or getattr(e, "signum", signal.SIGINT)) from None
    return progress


def _usable_rows(cache_dir, rows: PreparedRows) -> set[str]:
    """Ids of the rows in complete, matching parts. Parts that are unreadable or foreign are removed, and so is a
    part holding one of ``rows`` under other token ids than it tokenises to now."""
    state = cache.scan(cache_dir)
    problems = list(state.problems) + _changed_ids(state, rows)
    for problem in problems:
        name = problem.split(":", 1)[0]
        if name.startswith("part-"):
            click.echo(f"cache: removing {name} ({problem.split(': ', 1)[1]}); its rows are recomputed")
            (cache_dir / name).unlink(missing_ok=True)
    if problems:
        state = cache.scan(cache_dir)
    return set(state.table.column("id").to_pylist())


def _changed_ids(state: cache.CacheState, rows: PreparedRows) -> list[str]:
    """'part: row N ...' for the first cached row of each part whose ids hash is not this run's tokenisation."""
    cached_ids, hashes = state.table.column("id").to_pylist(), state.table.column("ids_sha256").to_pylist()
    wanted, digests = set(cached_ids), {}
    for r in rows:  # PreparedRows iterates batch by batch: the ids stay in the prepared file
        if r.id in wanted:
            digests[r.id] = (r.row_index, cache.ids_digest(r.prompt_ids, r.chosen_ids, r.rejected_ids))
    problems, start = {}, 0
    for name, n in state.parts:
        for row_id, h in zip(cached_ids[start:start + n], hashes[start:start + n]):
            if row_id in digests and digests[row_id][1] != h and name not in problems:
                problems[name] = f"{name}: row {digests[row_id][0]} was cached from other token ids"
        start += n
    return list(problems.values())


def _finish(cache_dir, summary: dict) -> dict:
    if summary["rows"]:
        summary["tokens_per_second"] = round(summary["tokens"] / max(summary["seconds"], 1e-9), 1)
        summary["finished"] = cache._now()
        cache.record_run(cache_dir, summary)
        click.echo(f"precompute: {summary['rows']} rows, {summary['tokens']:,} tokens in {summary['seconds']:.1f} s "
                   f"({summary['tokens_per_second']:,.0f} tokens/s), peak memory {summary['peak_memory_gb']:.2f} GB"
                   + (f" ({summary['peak_memory_reserved_gb']:.2f} GB reserved)" if "peak_memory_reserved_gb" in summary
                      else ""))
    state = cache.scan(cache_dir)
    status = "complete" if state.complete else f"{state.cached_expected} of {len(state.expected)} rows so far"
    unused = state.table.num_rows - state.cached_expected
    click.echo(f"cache {cache_dir}: {status}" + (f" ({unused} cached rows not in this dataset, unused)" if unused else ""))
    return {**summary, "complete": state.complete, "cached_rows": state.cached_expected}
