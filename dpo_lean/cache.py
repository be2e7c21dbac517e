"""The reference cache: Parquet parts + ``_manifest.json``, a fingerprint, crash-safe writes, verified reads.

Layout (any Parquet reader reads the directory; names starting with "_" or "." are ignored by them):

    ref_cache/
      _manifest.json                 fingerprint, expected rows, run summaries
      part-00000-<digest>.parquet     row_index, id, ref_chosen_logps, ref_rejected_logps,
      part-00001-<digest>.parquet     ref_chosen_tail_logps, ref_rejected_tail_logps,
                                      chosen_tokens, rejected_tokens, prompt_tokens
      .part-....tmp                   a part being written (renamed when complete)

Every part carries the fingerprint in its key-value metadata. Rows are planned into parts
deterministically, so a rerun recomputes exactly the missing parts with the same batches, and the
final cache equals an uninterrupted run's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .errors import DpoLeanError
from .files import atomic_write_text

FORMAT_VERSION = 2  # 2: + the tail columns (LD-DPO)
MANIFEST = "_manifest.json"
META_FINGERPRINT = b"dpo_lean.fingerprint"
META_DIGEST = b"dpo_lean.fingerprint_sha256"
SCHEMA = pa.schema([
    ("row_index", pa.int64()), ("id", pa.string()),
    ("ref_chosen_logps", pa.float32()), ("ref_rejected_logps", pa.float32()),
    # the sum over the completion's tokens past the pair's shorter completion (0 for the shorter one): LD-DPO
    ("ref_chosen_tail_logps", pa.float32()), ("ref_rejected_tail_logps", pa.float32()),
    ("chosen_tokens", pa.int32()), ("rejected_tokens", pa.int32()), ("prompt_tokens", pa.int32()),
])
# Recorded, never compared: where things were found and which dpo-lean wrote them; the content fields decide.
INFORMATIONAL = {"dpo_lean_version", "dataset.sources", "dataset.spec", "dataset.max_samples", "model.name_or_path"}

# ---------------------------------------------------------------- fingerprint


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights_digest(files: list[Path], block: int = 1 << 20) -> str:
    """Cheap content digest of weight files: name, size, safetensors header, and 3 sampled 1 MiB blocks each."""
    h = hashlib.sha256()
    for f in sorted(files):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            for offset in sorted({0, max(0, size // 2 - block // 2), max(0, size - block)}):
                fh.seek(offset)
                h.update(fh.read(block))
    return h.hexdigest()


def model_fingerprint(name_or_path: str, revision: str = "main", cache_dir: str | None = None) -> dict:
    """Identify the weights without loading them: local files by a cheap digest, hub models by commit."""
    local = Path(name_or_path)
    if local.is_dir():
        config_file = local / "config.json"
        weights = [p for p in local.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()]
        commit = None
    else:
        from transformers.utils import cached_file

        try:
            config_file = Path(cached_file(name_or_path, "config.json", revision=revision, cache_dir=cache_dir))
        except (OSError, ValueError) as e:
            raise DpoLeanError(f"config key 'model_name_or_path': {name_or_path!r} is neither a local directory "
                               f"nor a reachable hub model ({str(e).splitlines()[0]})") from None
        commit, weights = config_file.parent.name, []  # the snapshot folder is named by the commit
    if not config_file.is_file():
        raise DpoLeanError(f"config key 'model_name_or_path': {name_or_path!r} has no config.json")
    return {"name_or_path": str(name_or_path), "revision": revision, "commit": commit,
            "config_sha256": _sha256_bytes(config_file.read_bytes()),
            "weights_sha256": _weights_digest(weights) if weights else None}


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return _sha256_bytes((body + specials).encode())


def build_fingerprint(config, tokenizer, data, reference: dict) -> dict:
    """Everything the cached values depend on. ``reference`` = {precision, quantization, dtype}."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model_fingerprint(config.model_name_or_path, config.model_revision, config.cache_dir),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "template": config.template,
        "template_sha256": _sha256_bytes(data.chat_template.encode()),
        "cutoff_len": config.cutoff_len,
        "truncation_mode": config.truncation_mode,
        "reference": reference,
        "dataset": {"spec": config.dataset, "max_samples": config.max_samples, "rows": data.num_rows,
                    "content_sha256": data.content_sha256, "sources": data.sources},
        "dpo_lean_version": __version__,
    }


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def fingerprint_digest(fp: dict) -> str:
    compared = {k: v for k, v in _flatten(fp).items() if k not in INFORMATIONAL}
    return _sha256_bytes(json.dumps(compared, sort_keys=True, default=str).encode())


def fingerprint_diff(cached: dict, current: dict) -> list[str]:
    """Compared fields whose values differ, as 'field: cached -> current'."""
    a, b = _flatten(cached), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key not in INFORMATIONAL and a.get(key) != b.get(key):
            diffs.append(f"{key}: {_short(a.get(key))} -> {_short(b.get(key))}")
    return diffs


def _short(v) -> str:
    s = str(v)
    return s[:12] + "…" if len(s) > 16 and all(c in "0123456789abcdef" for c in s) else s


# ---------------------------------------------------------------- writing


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


@contextmanager
def _locked(cache_dir: Path):
    """Serialise manifest updates between shard processes sharing a directory."""
    with open(cache_dir / "_lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_manifest(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DpoLeanError(f"{path}: unreadable manifest ({e}); rerun `dpo-lean precompute CONFIG.yaml` to repair "
                           "it") from None


def open_for_writing(cache_dir: Path, fingerprint: dict, expected: dict[int, str], overwrite: bool) -> None:
    """Create the cache (or check an existing one matches ``fingerprint``) and clear half-written parts.

    ``expected`` maps row_index -> id for every row the complete cache will hold.
    """
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DpoLeanError(f"cannot create cache directory {cache_dir}: {e.strerror or e}") from None
    with _locked(cache_dir):
        manifest = _sound_manifest(cache_dir, fingerprint, expected)
        if manifest is not None and manifest.get("fingerprint_sha256") != fingerprint_digest(fingerprint):
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
        for tmp in cache_dir.glob(".part-*.tmp"):
            tmp.unlink(missing_ok=True)  # left by a killed run: never complete, never read
        if manifest is None:
            manifest = {"format_version": FORMAT_VERSION, "fingerprint_sha256": fingerprint_digest(fingerprint),
                        "fingerprint": fingerprint, "expected_rows": len(expected),
                        "rows_sha256": rows_digest(expected), "created": _now(), "runs": []}
            atomic_write_json(cache_dir / MANIFEST, manifest)


def _sound_manifest(cache_dir: Path, fingerprint: dict, expected: dict[int, str]) -> dict | None:
    """The manifest, or None (to be rewritten) when it was damaged: unreadable, or edited out of agreement
    with its own digest or with the rows of this run's (same) fingerprint. Parts carry the fingerprint
    digest themselves, so the ones that match it are kept."""
    from click import echo

    try:
        manifest = read_manifest(cache_dir)
    except DpoLeanError as e:
        echo(f"cache: {e}; rewriting it, parts that match this run's fingerprint are kept", err=True)
        return None
    if manifest is None:
        return None
    consistent = (isinstance(manifest, dict) and isinstance(manifest.get("fingerprint"), dict)
                  and manifest.get("fingerprint_sha256") == fingerprint_digest(manifest["fingerprint"]))
    if consistent and manifest["fingerprint_sha256"] != fingerprint_digest(fingerprint):
        return manifest  # a sound cache of something else: the caller refuses or overwrites it
    if consistent and (manifest.get("expected_rows"), manifest.get("rows_sha256")) == (len(expected),
                                                                                       rows_digest(expected)):
        return manifest
    echo(f"cache: {cache_dir / MANIFEST} was edited or damaged; rewriting it from this run's fingerprint, "
         "parts that match it are kept", err=True)
    return None


def _clear(cache_dir: Path) -> None:
    for p in list(cache_dir.glob("part-*.parquet")) + list(cache_dir.glob(".part-*.tmp")) + [cache_dir / MANIFEST]:
        p.unlink(missing_ok=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def rows_digest(expected: dict[int, str]) -> str:
    h = hashlib.sha256()
    for idx in sorted(expected):
        h.update(f"{idx}:{expected[idx]}\n".encode())
    return h.hexdigest()


def part_name(plan_index: int, row_indices: list[int]) -> str:
    digest = _sha256_bytes(",".join(map(str, sorted(row_indices))).encode())[:10]
    return f"part-{plan_index:05d}-{digest}.parquet"


def write_part(cache_dir: Path, name: str, columns: dict[str, list], fingerprint: dict) -> Path:
    """Write one part under a temporary name, fsync, then rename: a part either exists whole or not at all."""
    cache_dir = Path(cache_dir)
    table = pa.Table.from_pydict(columns, schema=SCHEMA).sort_by("row_index")
    table = table.replace_schema_metadata({
        META_FINGERPRINT: json.dumps(fingerprint, sort_keys=True, default=str).encode(),
        META_DIGEST: fingerprint_digest(fingerprint).encode()})
    final, tmp = cache_dir / name, cache_dir / f".{name}.tmp"
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DpoLeanError(f"cannot write cache part {final}: {e.strerror or e}") from None
    return final


def record_run(cache_dir: Path, summary: dict) -> None:
    """Append a run summary (rows, tokens, seconds, tokens/s, peak memory) to the manifest."""
    cache_dir = Path(cache_dir)
    with _locked(cache_dir):
        manifest = read_manifest(cache_dir)
        manifest.setdefault("runs", []).append(summary)
        atomic_write_json(cache_dir / MANIFEST, manifest)


# ---------------------------------------------------------------- reading


@dataclass
class CacheState:
    manifest: dict
    table: pa.Table  # all rows of all readable parts
    parts: list[tuple[str, int]]  # (name, rows)
    problems: list[str]  # what makes the cache unusable, one line each

    @property
    def complete(self) -> bool:
        return not self.problems and self.table.num_rows == self.manifest["expected_rows"]


def scan(cache_dir: Path) -> CacheState:
    """Read every part, checking each against the manifest; collect problems rather than stop at the first."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise DpoLeanError(f"cache directory {cache_dir} does not exist; run `dpo-lean precompute CONFIG.yaml`")
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise DpoLeanError(f"{cache_dir} has no {MANIFEST}; it is not a dpo-lean cache (run precompute)")
    digest = manifest.get("fingerprint_sha256")
    if digest != fingerprint_digest(manifest.get("fingerprint", {})):
        raise DpoLeanError(f"{cache_dir / MANIFEST}: its fingerprint does not match its digest (edited?); "
                           "rerun `dpo-lean precompute CONFIG.yaml` to repair it")
    tables, parts, problems = [], [], []
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
        if not table.schema.equals(SCHEMA, check_metadata=False):
            problems.append(f"{path.name}: unexpected columns {table.schema.names}")
            continue
        tables.append(table)
        parts.append((path.name, table.num_rows))
    duplicated = _parts_with_duplicate_rows(parts, tables)
    problems += [f"{name}: holds rows that another part (or itself) holds too" for name in duplicated]
    kept = [t for (name, _), t in zip(parts, tables) if name not in duplicated]
    parts = [p for p in parts if p[0] not in duplicated]
    table = pa.concat_tables(kept).replace_schema_metadata(None) if kept else SCHEMA.empty_table()
    return CacheState(manifest, table, parts, problems)


def _parts_with_duplicate_rows(parts: list[tuple[str, int]], tables: list[pa.Table]) -> set[str]:
    """Names of every part that holds a row_index held twice (across parts or within one)."""
    owners: dict[int, list[str]] = {}
    for (name, _), table in zip(parts, tables):
        for index in table.column("row_index").to_pylist():
            owners.setdefault(index, []).append(name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def missing_message(cache_dir: Path, state: CacheState) -> str:
    have = state.table.num_rows
    return (f"cache {cache_dir} is incomplete: {have} of {state.manifest['expected_rows']} rows; "
            "rerun `dpo-lean precompute CONFIG.yaml` to finish it")
