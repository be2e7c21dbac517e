"""What training and evaluation score: the prepared rows joined to the verified reference cache, the eval split,
and the collator that turns rows into batches. train, evaluate and sweep all read rows through here.

    tokenizer, data, fingerprint, ref = prepare_run(config)   # ref: row id -> REF_COLUMNS, checked row by row
    train_rows, eval_set = split_eval(config, tokenizer, data, ref)
    dataset = to_dataset(rows, ref); batch = PairCollator(...)(features)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cache, launch, modeling
from .config import Config, require
from .data.pipeline import prepare_data, skip_summary, write_skip_report
from .data.prepared import PreparedRows
from .errors import DpoLeanError
from .fingerprint import build_fingerprint, cheap_fingerprint, setup_fingerprint
from .layout import Sharing, collate

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tail_logps", "ref_rejected_tail_logps")


MISMATCH = "does not match this run"
REBUILD = "rebuild it with `dpo-lean precompute CONFIG.yaml overwrite_cache=true`"


def _require_cache(cache_dir: Path) -> None:
    if not (Path(cache_dir) / cache.MANIFEST).exists():
        raise DpoLeanError(f"no reference cache at {cache_dir}; run `dpo-lean precompute CONFIG.yaml` first "
                           "(or set ref_cache_dir)")


def check_cache_setup(config: Config, tokenizer) -> None:
    """Refuse a missing reference cache, or one made for other settings, before anything is tokenised or hashed:
    the fields that cost nothing (cutoff_len, template, tokenizer...) first, then the model's and reference's."""
    for c in config.cache_configs():
        _require_cache(c.resolved_ref_cache_dir)
        cache.check_setup(c.resolved_ref_cache_dir, cheap_fingerprint(c, tokenizer), MISMATCH, REBUILD)
        cache.check_setup(c.resolved_ref_cache_dir, setup_fingerprint(c, tokenizer, modeling.reference_spec(c)),
                          MISMATCH, REBUILD)


def load_reference(config: Config, fingerprint: dict, rows: PreparedRows,
                   what: str = "training rows") -> dict[str, tuple[float, ...]]:
    """id -> the REF_COLUMNS values for every row, after checking the cache is the right one and that each
    row was cached from the token ids it has now. Cached rows the dataset no longer holds are not used."""
    cache_dir = config.resolved_ref_cache_dir
    _require_cache(cache_dir)
    state = cache.scan(cache_dir)  # refuses a format it cannot read in one line
    if state.format_version == cache.FLOAT32_FORMAT:
        launch.say(cache.float32_notice(cache_dir))
    diffs = cache.fingerprint_changes(state.manifest, fingerprint)
    if diffs:
        raise DpoLeanError(f"cache {cache_dir} {MISMATCH}: {'; '.join(diffs)}; {REBUILD}")
    damaged = [p for p in state.problems if not p.startswith(cache.EXPECTED)]  # train needs no expected list
    if damaged:
        raise DpoLeanError(f"cache {cache_dir} is damaged: {'; '.join(damaged)}; "
                           "rerun `dpo-lean precompute CONFIG.yaml` to repair it")
    table = state.table.to_pydict()
    by_id = {i: k for k, i in enumerate(table["id"])}
    ids, row_index = rows.ids, rows.column("row_index")
    missing = [n for n, i in enumerate(ids) if i not in by_id]
    if missing:
        raise DpoLeanError(f"{len(missing)} of {len(rows)} {what} are not in the cache {cache_dir} (first: row "
                           f"{row_index[missing[0]]}); run `dpo-lean precompute CONFIG.yaml` to compute them "
                           "(only they are computed)")
    ref = {}
    for r in rows:  # PreparedRows iterates batch by batch: the ids stay in the prepared file
        k = by_id[r.id]
        if table["ids_sha256"][k] != cache.ids_digest(r.prompt_ids, r.chosen_ids, r.rejected_ids):
            raise DpoLeanError(f"cache {cache_dir}: row {r.row_index} (id {r.id}) was cached from other token "
                               "ids than it tokenises to now; rerun `dpo-lean precompute CONFIG.yaml` to recompute it")
        ref[r.id] = tuple(table[c][k] for c in REF_COLUMNS)
    return ref


def split_rows(rows: PreparedRows, val_size: float, seed: int) -> tuple[PreparedRows, PreparedRows]:
    """Held-out rows chosen by seed: ``val_size`` < 1 is a share of the rows, >= 1 a count.

    Rows with the same content id (a pair the dataset holds twice) stay together: whole ids are held out, in a seeded
    order, until the count is reached (an id's extra copies may pass it), so eval never scores a pair training
    saw. Without duplicates it holds out exactly the rows a row-by-row draw with the same seed would.
    """
    if not val_size:
        return rows, rows.subset([])
    n_val = int(val_size) if val_size >= 1 else max(1, round(val_size * len(rows)))
    groups: dict[str, list[int]] = {}
    for position, row_id in enumerate(rows.ids):
        groups.setdefault(row_id, []).append(position)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    for group in order:
        if len(held) >= n_val:
            break
        held.update(group)
    if n_val >= len(rows) or len(held) == len(rows):
        copies = f", copies of {len(groups)} distinct pairs" if len(groups) < len(rows) else ""
        raise DpoLeanError(f"config key 'val_size': {val_size} leaves no training rows ({len(rows)} rows kept{copies})")
    return (rows.subset([i for i in range(len(rows)) if i not in held]),
            rows.subset([i for i in range(len(rows)) if i in held]))


def duplicate_note(rows: PreparedRows, eval_rows: PreparedRows, eval_dataset: bool) -> str | None:
    """One line on repeated pairs where they touch evaluation, or None: rows of the dataset that repeat another's
    content (val_size keeps each id's copies on one side), or eval_dataset rows that the training rows hold too."""
    ids = rows.ids
    if eval_dataset:
        shared = set(ids).intersection(eval_rows.ids)
        return (f"eval_dataset: {len(shared)} of its distinct pairs are also training rows (same content); they raise "
                "its eval metrics" if shared else None)
    repeats = len(ids) - len(set(ids))
    return (f"data: {repeats} rows repeat another row's content (same id); val_size holds each id's copies out "
            "together, or none of them" if repeats and len(eval_rows) else None)


def to_dataset(rows: PreparedRows, ref: dict | None):
    """The rows as a datasets.Dataset memory-mapped from the prepared Arrow file, with their reference columns
    (none for a reference-free run); ids become Python lists only batch by batch, in the collator."""
    from datasets import Dataset

    dataset = Dataset.from_file(str(rows.path))
    dataset = dataset.select_columns(["row_index", "prompt_ids", "chosen_ids", "rejected_ids", "length"])
    if ref is not None:  # the whole file's rows, before the subset: a column added after a select copies every row
        ids = rows.table.column("id").to_pylist()
        nan = (float("nan"),) * len(REF_COLUMNS)  # a row of the file outside ``rows`` (never selected below)
        for i, name in enumerate(REF_COLUMNS):
            dataset = dataset.add_column(name, [ref.get(r, nan)[i] for r in ids])
    if rows.positions is not None:
        dataset = dataset.select(rows.positions, keep_in_memory=True)  # the index map only; no cache file beside it
    return dataset


@dataclass
class PairCollator:
    """Pairs -> a batch for batch_scores: two sequences per pair, or one shared sequence where ``sharing`` pays;
    ``tails``: with LD-DPO's tail marks (see layout.mark_tails)."""

    pad_id: int
    sharing: Sharing | None = None
    tails: bool = False

    def __call__(self, features: list[dict]) -> dict:
        ids = ([f["prompt_ids"] for f in features], [f["chosen_ids"] for f in features],
               [f["rejected_ids"] for f in features])
        batch = collate(*ids, self.pad_id, self.sharing, tails=self.tails)
        for name in REF_COLUMNS:
            if name in features[0]:
                batch[name] = torch.tensor([f[name] for f in features], dtype=torch.float64)  # as cached
        batch["chosen_tokens"] = torch.tensor([len(f["chosen_ids"]) for f in features], dtype=torch.float32)
        batch["rejected_tokens"] = torch.tensor([len(f["rejected_ids"]) for f in features], dtype=torch.float32)
        batch["row_index"] = torch.tensor([f["row_index"] for f in features], dtype=torch.long)
        return batch


# ---------------------------------------------------------------- the trainer


def prepare_run(config: Config):
    """Tokenizer, data and verified reference: everything train needs before it loads the policy.

    A reference-free pref_loss (orpo, simpo; see Config.needs_reference) reads no cache: fingerprint and reference are None.
    """
    require(config, "model_name_or_path", "dataset")
    tokenizer = modeling.load_tokenizer(config)
    if config.needs_reference:
        check_cache_setup(config, tokenizer)
    data = prepare_data(config, tokenizer)
    if not config.needs_reference:
        return tokenizer, data, None, None
    fingerprint = build_fingerprint(config, tokenizer, data, modeling.reference_spec(config))
    ref = load_reference(config, fingerprint, data.rows)
    return tokenizer, data, fingerprint, ref


@dataclass
class EvalSet:
    """Rows to evaluate on, with their reference log-probs, and where they come from."""

    rows: PreparedRows
    ref: dict[str, tuple[float, ...]] | None  # None for a reference-free run
    source: str
    fingerprint: dict | None = None  # the eval_dataset cache's; None for rows held out of the training cache


def split_eval(config: Config, tokenizer, data, ref) -> tuple[PreparedRows, EvalSet]:
    """Training rows and the eval set: eval_dataset with its own cache, or the val_size rows held out by seed."""
    if config.eval_dataset:
        eval_set = load_eval_dataset(config, tokenizer)
        train_rows = data.rows
    else:
        train_rows, eval_rows = split_rows(data.rows, config.val_size, config.seed)
        eval_set = EvalSet(eval_rows, ref, f"val_size={config.val_size:g} of {config.dataset}")
    note = duplicate_note(data.rows, eval_set.rows, bool(config.eval_dataset))
    if note:
        launch.say(note)
    return train_rows, eval_set


def load_eval_dataset(config: Config, tokenizer) -> EvalSet:
    """eval_dataset's rows with the reference log-probs of its own cache (eval_ref_cache_dir), verified alike."""
    require(config, "model_name_or_path", "eval_dataset")
    eval_config = config.eval_set_config()
    eval_data = prepare_data(eval_config, tokenizer)
    launch.say(f"eval data: {skip_summary(eval_data)}")
    if eval_data.skips and launch.is_main_process():
        launch.say(f"skipped eval rows listed in {write_skip_report(eval_data, eval_config.metrics_dir)}")
    if not config.needs_reference:
        return EvalSet(eval_data.rows, None, f"eval_dataset={config.eval_dataset}")
    fingerprint = build_fingerprint(eval_config, tokenizer, eval_data, modeling.reference_spec(eval_config))
    eval_ref = load_reference(eval_config, fingerprint, eval_data.rows, what="eval rows")
    return EvalSet(eval_data.rows, eval_ref, f"eval_dataset={config.eval_dataset}", fingerprint)
