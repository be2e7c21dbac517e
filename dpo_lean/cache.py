"""The reference cache: Parquet parts + ``_manifest.json``, a fingerprint, crash-safe writes, verified reads.

Layout (any Parquet reader reads the directory; names starting with "_" or "." are ignored by them):

    ref_cache/
      _manifest.json                 fingerprint (fingerprint.py), expected rows, run summaries
      _expected.parquet               id, row_index of every row of the dataset precompute last ran on
      part-00000-<digest>.parquet     row_index, id, ref_chosen_logps, ref_rejected_logps,
      part-00001-<digest>.parquet     ref_chosen_tail_logps, ref_rejected_tail_logps,
                                      chosen_tokens, rejected_tokens, prompt_tokens, ids_sha256
      .part-....<host>.<pid>.tmp      a part being written by that process (renamed when complete)

Rows are identified by their content ``id``: a dataset with rows added keeps every cached row and computes
only the new ones; rows no longer in the dataset stay, unused. Every part carries the fingerprint in its
key-value metadata. Rows are planned into parts deterministically, so a rerun recomputes exactly the missing
parts with the same batches, and the final cache equals an uninterrupted run's.

The four log-prob columns are float64: each the float64 sum precompute computed, stored as it is. A cache of the
format before (FLOAT32_FORMAT, its sums accumulated and stored in float32) is still read, as float64, with a
one-line notice; precompute adds no rows to it (overwrite_cache=true rebuilds it).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .errors import DpoLeanError
from .fingerprint import FORMAT_VERSION, fingerprint_diff, fingerprint_digest, sha256_bytes

MANIFEST = "_manifest.json"
EXPECTED = "_expected.parquet"
META_FINGERPRINT = b"dpo_lean.fingerprint"
META_DIGEST = b"dpo_lean.fingerprint_sha256"


def _schema(logps: pa.DataType) -> pa.Schema:
    return pa.schema([
        ("row_index", pa.int64()), ("id", pa.string()),
        ("ref_chosen_logps", logps), ("ref_rejected_logps", logps),
        # the sum over the completion's tokens past the pair's shorter completion (0 for the shorter one): LD-DPO
        ("ref_chosen_tail_logps", logps), ("ref_rejected_tail_logps", logps),
        ("chosen_tokens", pa.int32()), ("rejected_tokens", pa.int32()), ("prompt_tokens", pa.int32()),
        ("ids_sha256", pa.string()),  # of the prompt, chosen and rejected token ids (after truncation): ids_digest
    ])


# The log-prob columns hold the float64 sums precompute computed (logprobs._segment_sums), never rounded to float32.
SCHEMA = _schema(pa.float64())
FLOAT32_FORMAT = 3  # the format before: the same columns, the sums accumulated and stored in float32
READABLE = {FORMAT_VERSION: SCHEMA, FLOAT32_FORMAT: _schema(pa.float32())}  # format -> its parts' schema
EXPECTED_SCHEMA = pa.schema([("id", pa.string()), ("row_index", pa.int64())])
REBUILD = "rerun `dpo-lean precompute CONFIG.yaml overwrite_cache=true` to rebuild it"


def ids_digest(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> str:
    """A row's token ids as one hash: what train checks a cached row against."""
    text = "|".join(",".join(map(str, ids)) for ids in (prompt_ids, chosen_ids, rejected_ids))
    return sha256_bytes(text.encode())[:32]


def check_format(cache_dir: Path, manifest: dict) -> int:
    """The cache's format version, if this dpo-lean reads it (FORMAT_VERSION, or FLOAT32_FORMAT with a notice)."""
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version not in READABLE:
        raise DpoLeanError(f"cache {cache_dir} has format {version}, this dpo-lean reads formats {FLOAT32_FORMAT} "
                           f"and {FORMAT_VERSION} (per-row ids hashes, rows matched by id); {REBUILD}")
    return version


def float32_notice(cache_dir: Path) -> str:
    """The one line a reader of a FLOAT32_FORMAT cache prints."""
    return (f"notice: cache {cache_dir} has format {FLOAT32_FORMAT}: its reference log-probs were summed in float32 "
            "(off by about 1e-6 of a sum: 0.01 nats on 2,000 tokens) and are used as they are; `dpo-lean precompute "
            "CONFIG.yaml overwrite_cache=true` recomputes them as float64 sums")


# ---------------------------------------------------------------- writing


def _locked(cache_dir: Path):
    """Serialise manifest updates between shard processes sharing a directory."""
    return storage.locked(cache_dir, "cache directory", "set ref_cache_dir to a writable folder", lock_file="_lock")


def read_manifest(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DpoLeanError(f"{path}: unreadable manifest ({e}); rerun `dpo-lean precompute CONFIG.yaml` to repair "
                           "it") from None


def check_setup(cache_dir: Path, setup: dict, problem: str, fix: str) -> None:
    """Before anything expensive: refuse a cache whose fingerprint differs in the fields ``setup`` holds (a part of
    the fingerprint computed without reading rows; fingerprint.cheap_fingerprint, setup_fingerprint). No cache: no
    check; a damaged manifest is left to the full check that follows (precompute repairs it, train refuses it)."""
    try:
        manifest = read_manifest(cache_dir)
    except DpoLeanError:
        return
    if not isinstance(manifest, dict):
        return
    check_format(cache_dir, manifest)
    cached = manifest.get("fingerprint", {})
    if not isinstance(cached, dict) or manifest.get("fingerprint_sha256") != fingerprint_digest(cached):
        return
    diffs = fingerprint_changes(manifest, setup)
    if diffs:
        raise DpoLeanError(f"cache {cache_dir} {problem}: {'; '.join(diffs)}; {fix}")


def open_for_writing(cache_dir: Path, fingerprint: dict, expected: dict[str, int], overwrite: bool) -> None:
    """Create the cache (or check an existing one matches ``fingerprint``), record the rows this run's dataset
    holds, and remove this host's temporary parts whose writer is gone (never a live writer's).

    ``expected`` maps id -> row_index for every (distinct) row of this run's dataset.
    """
    cache_dir = Path(cache_dir)
    with _locked(cache_dir):
        manifest = _sound_manifest(cache_dir, fingerprint)
        if manifest is not None and (manifest.get("format_version") != FORMAT_VERSION
                                     or manifest.get("fingerprint_sha256") != fingerprint_digest(fingerprint)):
            if manifest.get("format_version") != FORMAT_VERSION and not overwrite:
                check_format(cache_dir, manifest)  # one it cannot read at all
                raise DpoLeanError(
                    f"cache {cache_dir} has format {manifest.get('format_version')}; this dpo-lean adds rows only to a "
                    f"format {FORMAT_VERSION} cache (log-probs summed in float64); {REBUILD} (every row is recomputed)")
            diffs = fingerprint_diff(manifest.get("fingerprint", {}), fingerprint)
            if not overwrite:
                raise DpoLeanError(
                    f"cache {cache_dir} was built for something else ({'; '.join(diffs) or 'fingerprint differs'}); "
                    "use another ref_cache_dir, or overwrite_cache=true to replace it")
            _clear(cache_dir)
            manifest = None
        elif manifest is None and not (cache_dir / MANIFEST).exists() and any(cache_dir.glob("part-*.parquet")):
            raise DpoLeanError(f"{cache_dir} holds Parquet parts but no {MANIFEST}; it is not a complete dpo-lean "
                               "cache: delete it or choose another ref_cache_dir")
        storage.remove_stale_temporaries(cache_dir)
        manifest = manifest or {"format_version": FORMAT_VERSION, "created": _now(), "runs": []}
        before = dict(manifest)
        manifest.update(fingerprint_sha256=fingerprint_digest(fingerprint), fingerprint=fingerprint,
                        expected_rows=len(expected), rows_sha256=rows_digest(expected))
        if manifest != before or _read_expected(cache_dir, manifest) is None:
            _write_expected(cache_dir, expected)
            storage.atomic_write_json(cache_dir / MANIFEST, manifest)


def _sound_manifest(cache_dir: Path, fingerprint: dict) -> dict | None:
    """The manifest, or None (to be rewritten) when it was damaged: unreadable, or edited out of agreement
    with its own digest. Parts carry the fingerprint digest themselves, so the ones that match it are kept."""
    from click import echo

    try:
        manifest = read_manifest(cache_dir)
    except DpoLeanError as e:
        echo(f"cache: {e}; rewriting it, parts that match this run's fingerprint are kept", err=True)
        return None
    if manifest is None:
        return None
    if isinstance(manifest, dict) and manifest.get("format_version") != FORMAT_VERSION:
        return manifest  # an older format: the caller refuses or overwrites it
    if (isinstance(manifest, dict) and isinstance(manifest.get("fingerprint"), dict)
            and manifest.get("fingerprint_sha256") == fingerprint_digest(manifest["fingerprint"])):
        return manifest
    echo(f"cache: {cache_dir / MANIFEST} was edited or damaged; rewriting it from this run's fingerprint, "
         "parts that match it are kept", err=True)
    return None


def _write_expected(cache_dir: Path, expected: dict[str, int]) -> None:
    table = pa.table({"id": list(expected), "row_index": list(expected.values())}, schema=EXPECTED_SCHEMA)
    storage.write_whole(cache_dir / EXPECTED, lambda tmp: pq.write_table(table, tmp), "cache file")


def _read_expected(cache_dir: Path, manifest: dict) -> dict[str, int] | None:
    """id -> row_index of the rows the manifest expects, or None when the file is missing or disagrees with it."""
    try:
        table = pq.read_table(Path(cache_dir) / EXPECTED)
    except Exception:  # missing, truncated, not Parquet
        return None
    if not table.schema.equals(EXPECTED_SCHEMA, check_metadata=False):
        return None
    expected = dict(zip(table.column("id").to_pylist(), table.column("row_index").to_pylist()))
    return expected if rows_digest(expected) == manifest.get("rows_sha256") else None


def _clear(cache_dir: Path) -> None:
    for p in list(cache_dir.glob("part-*.parquet")) + [cache_dir / MANIFEST, cache_dir / EXPECTED]:
        p.unlink(missing_ok=True)
    storage.remove_stale_temporaries(cache_dir)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def rows_digest(expected: dict[str, int]) -> str:
    h = hashlib.sha256()
    for row_id in sorted(expected):
        h.update(f"{row_id}\n".encode())
    return h.hexdigest()


def part_name(plan_index: int, ids: list[str]) -> str:
    digest = sha256_bytes(",".join(sorted(ids)).encode())[:10]
    return f"part-{plan_index:05d}-{digest}.parquet"


def write_part(cache_dir: Path, name: str, columns: dict[str, list], fingerprint: dict) -> Path:
    """Write one part under this process's temporary name, fsync, then rename: a part either exists whole or not
    at all, and no other writer ever touches the temporary file."""
    cache_dir = Path(cache_dir)
    table = pa.Table.from_pydict(columns, schema=SCHEMA).sort_by("row_index")
    table = table.replace_schema_metadata({
        META_FINGERPRINT: json.dumps(fingerprint, sort_keys=True, default=str).encode(),
        META_DIGEST: fingerprint_digest(fingerprint).encode()})
    return storage.write_whole(cache_dir / name, lambda tmp: pq.write_table(table, tmp), "cache part")


def record_run(cache_dir: Path, summary: dict) -> None:
    """Append a run summary (rows, tokens, seconds, tokens/s, peak memory) to the manifest."""
    cache_dir = Path(cache_dir)
    with _locked(cache_dir):
        manifest = read_manifest(cache_dir)
        manifest.setdefault("runs", []).append(summary)
        storage.atomic_write_json(cache_dir / MANIFEST, manifest)


# ---------------------------------------------------------------- reading


@dataclass
class CacheState:
    manifest: dict
    table: pa.Table  # all rows of all readable parts (also rows no longer in the dataset)
    parts: list[tuple[str, int]]  # (name, rows)
    problems: list[str]  # what makes the cache unusable, one line each
    expected: dict[str, int]  # id -> row_index of the rows of the dataset precompute last ran on
    format_version: int = FORMAT_VERSION  # FLOAT32_FORMAT: its log-prob columns were float32 (read as float64)

    @property
    def cached_expected(self) -> int:
        """Expected rows that are cached."""
        return len(set(self.expected).intersection(self.table.column("id").to_pylist()))

    @property
    def complete(self) -> bool:
        return not self.problems and self.cached_expected == len(self.expected)


def scan(cache_dir: Path) -> CacheState:
    """Read every part, checking each against the manifest; collect problems rather than stop at the first."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise DpoLeanError(f"cache directory {cache_dir} does not exist; run `dpo-lean precompute CONFIG.yaml`")
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise DpoLeanError(f"{cache_dir} has no {MANIFEST}; it is not a dpo-lean cache (run precompute)")
    version = check_format(cache_dir, manifest)
    digest = manifest.get("fingerprint_sha256")
    if digest != fingerprint_digest(manifest.get("fingerprint", {})):
        raise DpoLeanError(f"{cache_dir / MANIFEST}: its fingerprint does not match its digest (edited?); "
                           "rerun `dpo-lean precompute CONFIG.yaml` to repair it")
    expected = _read_expected(cache_dir, manifest)
    problems = [] if expected is not None else [f"{EXPECTED}: missing or not the manifest's rows (rows_sha256)"]
    tables, parts = [], []
    for path in sorted(cache_dir.glob("part-*.parquet")):
        try:
            pf = pq.ParquetFile(path)
            meta = pf.schema_arrow.metadata or {}
            table = pf.read()
        except Exception as e:  # any unreadable part: truncated, not Parquet, bad footer
            problems.append(f"{path.name}: unreadable ({str(e).splitlines()[0]})")
            continue
        if meta.get(META_DIGEST, b"").decode() != digest:
            problems.append(f"{path.name}: belongs to another cache (fingerprint differs)")
            continue
        if not table.schema.equals(READABLE[version], check_metadata=False):
            problems.append(f"{path.name}: unexpected columns {[f'{f.name} {f.type}' for f in table.schema]}")
            continue
        tables.append(table.cast(SCHEMA))  # float32 -> float64 is exact
        parts.append((path.name, table.num_rows))
    duplicated = _parts_with_duplicate_rows(parts, tables)
    problems += [f"{name}: holds rows that another part (or itself) holds too" for name in duplicated]
    kept = [t for (name, _), t in zip(parts, tables) if name not in duplicated]
    parts = [p for p in parts if p[0] not in duplicated]
    table = pa.concat_tables(kept).replace_schema_metadata(None) if kept else SCHEMA.empty_table()
    return CacheState(manifest, table, parts, problems, expected or {}, version)


def fingerprint_changes(manifest: dict, fingerprint: dict) -> list[str]:
    """The compared fingerprint fields in which the cache differs from this run's ``fingerprint`` (or from the part
    of it given). A readable older format (FLOAT32_FORMAT) is not a difference: its rows are read, with a notice; it
    identified the tokenizer by its serialisation, so that digest stands in for today's."""
    cached, version = manifest.get("fingerprint", {}), manifest.get("format_version")
    current = fingerprint
    if version in READABLE and version != FORMAT_VERSION:
        current = {**fingerprint, "format_version": version}
        if "tokenizer_sha256" in fingerprint:
            current["tokenizer_sha256"] = fingerprint.get("tokenizer_serialised_sha256")
    return fingerprint_diff({k: v for k, v in cached.items() if k in current}, current)


def _parts_with_duplicate_rows(parts: list[tuple[str, int]], tables: list[pa.Table]) -> set[str]:
    """Names of every part that holds a row id held twice (across parts or within one)."""
    owners: dict[str, list[str]] = {}
    for (name, _), table in zip(parts, tables):
        for row_id in table.column("id").to_pylist():
            owners.setdefault(row_id, []).append(name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def missing_message(cache_dir: Path, state: CacheState) -> str:
    return (f"cache {cache_dir} is incomplete: {state.cached_expected} of {len(state.expected)} rows; "
            "rerun `dpo-lean precompute CONFIG.yaml` to finish it")
