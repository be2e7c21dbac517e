"""Prepared data: a dataset's token ids, written once as an Arrow file and memory-mapped by every later command.

    <prepared_dir>/                    (default <output_dir>/prepared; a sweep's runs and the eval set share it)
      <digest>.arrow    one row per kept pair (Arrow IPC stream, what datasets.Dataset.from_file maps):
                        row_index, id, prompt_ids, chosen_ids, rejected_ids (int32 lists), truncated,
                        prompt_len, chosen_len, rejected_len, length
      <digest>.json     the fingerprint, rows loaded, sources, content hash, template definition, every skip;
                        written last, so a crash leaves no half prepared data that looks whole
      .lock             held while one process checks or builds (torchrun ranks wait for the first)

The digest hashes everything the ids depend on (fingerprint.prepared_fingerprint): the dataset files' content and
how they are read, the tokenizer, the template's definition, cutoff_len, truncation_mode and the library versions.
Files are written as the reference cache's are (storage.py: per-writer temporary name, fsync, rename). Another
digest's files for the same ``dataset`` are stale: removed when the new ones are written, except those a live
process still reads (each reader holds a shared lock on the Arrow file it maps, storage.hold, for as long as it
uses the rows; a later build removes them once they are free).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa

from .. import storage
from ..fingerprint import fingerprint_diff
from .records import Skip
from .tokenize import TokenizedRow

ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
LEN_COLUMNS = ("prompt_len", "chosen_len", "rejected_len")
SCHEMA = pa.schema([("row_index", pa.int64()), ("id", pa.string()),
                    *[(c, pa.list_(pa.int32())) for c in ID_COLUMNS], ("truncated", pa.bool_()),
                    *[(c, pa.int32()) for c in LEN_COLUMNS], ("length", pa.int32())])


# ---------------------------------------------------------------- reading


class PreparedRows(Sequence):
    """The kept rows of a prepared table, in row_index order (or a subset by position), as TokenizedRow on access.

    Ids stay in the memory-mapped table; indexing, slicing and iteration materialise only the rows asked for
    (iteration goes batch by batch). Whole columns of scalars (lengths, row_index) come as numpy arrays.
    """

    def __init__(self, table: pa.Table, path: Path | None = None, positions: np.ndarray | None = None, held=None):
        self.table, self.path, self.positions = table, path, positions
        self.held = held  # the shared lock on ``path`` (storage.hold): no build removes the file while it is open
        self._batches = table.to_batches()  # zero-copy; a take on the whole table would first join its chunks
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])

    def __len__(self) -> int:
        return self.table.num_rows if self.positions is None else len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        if i < -len(self) or i >= len(self):
            raise IndexError(f"row position {i} out of range ({len(self)} rows)")
        return self.take([i % len(self)])[0]

    def __iter__(self) -> Iterator[TokenizedRow]:
        for start in range(0, len(self), 1024):
            yield from self.take(range(start, min(start + 1024, len(self))))

    def _table_positions(self, positions) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        return positions if self.positions is None else self.positions[positions]

    def take(self, positions) -> list[TokenizedRow]:
        """The rows at these positions, as Python objects, gathered batch by batch of the file (no copy of the rest)."""
        pos = self._table_positions(positions)
        out: list = [None] * len(pos)
        batch_of = np.searchsorted(self._starts, pos, side="right") - 1
        for b in np.unique(batch_of):
            where = np.nonzero(batch_of == b)[0]
            part = self._batches[b].take(pa.array(pos[where] - self._starts[b], type=pa.int64()))
            c = [part.column(name).to_pylist() for name in ("row_index", "id", *ID_COLUMNS, "truncated")]
            for i, values in zip(where, zip(*c)):
                out[i] = TokenizedRow(*values)
        return out

    def column(self, name: str) -> np.ndarray:
        """A scalar column (row_index, truncated, *_len, length) of these rows."""
        values = self.table.column(name).to_numpy()
        return values if self.positions is None else values[self.positions]

    @property
    def ids(self) -> list[str]:
        values = self.table.column("id")
        return values.to_pylist() if self.positions is None else values.take(pa.array(self.positions)).to_pylist()

    def subset(self, positions) -> PreparedRows:
        """These rows at ``positions`` (of this view), sharing the table."""
        return PreparedRows(self.table, self.path, self._table_positions(positions), self.held)


class Damaged(Exception):
    """Prepared files that exist but cannot be used as they are."""


def read(directory: Path, key: str) -> tuple[dict, PreparedRows] | None:
    """(metadata, rows) of prepared data ``key``; None if there is none; Damaged if it cannot be read."""
    meta_path, arrow_path = directory / f"{key}.json", directory / f"{key}.arrow"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        held = storage.hold(arrow_path)  # before mapping it: a build that runs meanwhile leaves it alone
        reader = pa.ipc.open_stream(pa.memory_map(str(arrow_path)))
        table = reader.read_all()
        table.validate()
    except (OSError, ValueError, pa.ArrowException) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Damaged(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if not table.schema.equals(SCHEMA):
        raise Damaged("its columns are not the ones this dpo-lean writes")
    if not isinstance(meta, dict) or meta.get("digest") != key or meta.get("rows_kept") != table.num_rows:
        raise Damaged(f"{meta_path.name} does not describe {arrow_path.name}")
    return meta, PreparedRows(table, arrow_path, held=held)


def skips_of(meta: dict) -> list[Skip]:
    return [Skip(*s) for s in meta["skips"]]


def _metas(directory: Path, key: str, dataset: str) -> list[tuple[Path, dict]]:
    """(metadata file, its fingerprint) of the other prepared data of ``dataset`` in ``directory``, oldest first."""
    out = []
    for path in sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        if path.stem != key and (not isinstance(meta, dict) or meta.get("dataset") in (dataset, None)):
            out.append((path, meta.get("fingerprint") if isinstance(meta, dict) else None))
    return out


def stale_reason(directory: Path, key: str, dataset: str, fp: dict) -> str:
    """'cutoff_len: 1024 -> 2048'-style differences from the newest other prepared data of ``dataset``, or ''."""


    others = [old for _, old in _metas(directory, key, dataset) if isinstance(old, dict)]
    return "; ".join(fingerprint_diff(others[-1], fp)[:3]) if others else ""


# ---------------------------------------------------------------- writing


def locked(directory: Path):
    """Held while one process checks or builds prepared data in ``directory`` (torchrun ranks wait for the first)."""
    return storage.locked(directory, "prepared data folder", "set prepared_dir (or output_dir) to a writable folder")


def to_batch(rows: list[TokenizedRow]) -> pa.RecordBatch:
    """Kept rows as one record batch of SCHEMA (ids packed straight into int32 buffers)."""
    columns = [pa.array([r.row_index for r in rows], pa.int64()), pa.array([r.id for r in rows], pa.string())]
    lengths = {}
    for name, n in zip(ID_COLUMNS, LEN_COLUMNS):
        lists = [getattr(r, name) for r in rows]
        lengths[n] = np.fromiter(map(len, lists), dtype=np.int32, count=len(lists))
        offsets = np.zeros(len(lists) + 1, dtype=np.int32)
        np.cumsum(lengths[n], out=offsets[1:])
        values = np.fromiter(chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
        columns.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)))
    columns.append(pa.array([r.truncated for r in rows], pa.bool_()))
    columns += [pa.array(lengths[n]) for n in LEN_COLUMNS]
    columns.append(pa.array(lengths["prompt_len"] + np.maximum(lengths["chosen_len"], lengths["rejected_len"])))
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


def write(directory: Path, key: str, batches: Iterable[tuple[pa.RecordBatch, list[Skip]]],
          metadata: Callable[[], dict]) -> dict:
    """Write the batches (in row_index order), then ``metadata()`` (known once they are through), crash-safe; remove
    stale prepared data of the same dataset that no live process holds."""
    skips, kept = [], 0

    def stream(tmp: Path) -> None:
        nonlocal kept
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
            for batch, batch_skips in batches:
                if batch.num_rows:
                    writer.write_batch(batch)
                kept += batch.num_rows
                skips.extend(batch_skips)

    storage.write_whole(directory / f"{key}.arrow", stream, "prepared data",
                        "check free space and that the folder is writable")
    meta = metadata()
    stale = _metas(directory, key, meta["dataset"])
    meta = {**meta, "digest": key, "rows_kept": kept,
            "skips": [[s.row_index, s.source, s.reason, s.detail] for s in sorted(skips, key=lambda s: s.row_index)]}
    storage.atomic_write_text(directory / f"{key}.json", json.dumps(meta) + "\n")  # \u escapes keep lone surrogates
    for old, _ in stale:
        storage.remove_unless_held(old.with_suffix(".arrow"), old)
    return meta
