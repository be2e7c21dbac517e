"""The cache fingerprint: what the cached values depend on (compared) and what is only recorded (information).

Compared: the model's and the reference's content (config and whole-file weights digests; a hub model by the
commit its snapshot resolves to, however it was named), the tokenizer, the template, cutoff_len,
truncation_mode, the reference's precision, quantisation, dtype and adapters. Information: where things were
found (paths, hub ids, revision names), the dataset (rows are matched one by one by their content id, so a
changed dataset is not a different cache), the library versions and the attention kernel (they move values
by float rounding only), dpo-lean's version.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from importlib import metadata
from pathlib import Path

from . import __version__
from .errors import DpoLeanError
from .paths import check_local
from .storage import atomic_write_text

PREPARED_FORMAT_VERSION = 1  # of the prepared data (data/prepared.py)
# 2: + the tail columns (LD-DPO); 3: + ids_sha256, rows matched by id, whole-file digests; 4: log-probs in float64
FORMAT_VERSION = 4
INFORMATIONAL_PREFIXES = ("dataset.", "runtime.")
INFORMATIONAL = {"dpo_lean_version", "tokenizer_serialised_sha256", "model.name_or_path", "model.revision",
                 "reference.model.name_or_path", "reference.model.revision", "reference.adapter_paths"}
# The config keys the reference cache's identity comes from, by what they set: its compared fingerprint fields, and
# the rows' token ids that each cached row's ids_sha256 is checked against. One cache serves one value of each, so a
# sweep (which shares its base's cache) cannot vary them. tests/test_cache_identity.py records the keys the
# fingerprint's builders read and checks each is declared here or in READ_NOT_COMPARED.
IDENTITY_KEYS = {
    "model": ("model_name_or_path", "model_revision"),
    "reference": ("ref_precision", "quantization_bit", "quantization_type", "double_quantization", "bf16", "fp16",
                  "ref_model", "ref_model_adapters", "ref_model_quantization_bit", "adapter_name_or_path",
                  "create_new_adapter"),
    "template": ("template", "enable_thinking", "preserve_thinking", "default_system"),
    "token ids": ("cutoff_len", "truncation_mode"),
    "rows": ("dataset", "dataset_dir", "eval_dataset", "max_samples"),
}
# Keys those builders read that do not change what is cached: where files are found, the attention kernel
# (recorded as information), whether remote code may run, and output_dir (a starting adapter may not lie in it).
READ_NOT_COMPARED = frozenset({"cache_dir", "flash_attn", "trust_remote_code", "output_dir"})


def identity_keys() -> frozenset[str]:
    """Every config key in IDENTITY_KEYS."""
    return frozenset(k for keys in IDENTITY_KEYS.values() for k in keys)


_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_informational(key: str) -> bool:
    """Is this flattened fingerprint field recorded only (never compared)?"""
    return key in INFORMATIONAL or key.startswith(INFORMATIONAL_PREFIXES)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- whole-file digests, memoised


def memo_path() -> Path:
    """Where file digests are remembered: $DPO_LEAN_CACHE_HOME, else $XDG_CACHE_HOME/dpo_lean, else ~/.cache/dpo_lean."""
    if os.environ.get("DPO_LEAN_CACHE_HOME"):
        return Path(os.environ["DPO_LEAN_CACHE_HOME"]) / "file_sha256.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dpo_lean" / "file_sha256.json"


def _read_memo(path: Path) -> dict:
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or corrupt: every file is hashed again
    return memo if isinstance(memo, dict) else {}


def _stamp(st: os.stat_result) -> list:
    """What changes when a file's bytes may have: size, mtime, ctime (not settable by touch), inode."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes: the hub blob's name when the file resolves to one (hub LFS blobs are named by
    their sha256), else hashed once and remembered by path, size, mtime, ctime and inode."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and _SHA256.fullmatch(real.name):
        return real.name
    st, memo_file = real.stat(), memo_path()
    memo = _read_memo(memo_file)
    entry = memo.get(str(real))
    if isinstance(entry, dict) and entry.get("stamp") == _stamp(st) and _SHA256.fullmatch(str(entry.get("sha256"))):
        return entry["sha256"]
    from .progress import bar

    h = hashlib.sha256()
    with open(real, "rb") as fh, bar(st.st_size, f"hashing {real.name}", "B", unit_scale=True, unit_divisor=1024) as shown:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
            shown.update(len(block))
    memo = _read_memo(memo_file)  # another process may have added entries meanwhile
    memo[str(real)] = {"stamp": _stamp(st), "sha256": h.hexdigest()}
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_file, json.dumps(memo, indent=0) + "\n")
    except (OSError, DpoLeanError):
        pass  # an unwritable memo only costs hashing again next time
    return h.hexdigest()


def weights_digest(files: list[Path]) -> str:
    """One digest of weight files: each file's name and the SHA-256 of its whole content."""
    lines = "".join(f"{f.name}:{file_sha256(f)}\n" for f in sorted(files, key=lambda p: p.name))
    return sha256_bytes(lines.encode())


# ---------------------------------------------------------------- where a model is


def hub_snapshot_commit(folder: Path) -> str | None:
    """The commit sha of a hub cache snapshot folder (…/models--org--name/snapshots/<sha>), else None."""
    folder = Path(folder).resolve()
    if (folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(("models--", "datasets--"))
            and _COMMIT.fullmatch(folder.name)):
        return folder.name
    return None


def _locate(name_or_path: str, filename: str, revision: str, cache_dir: str | None, key: str, what: str) -> Path:
    """The folder holding ``filename``: a local folder as it is, a hub id resolved to its cached snapshot."""
    local = Path(name_or_path)
    if local.is_dir():
        return local
    check_local(name_or_path, key, what)
    from transformers.utils import cached_file

    try:
        return Path(cached_file(name_or_path, filename, revision=revision, cache_dir=cache_dir)).parent
    except (OSError, ValueError) as e:
        raise DpoLeanError(f"config key '{key}': {name_or_path!r} is neither a local {what} nor a reachable hub "
                           f"{what} ({str(e).splitlines()[0]})") from None


def _content(folder: Path, config_file: Path, weights: list[Path]) -> dict:
    """Identity of a model or adapter folder. A hub snapshot is pinned by its commit (the hub's files of a
    commit never change; weights may not be downloaded yet); any other folder by its weights' whole digests."""
    commit = hub_snapshot_commit(folder)
    return {"commit": commit, "config_sha256": sha256_bytes(config_file.read_bytes()),
            "weights_sha256": None if commit or not weights else weights_digest(weights)}


def model_fingerprint(name_or_path: str, revision: str = "main", cache_dir: str | None = None,
                      key: str = "model_name_or_path") -> dict:
    """Identify the weights without loading them. A hub id, its revision name or commit sha, and its local
    snapshot folder all give the same compared fields. ``key``: the config key that names the model, for errors."""
    folder = _locate(name_or_path, "config.json", revision, cache_dir, key, "model")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise DpoLeanError(f"config key '{key}': {name_or_path!r} has no config.json")
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()]
    return {"name_or_path": str(name_or_path), "revision": revision, **_content(folder, config_file, weights)}


def adapter_fingerprint(name_or_path: str, revision: str = "main", cache_dir: str | None = None,
                        key: str = "adapter_name_or_path") -> dict:
    """Identify a PEFT adapter without loading it, as model_fingerprint does (its adapter_config.json and
    adapter_model.* files). The path is left out (the caller records it apart, as information)."""
    folder = _locate(name_or_path, "adapter_config.json", revision, cache_dir, key, "adapter folder")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise DpoLeanError(f"config key '{key}': {name_or_path!r} holds no adapter (adapter_config.json); "
                           "name the folder a PEFT save_pretrained wrote")
    weights = [p for p in folder.iterdir() if p.name.startswith("adapter_model.") and p.is_file()]
    return _content(folder, config_file, weights)


# Text the tokenizer digest encodes: words, case, digits, whitespace runs, code, accents, CJK, emoji, markup.
TOKENIZER_PROBE = ("The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! 0 7 42 2024 3.14159 1,000,000\n"
                   "  two  spaces\tand a tab\n\n\ndef f(x):\n    return {'k': [x, None]}  # code\n"
                   "naïve café Ünïcödé straße — ‘quotes’ “too” … 日本語のテキスト 中文 한국어 😀👍🏽 <b>html</b> &amp;")


def tokenizer_fingerprint(tokenizer) -> str:
    """What the tokenizer does, not how a library writes it down: its vocabulary (added tokens included), its special
    tokens and the ids it gives a probe text, with and without special tokens. A tokenizers or transformers release
    that serialises the same tokenizer differently leaves caches valid; one that tokenises differently changes the
    probe's ids (and each cached row is checked against its own ids, ids_sha256, in any case)."""
    body = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
            "specials": tokenizer.special_tokens_map,
            "probe": [tokenizer(TOKENIZER_PROBE, add_special_tokens=a)["input_ids"] for a in (False, True)]}
    return sha256_bytes(json.dumps(body, sort_keys=True, default=str).encode())


def serialised_tokenizer_sha256(tokenizer) -> str:
    """The tokenizer's identity in cache format 3 and before: its backend's serialisation and special tokens.
    Recorded as information; compared only with a cache of that format (cache.fingerprint_changes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return sha256_bytes((body + json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)).encode())


def runtime_info(config) -> dict:
    """Library versions and the attention kernel: recorded so a report can say what computed a cache."""
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {**{lib: version(lib) for lib in ("torch", "transformers", "peft", "bitsandbytes")},
            "flash_attn": config.flash_attn}


def cheap_fingerprint(config, tokenizer) -> dict:
    """The compared fields that cost nothing to compute (no weights hashed, no row read): what a changed
    cutoff_len, truncation_mode, template or tokenizer changes. Checked first, before any expensive step."""
    from .data.templates import definition_text, template_for

    return {"format_version": FORMAT_VERSION, "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
            "tokenizer_serialised_sha256": serialised_tokenizer_sha256(tokenizer),
            "template": config.template,
            "template_sha256": sha256_bytes(definition_text(template_for(config, tokenizer)).encode()),
            "cutoff_len": config.cutoff_len, "truncation_mode": config.truncation_mode}


def setup_fingerprint(config, tokenizer, reference: dict) -> dict:
    """Every compared field, without reading a row: the cheap ones, the model's content (whole-file digests, hashed
    once and remembered) and how the reference is loaded (``reference``: modeling.reference_spec)."""
    return {**cheap_fingerprint(config, tokenizer),
            "model": model_fingerprint(config.model_name_or_path, config.model_revision, config.cache_dir),
            "reference": reference}


def build_fingerprint(config, tokenizer, data, reference: dict) -> dict:
    """Everything the cached values depend on, and what is recorded beside it. ``reference``: how the reference is
    loaded (modeling.reference_spec: precision, quantization, dtype; and, when set, its own model and adapters)."""
    return {
        **setup_fingerprint(config, tokenizer, reference),
        "template_sha256": sha256_bytes(data.chat_template.encode()),
        "dataset": {"spec": config.dataset, "max_samples": config.max_samples, "rows": data.num_rows,
                    "content_sha256": data.content_sha256, "sources": data.sources},
        "runtime": runtime_info(config),
        "dpo_lean_version": __version__,
    }


def prepared_fingerprint(config, tokenizer, template_text: str, sources: dict) -> dict:
    """What prepared data's ids and skips depend on. ``sources``: the dataset files' identities
    (sources.source_identity), or the loaded rows' content hash where a source has no stable identity."""
    import tokenizers
    import transformers

    return {"format_version": PREPARED_FORMAT_VERSION, "sources": sources, "max_samples": config.max_samples,
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "template": config.template,
            "template_sha256": sha256_bytes(template_text.encode()), "cutoff_len": config.cutoff_len,
            "truncation_mode": config.truncation_mode, "dpo_lean": __version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def prepared_digest(fp: dict) -> str:
    """The prepared data's file name: every field of its fingerprint counts (there is nothing informational)."""
    return sha256_bytes(json.dumps(fp, sort_keys=True, default=str).encode())[:20]


# ---------------------------------------------------------------- comparing


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def compared(fp: dict) -> dict:
    return {k: v for k, v in flatten(fp).items() if not is_informational(k)}


def fingerprint_digest(fp: dict) -> str:
    return sha256_bytes(json.dumps(compared(fp), sort_keys=True, default=str).encode())


def fingerprint_diff(cached: dict, current: dict) -> list[str]:
    """Compared fields whose values differ, as 'field: cached -> current'."""
    a, b = compared(cached), compared(current)
    return [f"{key}: {_short(a.get(key))} -> {_short(b.get(key))}"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def _short(v) -> str:
    s = str(v)
    return s[:12] + "…" if len(s) > 16 and all(c in "0123456789abcdef" for c in s) else s
