"""Read a local dataset file's rows with their locations, naming every bad line.

JSON, JSON lines and CSV with the stdlib, Parquet with pyarrow, never with ``datasets.load_dataset``, so that each
bad row is counted and named instead of failing the file. Rows are located as ``<path> line N`` (JSON, JSON lines,
CSV; 1-based) or ``<path> row N`` (Parquet; 0-based).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DpoLeanError
from .records import UnusableRow

_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_INT_DIGITS = 4000  # Python refuses int() of over 4300 digits; a longer JSON integer is read as a float


def _parse_int(text: str) -> int | float:
    """A JSON integer; one too long for int() becomes a float (it is a number either way, never a crash)."""
    return int(text) if len(text) <= _INT_DIGITS else float(text)


JSON_DECODER = json.JSONDecoder(parse_int=_parse_int)


def iter_file(path: Path) -> Iterator[tuple[str, Any]]:
    """The rows of a local file with their locations."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path)
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".jsonl":
        return _jsonl_rows(path, _file_lines(path))
    data = path.read_bytes()
    text = _decode(data, path) if suffix == ".json" and data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[") else None
    if text is not None and not _first_line_is_a_row(text):
        return _json_array_rows(path, text)
    return _jsonl_rows(path, data.split(b"\n"))


def _file_lines(path: Path) -> Iterator[bytes]:
    """The lines of a file without their line breaks, read as they are needed."""
    with path.open("rb") as handle:
        for line in handle:
            yield line[:-1] if line.endswith(b"\n") else line


def _first_line_is_a_row(text: str) -> bool:
    """Whether a .json file that starts with '[' is JSON lines whose first row is a list: its first line is a
    complete JSON value and more follows (a JSON array either spans lines or is the whole file)."""
    first, _, rest = text.lstrip(" \t\r\n").partition("\n")
    if not rest.strip(" \t\r\n"):
        return False
    try:
        JSON_DECODER.decode(first)
    except (ValueError, RecursionError):
        return False
    return True


def _decode(data: bytes, path: Path) -> str:
    """UTF-8 (BOM allowed) text, or a DpoLeanError naming the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DpoLeanError(f"{path} line {line}: not valid UTF-8; re-save the file as UTF-8") from None


def _jsonl_rows(path: Path, lines) -> Iterator[tuple[str, Any]]:
    """One JSON value per non-blank line (``lines``: the file's lines, without line breaks)."""
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DpoLeanError(f"{path} line {number}: not valid UTF-8; re-save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            value = JSON_DECODER.decode(line)
        except json.JSONDecodeError as exc:
            hint = ("; a .json file must hold one JSON array of objects or one object per line"
                    if path.suffix.lower() == ".json" else "; fix or remove that line")
            raise DpoLeanError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno}){hint}") from None
        except RecursionError:
            raise DpoLeanError(f"{path} line {number}: nested too deeply to read; fix or remove that line") from None
        yield f"{path} line {number}", value


def _json_array_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """The elements of a top-level JSON array, each located by the line it starts on."""
    decoder = JSON_DECODER
    pos = _JSON_SPACE.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    if text.startswith("]", pos):
        _json_end(text, pos + 1, path)
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DpoLeanError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); fix the file") from None
        except RecursionError:
            where = line + text.count("\n", counted, pos)
            raise DpoLeanError(f"{path} line {where}: nested too deeply to read; fix the file") from None
        line += text.count("\n", counted, pos)
        counted = pos
        yield f"{path} line {line}", value
        pos = _JSON_SPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos = _JSON_SPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            _json_end(text, pos + 1, path)
            return
        else:
            raise DpoLeanError(f"{path} line {text.count(chr(10), 0, pos) + 1}: not valid JSON "
                               "(expected ',' or ']' after an array element); fix the file")


def _json_end(text: str, pos: int, path: Path) -> None:
    """Check nothing but whitespace follows the closing ']'."""
    pos = _JSON_SPACE.match(text, pos).end()
    if pos != len(text):
        raise DpoLeanError(f"{path} line {text.count(chr(10), 0, pos) + 1}: not valid JSON "
                           "(extra data after the closing ']'); fix the file")


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Parquet rows as dicts, batch by batch."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DpoLeanError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {first_line(exc)}); "
                           "check the file") from None
    index = 0
    for batch in table.to_batches():
        for row in batch.to_pylist():
            yield f"{path} row {index}", row
            index += 1


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """CSV rows as {header: string} dicts, each located by the line it starts on.

    A repeated header name is an error (one of the columns would be dropped); a row with non-empty cells
    beyond the header is an ``extra_cells`` skip (its cells cannot be matched to columns).
    """
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        start = 2
        try:
            repeated = [name for name, n in Counter(reader.fieldnames or []).items() if n > 1]
            if repeated:
                raise DpoLeanError(f"{path} line 1: column '{repeated[0]}' appears more than once in the header; "
                                   "rename or remove the repeats")
            for row in reader:
                extra = row.pop(None, None) or []  # cells beyond the header
                if any(cell.strip() for cell in extra):
                    row = UnusableRow("extra_cells", f"{len(reader.fieldnames) + len(extra)} cells under a header of "
                                                     f"{len(reader.fieldnames)} columns; quote cells that hold commas", row)
                yield f"{path} line {start}", row
                start = reader.line_num + 1
        except csv.Error as exc:
            raise DpoLeanError(f"{path} line {reader.line_num}: not valid CSV ({exc}); fix the file") from None
        except UnicodeDecodeError:
            raise DpoLeanError(f"{path} near line {reader.line_num + 1}: not valid UTF-8; re-save the file as UTF-8") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
