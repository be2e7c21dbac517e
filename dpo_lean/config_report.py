"""``dpo-lean config``: see a run before running it. Every key with its value and where the value came from
(default, YAML, override); what the run reads and writes; whether the prepared data and the reference cache already
match and where train would start. Nothing is tokenised and no model is loaded: the answers come from the
fingerprints and manifests (the tokenizer is loaded, and files are hashed once, as every command does)."""

from __future__ import annotations

from pathlib import Path

from . import cache, faults, fingerprint, modeling
from .config import FIELDS, Config, load_config, parse_override, read_config_file
from .data import prepared, sources
from .errors import DpoLeanError
from .keys import lf_status, shown_value


def report(config_path, overrides) -> list[str]:
    """The lines `dpo-lean config` prints."""
    config = load_config(config_path, overrides)
    return [*_keys(config, config_path, overrides), "", *_reads(config), "", *_writes(config), "", *_state(config)]


def _keys(config: Config, config_path, overrides) -> list[str]:
    written = read_config_file(config_path)
    given = {parse_override(o)[0] for o in overrides}
    lines = [f"config {config_path}" + (f" with {len(overrides)} override(s)" if overrides else ""),
             f"  {'key':<32} {'value':<40} from"]
    for name in FIELDS:
        origin = "override" if name in given else "YAML" if name in written else "default"
        lines.append(f"  {name:<32} {shown_value(getattr(config, name)):<40} {origin}")
    ignored = sorted(k for k in set(written) | given if isinstance(k, str) and k not in FIELDS)
    if ignored:
        lines.append("  LLaMA-Factory keys accepted with no effect here: "
                     + ", ".join(f"{k} ({lf_status(k)})" for k in ignored))
    return lines


def _reads(config: Config) -> list[str]:
    lines = ["reads:", f"  model: {config.model_name_or_path}{_local(config.model_name_or_path)}"]
    lines += [f"  {key}: {getattr(config, key)}{_local(getattr(config, key))}"
              for key in ("adapter_name_or_path", "ref_model", "ref_model_adapters", "resume_from_checkpoint")
              if getattr(config, key) not in (None, "")]
    for key in ("dataset", "eval_dataset"):
        if getattr(config, key):
            try:
                lines += [f"  {key} {line}" for line in sources.where(getattr(config, key), config.dataset_dir)]
            except DpoLeanError as e:
                lines.append(f"  {key}: {e}")
    return lines


def _local(name: str) -> str:
    return " (local folder)" if Path(name).is_dir() else " (local file)" if Path(name).is_file() else " (hub id)"


def _writes(config: Config) -> list[str]:
    lines = ["writes:", f"  output_dir: {config.output_dir} (train: adapter, checkpoint-*, dpo_metrics/)",
             f"  prepared data: {config.resolved_prepared_dir}/<fingerprint>.arrow (every command; reused when it "
             "matches)"]
    if config.needs_reference:
        lines.append(f"  reference cache: {config.resolved_ref_cache_dir} (precompute)")
        if config.eval_dataset:
            lines.append(f"  eval reference cache: {config.resolved_eval_ref_cache_dir} (precompute)")
    else:
        lines.append(f"  reference cache: none (pref_loss {config.pref_loss} is reference-free)")
    lines.append(f"  export: {config.export_dir or Path(config.output_dir) / 'merged'} (export)")
    return lines


def _state(config: Config) -> list[str]:
    lines = ["state:"]
    try:
        tokenizer = modeling.load_tokenizer(config)
    except DpoLeanError as e:
        return lines + [f"  cannot tell (the tokenizer does not load: {e})"]
    for c in config.cache_configs():
        name = "eval " if c is not config else ""
        found, line = _prepared(c, tokenizer)
        lines.append(f"  {name}prepared data: {line}")
        if config.needs_reference:
            lines.append(f"  {name}reference cache: {_cache(c, tokenizer, found)}")
    lines.append(f"  train: {_start(config)}")
    return lines


def _prepared(config: Config, tokenizer):
    """(the prepared rows, or None; one line) for config's dataset with this tokenizer, found by fingerprint."""
    from .data.templates import definition_text, template_for

    identity = sources.source_identity(config.dataset, config.dataset_dir)
    if identity is None:
        return None, "cannot tell without loading the rows (a hub dataset without a pinned revision)"
    text = definition_text(template_for(config, tokenizer))
    fp = fingerprint.prepared_fingerprint(config, tokenizer, text, identity)
    key, directory = fingerprint.prepared_digest(fp), config.resolved_prepared_dir
    try:
        found = prepared.read(directory, key)
    except prepared.Damaged as e:
        return None, f"{directory / key}.arrow is unreadable ({e}); the next command tokenises again"
    if found is None:
        reason = prepared.stale_reason(directory, key, config.dataset, fp) if directory.is_dir() else ""
        other = f" (the prepared data there was made for other settings: {reason})" if reason else ""
        return None, f"not made yet for these settings: the next command tokenises the dataset{other}"
    meta, rows = found
    return rows, f"ready, {len(rows)} of {meta['num_rows']} rows kept ({rows.path})"


def _cache(config: Config, tokenizer, rows) -> str:
    """Whether the reference cache matches this run: its fingerprint, then (when the prepared data is there) its rows."""
    cache_dir = config.resolved_ref_cache_dir
    if not (cache_dir / cache.MANIFEST).is_file():
        return f"none at {cache_dir} yet: `dpo-lean precompute CONFIG.yaml` builds it"
    try:
        setup = fingerprint.setup_fingerprint(config, tokenizer, modeling.reference_spec(config))
        cache.check_setup(cache_dir, setup, "does not match", "`dpo-lean precompute CONFIG.yaml overwrite_cache=true` "
                                                            "rebuilds it")
        state = cache.scan(cache_dir)
    except DpoLeanError as e:
        return str(e)
    if rows is None:
        return (f"made for these settings ({state.table.num_rows} rows cached); which of this dataset's rows it holds "
                "is known once the data is prepared")
    cached = set(state.table.column("id").to_pylist())
    ids = set(rows.ids)
    have = len(ids & cached)
    todo = "" if have == len(ids) else f"; precompute computes the other {len(ids) - have}"
    damaged = f"; damaged: {'; '.join(state.problems)}" if state.problems else ""
    return f"matches these settings; {have} of the {len(ids)} distinct rows are cached{todo}{damaged}"


def _start(config: Config) -> str:
    """Where train would start (faults.resume_plan), without removing anything."""
    try:
        checkpoint, line = faults.resume_plan(config)
    except DpoLeanError as e:
        return f"refuses: {e}"
    return line or "from step 0"
