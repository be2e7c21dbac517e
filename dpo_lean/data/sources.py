"""Find dataset files (paths, dataset_info.json names, hub ids) and read their rows, naming every bad line.

Local files are read with the stdlib (JSON, JSON lines, CSV) or pyarrow (Parquet), never with
``datasets.load_dataset``, so that each bad row is counted and named instead of failing the file.
Rows are located as ``<path> line N`` (JSON, JSON lines, CSV; 1-based) or ``<path> row N``
(Parquet and hub datasets; 0-based, as ``ds[N]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

from ..errors import DpoLeanError
from ..fingerprint import file_sha256
from ..paths import did_you_mean, looks_like_path
from .formats import FormatSpec, detect_layout, normalise_rows
from .readers import JSON_DECODER, first_line, iter_file
from .records import Record, Skip

SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
REGISTRY = "dataset_info.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
Rows = list[tuple[str, Any]]  # (where the row is, the raw row)


@dataclass
class LoadedData:
    """Every row read: the kept records and a skip for each of the others."""

    records: list[Record] = field(default_factory=list)  # kept rows, in load order
    skips: list[Skip] = field(default_factory=list)  # every row not kept, with reason
    num_rows: int = 0  # rows read in total (= len(records) + len(skips))
    rows_found: int = 0  # rows counted so far, for progress: a file's count is known before its rows are yielded
    sources: list[dict] = field(default_factory=list)  # {"name", "path", "sha256", "rows", "layout"} per dataset


@dataclass(frozen=True)
class _Resolved:
    """Where one dataset spec points: a local file or a hub dataset, and how to read its rows."""

    name: str
    fmt: FormatSpec
    path: Path | None = None  # as displayed in messages (may be relative)
    hub: dict | None = None  # {"id", "subset", "split", "revision"}


def load_records(dataset: str, dataset_dir: str = "data", max_samples: int | None = None) -> LoadedData:
    """Load comma-separated dataset specs in order; ``max_samples`` keeps the first N rows of each."""
    loaded = LoadedData()
    for records, skips in stream_records(dataset, dataset_dir, max_samples, loaded):
        loaded.records += records
        loaded.skips += skips
    return loaded


def stream_records(dataset: str, dataset_dir: str = "data", max_samples: int | None = None,
                   summary: LoadedData | None = None, chunk_rows: int = 1024) -> Iterator[tuple[list[Record], list[Skip]]]:
    """:func:`load_records` chunk by chunk, holding one chunk of rows at a time (a JSON lines file is read line by
    line; a JSON array is read whole). Each file is read twice: once to check it and detect its layout (from all
    its rows), then to normalise it. ``summary`` gets num_rows and sources as each dataset ends."""
    specs = [spec.strip() for spec in str(dataset or "").split(",") if spec.strip()]
    if not specs:
        raise DpoLeanError("dataset is empty; set it to a file path, a name from dataset_info.json or a hub id")
    summary = summary if summary is not None else LoadedData()
    for spec in specs:
        resolved = _resolve(spec, Path(dataset_dir))
        label = str(resolved.path or spec)
        fmt = replace(resolved.fmt, text_cells=resolved.path is not None and resolved.path.suffix.lower() == ".csv")
        open_rows, path, fingerprint = _rows_of(resolved, max_samples)
        count = [0]
        try:
            layout = detect_layout(_counted(open_rows(), count), fmt)
        except OSError as exc:
            raise _unreadable(resolved.path, exc) from None
        summary.rows_found += count[0]
        if not count[0] and max_samples != 0:
            raise DpoLeanError(f"{label}: dataset '{spec}' has no rows; point at a file with preference pairs")
        if count[0] and layout is None:
            normalise_rows(list(open_rows()), name=spec, label=label, spec=fmt)  # raises: no row matches a layout
        start = summary.num_rows
        rows = open_rows()
        while chunk := list(islice(rows, chunk_rows)):
            records, skips, _ = normalise_rows(chunk, name=spec, label=label, spec=fmt, start_index=start, layout=layout)
            start += len(chunk)
            yield records, skips
        summary.num_rows += count[0]
        summary.sources.append({"name": spec, "path": path, "sha256": fingerprint, "rows": count[0],
                                "layout": layout if count[0] else None})


def _rows_of(resolved: _Resolved, max_samples: int | None):
    """(a function that opens the rows afresh, the path recorded, the content fingerprint) of one dataset."""
    if resolved.hub is not None:
        rows, fingerprint = _read_hub(resolved, max_samples)
        return (lambda: iter(rows)), resolved.hub["id"], fingerprint
    try:
        fingerprint = file_sha256(resolved.path)
    except OSError as exc:
        raise _unreadable(resolved.path, exc) from None
    return (lambda: islice(iter_file(resolved.path), max_samples)), str(resolved.path.resolve()), fingerprint


def _counted(rows, count: list[int]):
    for _, data in rows:
        count[0] += 1
        yield data


def source_identity(dataset: str, dataset_dir: str = "data") -> dict[str, dict] | None:
    """What each dataset spec reads, without reading its rows: the file's sha256 and the format options of its
    entry; None where a source has no stable identity (a hub dataset without a pinned revision)."""
    out = {}
    for n, spec in enumerate(s.strip() for s in str(dataset or "").split(",") if s.strip()):
        resolved = _resolve(spec, Path(dataset_dir))
        fmt = dataclasses.asdict(resolved.fmt)
        if resolved.hub is not None:
            if not resolved.hub["revision"]:
                return None
            out[f"{n}:{spec}"] = {"hub": resolved.hub, "format": fmt}
            continue
        try:
            out[f"{n}:{spec}"] = {"sha256": file_sha256(resolved.path), "suffix": resolved.path.suffix.lower(), "format": fmt}
        except OSError as exc:
            raise _unreadable(resolved.path, exc) from None
    return out


# --- finding a dataset --------------------------------------------------------------------------

def where(dataset: str, dataset_dir: str = "data") -> list[str]:
    """Where each dataset spec's rows come from, one line each, without reading them: 'spec: path' or 'spec: hub
    dataset id (split, revision)'."""
    out = []
    for spec in (s.strip() for s in str(dataset or "").split(",") if s.strip()):
        resolved = _resolve(spec, Path(dataset_dir))
        if resolved.hub is not None:
            hub = resolved.hub
            out.append(f"{spec}: hub dataset {hub['id']} (split {hub['split']}, revision {hub['revision'] or 'latest'})")
        else:
            out.append(f"{spec}: {resolved.path}")
    return out


def _resolve(spec: str, base: Path) -> _Resolved:
    """A file path (as given or under dataset_dir), then a registered name, then a hub id ``org/name``."""
    tried: list[str] = []
    candidates = [Path(spec)] if Path(spec).is_absolute() else [Path(spec), base / spec]
    for candidate in dict.fromkeys(candidates):
        if _is_file(candidate) and candidate.suffix.lower() in SUFFIXES:
            return _Resolved(spec, FormatSpec(), path=candidate)
        note = f" (exists, but is not {'/'.join(SUFFIXES)})" if _exists(candidate) else ""
        tried.append(f"{candidate}{note}")
    registry, registry_path = _load_registry(base), base / REGISTRY
    if spec in registry:
        return _from_entry(spec, registry[spec], base, registry_path)
    if looks_like_path(spec):  # a mistyped file, not a hub id: said at once, with the nearest name
        raise DpoLeanError(f"dataset '{spec}' not found: no file {' or '.join(map(str, dict.fromkeys(candidates)))}"
                           f"{did_you_mean(*candidates) or '; fix the path'} (a hub dataset id has the form org/name)")
    if _HUB_ID.match(spec) and Path(spec).suffix.lower() not in SUFFIXES:
        return _Resolved(spec, FormatSpec(), hub={"id": spec, "subset": None, "split": "train", "revision": None})
    if registry:
        close = difflib.get_close_matches(spec, list(registry), n=1)
        hint = f"not registered in {registry_path}" + (f" (did you mean '{close[0]}'?)" if close else "")
    else:
        hint = f"no {registry_path} to look it up in"
    raise DpoLeanError(f"dataset '{spec}' not found: tried {', '.join(tried)}; {hint}; use a "
                       f"{'/'.join(SUFFIXES)} file, a name registered in {REGISTRY} or a hub id org/name")


def _is_file(path: Path) -> bool:
    """Path.is_file(), but False (not OSError) for a name too long for the file system or unreadable."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _load_registry(base: Path) -> dict:
    """dataset_dir/dataset_info.json as a dict ({} if there is none)."""
    path = base / REGISTRY
    if not _is_file(path):
        return {}
    try:
        registry = JSON_DECODER.decode(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DpoLeanError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}); fix the file") from None
    except UnicodeDecodeError:
        raise DpoLeanError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except RecursionError:
        raise DpoLeanError(f"{path}: nested too deeply to read; fix the file") from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if not isinstance(registry, dict):
        raise DpoLeanError(f"{path}: expected an object mapping dataset names to entries; fix the file")
    return registry


def _from_entry(name: str, entry: Any, base: Path, registry_path: Path) -> _Resolved:
    """A registered entry: file_name (must stay inside dataset_dir) or hf_hub_url."""
    where = f"{registry_path}: entry '{name}'"
    if not isinstance(entry, dict):
        raise DpoLeanError(f"{where} is not an object; write it as {{\"file_name\": ..., \"formatting\": ...}}")
    fmt = FormatSpec.from_entry(name, entry, str(registry_path))
    if entry.get("file_name"):
        return _Resolved(name, fmt, path=_registered_file(str(entry["file_name"]), base, where))
    if entry.get("hf_hub_url"):
        hub = {"id": str(entry["hf_hub_url"]), "subset": entry.get("subset"),
               "split": entry.get("split") or "train", "revision": entry.get("revision")}
        return _Resolved(name, fmt, hub=hub)
    raise DpoLeanError(f"{where} has no file_name or hf_hub_url (other sources such as ms_hub_url or "
                       "script_url are not supported); add a file_name inside the dataset_dir")


def _registered_file(file_name: str, base: Path, where: str) -> Path:
    """dataset_dir/file_name, refusing anything that resolves (via .. , absolute path or symlink) outside it."""
    path = base / file_name
    try:
        inside = path.resolve().is_relative_to(base.resolve())
    except (OSError, ValueError):  # a NUL byte, a lone surrogate, a symlink loop
        raise DpoLeanError(f"{where}: file_name '{file_name}' is not a usable path; fix file_name") from None
    if not inside:
        raise DpoLeanError(f"{where}: file_name '{file_name}' resolves to {path.resolve()}, outside {base}; "
                           f"move or copy the file into {base}")
    if not _is_file(path):
        raise DpoLeanError(f"{where}: file_name '{file_name}' not found at {path} (dpo-lean reads single files); fix file_name")
    if path.suffix.lower() not in SUFFIXES:
        raise DpoLeanError(f"{where}: file_name '{file_name}' is not {'/'.join(SUFFIXES)}; convert it to one of those")
    return path


def _read_hub(resolved: _Resolved, max_samples: int | None) -> tuple[Rows, str]:
    """Rows of a hub dataset via datasets.load_dataset, and ``id@revision`` as its fingerprint."""
    import datasets

    hub = resolved.hub
    kwargs = {"split": hub["split"]} | ({"revision": hub["revision"]} if hub["revision"] else {})
    try:
        ds = datasets.load_dataset(hub["id"], hub["subset"], **kwargs)
        rows = [(f"{resolved.name} row {i}", row) for i, row in enumerate(islice(iter(ds), max_samples))]
    except Exception as exc:  # network, auth, missing repo or split: all become one line
        raise DpoLeanError(f"dataset '{resolved.name}': could not load '{hub['id']}' from the Hugging Face Hub "
                           f"({type(exc).__name__}: {first_line(exc)}); it is not a local file or registered name "
                           "either; check the id, split, network and HF_TOKEN, or download it and pass the file") from None
    revision = hub["revision"] or getattr(ds, "_fingerprint", None) or "unknown"
    return rows, f"{hub['id']}@{revision}"


def _unreadable(path: Path, exc: OSError) -> DpoLeanError:
    return DpoLeanError(f"{path}: cannot be read ({exc.strerror or exc}); check that the file is readable")
