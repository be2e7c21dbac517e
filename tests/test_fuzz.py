"""Bad input, fuzzed: every input is a counted skip or a one-line DpoLeanError, never a traceback or a lost row.

Property-based tests (hypothesis) feed random JSON structures, wrong types and unicode edge cases (empty
strings, lone surrogates, NUL bytes, RTL text, combining marks, emoji, 200k-character lines) to the loader
as .json/.jsonl/.csv files and as in-memory rows, through tokenisation with the tiny fixture tokenizer, and
random keys and values to the config (dict, YAML text, overrides) and to ``dpo-lean data-check``.
The ``test_regression_*`` tests pin each bug the fuzzing (or probing around it) found, named for the bug.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
import unicodedata
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from dpo_lean.cli import main
from dpo_lean.config import FIELDS, Config, allowed_types, from_dict, load_config, parse_override
from dpo_lean.data.formats import FormatSpec, normalise_rows
from dpo_lean.data.pipeline import prepare_data, write_skip_report
from dpo_lean.data.records import SKIP_REASONS, Record, Skip
from dpo_lean.data.sources import load_records
from dpo_lean.data.template_table import LF_TEMPLATES
from dpo_lean.data.templates import template_for
from dpo_lean.data.tokenize import tokenize_record
from dpo_lean.errors import DpoLeanError

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "tests" / "fixtures" / "tiny-model"


def assert_one_line(error: DpoLeanError, *names: str) -> str:
    """The message is one printable line and names each of ``names`` (a file, key or row)."""
    message = str(error)
    assert message and len(message.splitlines()) == 1, message
    message.encode("utf-8")  # printable: no lone surrogates
    assert "Traceback" not in message
    for name in names:
        assert name in message, (name, message)
    return message


def config_error(tmp_path: Path, text: str | bytes, *overrides: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    with pytest.raises(DpoLeanError) as err:
        load_config(path, overrides)
    return assert_one_line(err.value)


# --- regressions: config ------------------------------------------------------------------------

def test_regression_yaml_integer_over_4300_digits_is_one_line_error(tmp_path):
    message = config_error(tmp_path, "cutoff_len: " + "9" * 5000 + "\n")
    assert "config.yaml" in message and "4300 digits" in message


def test_regression_yaml_nested_too_deeply_is_one_line_error(tmp_path):
    message = config_error(tmp_path, "dataset: " + "[" * 3000 + "]" * 3000 + "\n")
    assert "config.yaml" in message and "nested too deeply" in message


@pytest.mark.parametrize("key", ["1", "~", "true", "2024-01-01", "1.5"])
def test_regression_yaml_non_string_key_is_an_unknown_key(tmp_path, key):
    assert "unknown config key" in config_error(tmp_path, f"{key}: 2\n")


def test_regression_config_file_not_utf8_is_one_line_error(tmp_path):
    assert "not UTF-8" in config_error(tmp_path, b"dataset: \xff\xfe\n")


def test_regression_integer_too_large_for_a_float_key(tmp_path):
    message = config_error(tmp_path, "learning_rate: " + "9" * 400 + "\n")
    assert "'learning_rate'" in message and "too large" in message and len(message) < 300


@pytest.mark.parametrize("text", ["learning_rate: .inf\n", "learning_rate: '1e999'\n", "pref_beta: '" + "9" * 5000 + "'\n",
                                  "max_grad_norm: .inf\n"])
def test_regression_infinite_number_is_refused(tmp_path, text):
    assert "finite" in config_error(tmp_path, text)


def test_regression_nul_byte_in_a_config_string_is_refused(tmp_path):
    assert "'output_dir'" in config_error(tmp_path, 'output_dir: "out\\0put"\n')
    assert "NUL byte" in config_error(tmp_path, "", "dataset_dir=da\x00ta")


def test_regression_long_or_aliased_values_are_shown_short(tmp_path):
    assert len(config_error(tmp_path, "template: " + "x" * 200_000 + "\n")) < 300
    # nine levels of nine YAML aliases: 9**9 strings if expanded; the message must stay short (and fast)
    levels = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    message = config_error(tmp_path, "run_name: [" + ", ".join(levels) + "]\n")
    assert "'run_name'" in message and len(message) < 300


def test_regression_yaml_reader_error_is_one_line(tmp_path):
    # PyYAML's ReaderError (a control character) has no .problem and a two-line str()
    message = config_error(tmp_path, "dataset: a\x01b\n")
    assert "unacceptable character #x0001" in message and "\\n" not in message
    config_error(tmp_path, "dataset: [a,\n  b\nlora_rank: {\n")


def test_regression_override_with_huge_integer_or_deep_nesting_is_text():
    assert parse_override("seed=" + "9" * 5000) == ("seed", "9" * 5000)
    assert parse_override("run_name=" + "[" * 3000) == ("run_name", "[" * 3000)
    with pytest.raises(DpoLeanError, match="'seed'"):
        load_config(None, ["seed=" + "9" * 5000])


def test_regression_error_with_lone_surrogate_is_printable():
    message = str(DpoLeanError("dataset '\ud800x.json' not found"))
    assert message == "dataset '\\ud800x.json' not found"
    message.encode("utf-8")


# --- strategies: text, JSON values, rows -------------------------------------------------------

# No deadline and no too-slow check: a 200k-character line takes a while to tokenise, more so on a busy CI machine.
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

LONG_LINE = "long " * 40_000  # a 200,000-character line
EDGE_TEXTS = [
    "plain", "", " ", "\t\n ", "\ud800", "lone \udfff low", "\udbff\udc00",  # empty, blank, lone surrogates (a pair split in two)
    "\x00", "nul \x00 byte", "שלום, עולם", "مرحبا بالعالم", "\u202eevil\u202c", "\u200f\u200e",  # NUL, RTL, bidi marks
    "e\u0301\u0302\u0303", "\u0301", "\u00e9", "e\u0301", "😀", "👩🏽\u200d💻", "\U0010ffff", "\ufeff", "\u2028\u2029", "\r",
    "{{ eos_token }}{% if true %}x{% endif %}", "<|im_end|>", "<|im_start|>assistant\n", "null", "[]", "{}", "\\",
]


class Raw(str):
    """JSON text written as it is: numbers Python's int() refuses, 1e400, NaN, deep nesting."""


RAW_VALUES = [Raw("9" * 5000), Raw("-" + "1" * 4400), Raw("1e400"), Raw("-0.0"), Raw("NaN"), Raw("-Infinity")]
DEEP = Raw("[" * 3000 + "]" * 3000)  # deeper than Python's JSON decoder can go

texts = st.one_of(
    st.sampled_from(EDGE_TEXTS),
    st.text(max_size=12),
    st.lists(st.sampled_from(EDGE_TEXTS) | st.text(max_size=4), min_size=1, max_size=4).map("".join),
)
words = st.sampled_from(["Say hi.", "Name a prime.", "Translate 'cat'.", "Summarise: the cat sat.", "Hi!", "Yes"])
good_text = st.one_of(words, st.tuples(words, texts, words).map("".join), texts)  # usable text, often with an edge case
answer = st.one_of(st.sampled_from(["7", "chat", "A cat rested.", "Hello."]), st.tuples(texts, st.just("!")).map("".join),
                   texts)
other = st.one_of(st.sampled_from(["8", "chien", "Dogs bark.", "Go away."]), st.tuples(st.just("?"), texts).map("".join),
                  texts)
KEYS = ["prompt", "chosen", "rejected", "instruction", "input", "output", "history", "system", "conversations",
        "messages", "from", "value", "role", "content", "tools"]
keys = st.sampled_from(KEYS) | texts
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts, texts, st.sampled_from(RAW_VALUES))
json_values = st.recursive(scalars,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                           max_leaves=10)


def turns(role_key: str, content_key: str, roles: list[str], n: int = 1):
    return st.lists(st.fixed_dictionaries({role_key: st.sampled_from(roles), content_key: good_text}),
                    min_size=n, max_size=n)


def msg(role_key: str, content_key: str, role: str, text=good_text):
    return st.fixed_dictionaries({role_key: st.just(role), content_key: text})


def conversation(role_key="role", content_key="content", user="user", assistant="assistant"):
    """user, (assistant, user)* -- alternating, ending with a user turn (sometimes not, with wrong roles)."""
    proper = st.integers(0, 2).flatmap(lambda n: st.tuples(*(
        [msg(role_key, content_key, user)] + [msg(role_key, content_key, r) for _ in range(n) for r in (assistant, user)]
    )).map(list))
    return st.one_of(proper, proper, proper,
                     st.integers(0, 4).flatmap(lambda n: turns(role_key, content_key, [user, assistant, "system", "tool"], n)))


LAYOUT_ROWS = {
    "alpaca": st.fixed_dictionaries(
        {"instruction": good_text, "chosen": answer, "rejected": other},
        optional={"input": good_text, "system": good_text,
                  "history": st.lists(st.tuples(good_text, good_text).map(list), max_size=2)}),
    "sharegpt": st.fixed_dictionaries(
        {"conversations": conversation("from", "value", "human", "gpt"),
         "chosen": msg("from", "value", "gpt", answer), "rejected": msg("from", "value", "gpt", other) | other},
        optional={"system": good_text}),
    "trl": st.fixed_dictionaries({"prompt": good_text, "chosen": answer, "rejected": other}),
    "trl_conversational": st.fixed_dictionaries(
        {"prompt": conversation(), "chosen": st.lists(msg("role", "content", "assistant", answer), min_size=1, max_size=1),
         "rejected": st.lists(msg("role", "content", "assistant", other), min_size=1, max_size=1)}),
    "trl_implicit": st.tuples(conversation(), msg("role", "content", "assistant", answer),
                              msg("role", "content", "assistant", other))
    .map(lambda t: {"chosen": t[0] + [t[1]], "rejected": t[0] + [t[2]]}),
}


@st.composite
def mutated(draw, row_strategy):
    """A layout's row with up to two fields deleted, nulled or replaced by any JSON value, or extra keys."""
    row = draw(row_strategy)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        action = draw(st.sampled_from(["delete", "null", "replace", "add"]))
        key = draw(st.sampled_from(sorted(row))) if row and action != "add" else draw(keys)
        if action == "delete":
            row.pop(key, None)
        else:
            row[key] = None if action == "null" else draw(json_values)
    return row


@st.composite
def dataset_rows(draw, max_size=8):
    """Rows for one file: mostly one layout (mutated), some of another layout and some arbitrary JSON."""
    main_layout = draw(st.sampled_from(sorted(LAYOUT_ROWS)))
    row = (mutated(LAYOUT_ROWS[main_layout]) | mutated(st.sampled_from(sorted(LAYOUT_ROWS)).flatmap(LAYOUT_ROWS.get))
           | json_values | st.dictionaries(keys, json_values, max_size=4))
    rows = draw(st.lists(st.one_of(*[mutated(LAYOUT_ROWS[main_layout])] * 3, row), min_size=draw(st.sampled_from([1, 1, 1, 0])),
                         max_size=max_size))
    long_field = draw(st.sampled_from([None] * 15 + ["prompt", "chosen", "instruction"]))
    if long_field and rows and isinstance(rows[0], dict):
        rows[0][long_field] = LONG_LINE
    if rows and draw(st.sampled_from([False] * 15 + [True])):
        rows[-1] = {"prompt": "Say hi.", "chosen": DEEP, "rejected": "No."} if draw(st.booleans()) else DEEP
    return rows


def dump(value, ascii_only: bool) -> str:
    """JSON text of a value with Raw passed through; lone surrogates always escaped (valid UTF-8 out)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{dump(str(k), ascii_only)}: {dump(v, ascii_only)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dump(v, ascii_only) for v in value) + "]"
    text = json.dumps(value, ensure_ascii=ascii_only)
    return re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)


FILE_FORMATS = ["json_array", "json_array_pretty", "jsonl", "json_lines", "csv"]


def csv_cell(value) -> str:
    """A CSV cell: text as it is (a lone surrogate, which UTF-8 cannot hold, as its escape), anything else as JSON."""
    text = value if isinstance(value, str) and not isinstance(value, Raw) else dump(value, ascii_only=False)
    return re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)


def write_rows(directory: Path, rows: list, fmt: str, ascii_only: bool, noise: bool) -> Path:
    """Write rows as a .json array, JSON lines (.jsonl or .json) or CSV; ``noise``: BOM, CRLF, blank lines.

    CSV: the header is every key of the object rows (or one column); a non-object row becomes its cells."""
    suffix = {"jsonl": ".jsonl", "csv": ".csv"}.get(fmt, ".json")
    path = directory / f"rows_{fmt}{suffix}"
    if fmt == "csv":
        header = list(dict.fromkeys(csv_cell(k) for r in rows if isinstance(r, dict) for k in r)) or ["prompt"]
        lines = []
        for r in rows:
            if isinstance(r, dict):
                cells = {csv_cell(k): csv_cell(v) for k, v in r.items()}
                lines.append([cells.get(k, "") for k in header])
            else:
                lines.append([csv_cell(v) for v in r] if isinstance(r, list) and r else [csv_cell(r)])
        handle = io.StringIO(newline="")
        writer = csv.writer(handle, lineterminator="\r\n")  # a cell holding a bare \r or \n is then quoted
        writer.writerow(header)
        writer.writerows(lines)
        text = handle.getvalue()
    elif fmt.startswith("json_array"):
        sep = ",\n  " if fmt.endswith("pretty") else ","
        text = "[" + sep.join(dump(r, ascii_only) for r in rows) + "]"
    else:
        newline = "\r\n\n" if noise else "\n"
        text = newline.join(dump(r, ascii_only) for r in rows) + newline
    path.write_bytes((b"\xef\xbb\xbf" if noise else b"") + text.encode("utf-8"))
    return path


# --- properties -----------------------------------------------------------------------------------

def assert_partition(records, skips, num_rows: int) -> None:
    """Every row read is exactly one record or one counted skip with a known reason and a one-line detail."""
    indices = sorted([r.row_index for r in records] + [s.row_index for s in skips])
    assert indices == list(range(num_rows)), indices
    for skip in skips:
        assert skip.reason in SKIP_REASONS, skip
        assert len(skip.detail.splitlines()) <= 1 and len(skip.source.splitlines()) == 1, skip
        skip.detail.encode("utf-8")


def check_loaded(path: Path, num_rows: int, **kwargs):
    """load_records(path): the rows partitioned, or a one-line whole-file verdict naming the file."""
    try:
        loaded = load_records(str(path), **kwargs)
    except DpoLeanError as err:
        message = assert_one_line(err, str(path))
        verdict = re.search("no row matches|has no rows|nested too deeply|appears more than once in the header", message)
        assert verdict, message
        event(f"load: error {verdict.group()}")
        return None
    event(f"load: {min(len(loaded.records), 2)}+ records")
    assert loaded.num_rows == num_rows
    assert_partition(loaded.records, loaded.skips, num_rows)
    for record in loaded.records:
        for messages in (record.prompt, record.chosen, record.rejected):
            assert messages and all(isinstance(m["content"], str) for m in messages)
            for m in messages:
                m["content"].encode("utf-8")  # no lone surrogate reaches a record
    return loaded


def check_prepared(path: Path, num_rows: int, tokenizer, directory: Path, **overrides) -> None:
    """prepare_data (template auto, the tiny tokenizer): rows + skips = rows read, or a one-line error."""
    config = from_dict({"model_name_or_path": str(TINY_MODEL), "dataset": str(path), "template": "auto",
                        "output_dir": str(directory / "out"), **overrides})
    try:
        data = prepare_data(config, tokenizer)
    except DpoLeanError as err:
        message = assert_one_line(err, str(path))
        assert re.search("no row matches|has no rows|nested too deeply|rows were skipped|appears more than once", message)
        event("prepare: all rows skipped")
        return
    event(f"prepare: {min(len(data.rows), 2)}+ rows tokenised")
    for skip in data.skips:
        event(f"prepare: skip {skip.reason}")
    if any(len(m["content"]) >= len(LONG_LINE) for r in load_records(str(path)).records for m in r.prompt + r.chosen):
        event("prepare: a 200k-character line tokenised")
    assert data.num_rows == num_rows
    assert_partition(data.rows, data.skips, num_rows)
    for row in data.rows:
        assert row.chosen_ids and row.rejected_ids and row.chosen_ids != row.rejected_ids
        assert len(row.prompt_ids) + max(len(row.chosen_ids), len(row.rejected_ids)) <= config.cutoff_len
    report = json.loads(write_skip_report(data, directory / "metrics").read_text(encoding="utf-8"))
    assert report["rows_kept"] + len(report["skipped"]) == report["rows_loaded"] == num_rows


@settings(max_examples=150, **FUZZ)
@given(rows=dataset_rows(), fmt=st.sampled_from(FILE_FORMATS), ascii_only=st.booleans(), noise=st.booleans(),
       cutoff_len=st.sampled_from([512, 2, 24, 2048]), mode=st.sampled_from(["keep_end", "keep_start"]))
def test_fuzzed_files_load_and_tokenise_to_counted_rows_or_one_line_error(rows, fmt, ascii_only, noise, cutoff_len, mode,
                                                                         tiny_tokenizer):
    with tempfile.TemporaryDirectory() as tmp:
        path = write_rows(Path(tmp), rows, fmt, ascii_only, noise)
        if check_loaded(path, len(rows), dataset_dir=tmp) is not None:
            check_prepared(path, len(rows), tiny_tokenizer, Path(tmp), cutoff_len=cutoff_len, truncation_mode=mode)


CORRUPTIONS = ["bad_utf8", "garbage_line", "cut_end", "unclosed"]


@settings(max_examples=60, **FUZZ)
@given(rows=st.lists(LAYOUT_ROWS["trl"], min_size=1, max_size=4), fmt=st.sampled_from(FILE_FORMATS),
       corruption=st.sampled_from(CORRUPTIONS), where=st.floats(0, 1))
def test_corrupt_files_are_one_line_errors_naming_file_and_line(rows, fmt, corruption, where):
    assume(fmt != "csv" or corruption == "bad_utf8")  # a CSV has no syntax to break but its encoding
    with tempfile.TemporaryDirectory() as tmp:
        path = write_rows(Path(tmp), rows, fmt, ascii_only=False, noise=False)
        data = path.read_bytes()
        if corruption == "bad_utf8":
            cut = int(where * len(data))
            data = data[:cut] + b"\xff" + data[cut:]
        elif corruption == "garbage_line":
            lines = data.split(b"\n")
            lines.insert(int(where * len(lines)), b"@@ not json")
            data = b"\n".join(lines)
        elif corruption == "cut_end":
            data = data.rstrip()[:-1]  # the closing ']' or the last row's '}'
        else:
            data = data.rstrip() + (b"," if fmt.startswith("json_array") else b"\n{")
        path.write_bytes(data)
        with pytest.raises(DpoLeanError) as err:
            load_records(str(path))
        message = assert_one_line(err.value, str(path))
        assert re.search(r"line \d+: not valid (JSON|UTF-8)", message), message


FORMAT_ENTRIES = st.fixed_dictionaries({}, optional={
    "formatting": st.sampled_from(["alpaca", "sharegpt", "openai"]) | json_values,
    "columns": st.dictionaries(st.sampled_from(["prompt", "query", "chosen", "rejected", "system", "history", "messages",
                                                "tools", "images"]), st.sampled_from(KEYS) | texts, max_size=3) | json_values,
    "tags": st.dictionaries(st.sampled_from(["role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag",
                                             "observation_tag", "function_tag", "bogus"]),
                            st.sampled_from(["from", "value", "role", "content", "human", "gpt", "user"]) | texts,
                            max_size=3) | json_values,
    "ranking": json_values, "file_name": json_values, "hf_hub_url": st.just(None),
})


@settings(max_examples=250, **FUZZ)
@given(rows=st.lists(st.one_of(*LAYOUT_ROWS.values(), json_values, st.binary(max_size=4), st.sets(st.integers(), max_size=2),
                               st.dates(), st.dictionaries(keys, json_values | st.binary(max_size=3), max_size=3)),
                     max_size=6),
       entry=FORMAT_ENTRIES, text_cells=st.booleans())
def test_in_memory_rows_normalise_to_records_or_counted_skips(rows, entry, text_cells):
    """Rows as Python values (as a hub dataset or Parquet gives them), with any dataset_info.json entry."""
    try:
        spec = FormatSpec.from_entry("fz", entry, "dataset_info.json")
    except DpoLeanError as err:
        assert_one_line(err, "dataset_info.json", "'fz'")
        return
    spec = FormatSpec(spec.formatting, spec.columns, spec.tags, text_cells=text_cells)
    try:
        records, skips, layout = normalise_rows([(f"mem row {i}", r) for i, r in enumerate(rows)],
                                                name="mem", label="in-memory rows", spec=spec, start_index=0)
    except DpoLeanError as err:
        assert "no row matches" in assert_one_line(err, "in-memory rows")
        return
    assert_partition(records, skips, len(rows))
    assert all(s.source == f"mem row {s.row_index}" for s in skips)


@settings(max_examples=80, **FUZZ)
@given(rows=st.lists(st.one_of(*LAYOUT_ROWS.values()), min_size=1, max_size=3), entry=FORMAT_ENTRIES,
       registry_shape=st.sampled_from(["entry", "entry", "not_a_dict", "entry_not_a_dict"]) )
def test_fuzzed_dataset_info_entries_load_or_one_line_error(rows, entry, registry_shape):
    with tempfile.TemporaryDirectory() as tmp:
        path = write_rows(Path(tmp), rows, "jsonl", ascii_only=True, noise=False)
        entry = {"file_name": path.name, **entry} if "file_name" not in entry else entry
        registry = {"fz": entry} if registry_shape == "entry" else [entry] if registry_shape == "not_a_dict" else {"fz": [entry]}
        (Path(tmp) / "dataset_info.json").write_text(dump(registry, ascii_only=True), encoding="utf-8")
        try:
            loaded = load_records("fz", dataset_dir=tmp)
        except DpoLeanError as err:
            assert_one_line(err)
            return
        assert_partition(loaded.records, loaded.skips, loaded.num_rows)
        assert loaded.num_rows == len(rows)


# --- properties: config and the CLI -----------------------------------------------------------------

yaml_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | texts
                | st.sampled_from(["5e-6", "1e999", "nan", "-inf", "true", "False", "0x10", "1_000", "٣", " 7 ", "chatml",
                                   "keep_start", "sigmoid", "all"]))
config_scalars = (yaml_scalars | st.sampled_from([400, 5000, 19]).map(lambda n: -(10**n) if n == 5000 else 10**n)
                  | st.dates() | st.binary(max_size=3))
config_values = st.recursive(config_scalars, lambda inner: st.lists(inner, max_size=3)
                             | st.dictionaries(st.text(max_size=3), inner, max_size=2), max_leaves=6)
config_keys = st.sampled_from(sorted(FIELDS)) | st.sampled_from(["lerning_rate", "pref_betta", "", "dataset "]) | texts
config_dicts = st.dictionaries(config_keys | st.integers() | st.none() | st.booleans(), config_values, max_size=6)


def assert_valid_config(config: Config, raw: dict) -> None:
    """Every given key holds a value of its declared type; numbers are finite (no NaN, no +-inf)."""
    for name in raw:
        value = getattr(config, name)
        assert isinstance(value, allowed_types(name)), (name, value)
        if isinstance(value, float):
            assert math.isfinite(value), (name, value)


@settings(max_examples=300, **FUZZ)
@given(raw=config_dicts)
def test_fuzzed_config_dicts_validate_or_one_line_error(raw):
    try:
        config = from_dict(raw)
    except DpoLeanError as err:
        assert re.match(r"(unknown )?config key", assert_one_line(err))
        return
    assert_valid_config(config, raw)


YAML_SNIPPETS = [
    "!!python/object/apply:os.system ['echo pwned']", "x: !!python/name:os.system", "dataset: !!binary aGk=",
    "a: &a [*a]", "---\nseed: 1\n---\nseed: 2", "%YAML 1.1\n---\nseed: 1", "- seed\n- 1", "seed", "seed: 1\n\tlr: 2",
    "{seed: 1, seed: 2}", "? [a, b]\n: 1", "seed: [" * 400, "learning_rate: 0x1p-3", "cutoff_len: 1_024", "bf16: yes",
    "dataset: ~", "template: 'chatml'\ntemplate: plain", "lora_target: [q_proj, 5]", "dataset: [a, [b]]",
]


@settings(max_examples=200, **FUZZ)
@given(doc=st.one_of(
    st.dictionaries(config_keys, st.recursive(yaml_scalars | st.dates(), lambda inner: st.lists(inner, max_size=3)
                                              | st.dictionaries(st.text(max_size=3), inner, max_size=2), max_leaves=6),
                    max_size=6).map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.sampled_from(YAML_SNIPPETS), st.text(max_size=40), st.binary(max_size=40)),
    overrides=st.lists(st.one_of(st.text(max_size=20), st.tuples(config_keys, st.text(max_size=12)).map("=".join)),
                       max_size=3))
def test_fuzzed_yaml_and_overrides_load_or_one_line_error(doc, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_bytes(doc if isinstance(doc, bytes) else doc.encode("utf-8", "surrogatepass"))
        try:
            config = load_config(path, overrides)
        except DpoLeanError as err:
            assert_one_line(err)
            return
        assert isinstance(config, Config)
        assert_valid_config(config, {k: None for k in FIELDS})


CLI_OVERRIDE_KEYS = ["cutoff_len", "truncation_mode", "template", "max_samples", "strict", "dataset_dir", "val_size",
                     "seed", "lora_rank", "pref_loss", "bf16", "learning_rate", "lerning_rate", "datset", "stage"]


def report_counts(stdout: str) -> dict[str, int]:
    counts = {key: int(m.group(1)) for key in ("rows loaded", "rows kept", "rows skipped")
              if (m := re.search(rf"^{key}: (\d+)$", stdout, re.M))}
    counts["by reason"] = {m.group(1): int(m.group(2)) for m in re.finditer(r"^  (\w+): (\d+), first ", stdout, re.M)}
    return counts


@settings(max_examples=50, **FUZZ)
@given(rows=dataset_rows(max_size=5), fmt=st.sampled_from(FILE_FORMATS),
       extra=st.just({}) | st.dictionaries(
           config_keys.filter(lambda k: k not in ("model_name_or_path", "output_dir", "dataset")),
           yaml_scalars, max_size=2),
       overrides=st.just([]) | st.lists(st.tuples(st.sampled_from(CLI_OVERRIDE_KEYS),
                                                  texts | st.sampled_from(["64", "2", "-1", "keep_start", "plain", "true",
                                                                           "[1]"])).map("=".join), max_size=2))
def test_data_check_cli_fuzzed_prints_counts_or_one_line_error(rows, fmt, extra, overrides):
    """`dpo-lean data-check` on fuzzed rows, random config keys and overrides: exit 0 with every row counted, or
    exit 1 with one `Error:` line; never a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_rows(Path(tmp), rows, fmt, ascii_only=False, noise=False)
        raw = {"model_name_or_path": str(TINY_MODEL), "dataset": str(path), "template": "auto", "cutoff_len": 256,
               "output_dir": str(Path(tmp) / "out"), **extra}
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
        result = CliRunner().invoke(main, ["data-check", str(config), *overrides])
        assert "Traceback" not in result.output
        if result.exit_code == 0:
            counts = report_counts(result.stdout)
            assert counts["rows loaded"] == len(rows) or "max_samples" in str(extra) + str(overrides)
            assert counts["rows kept"] + counts["rows skipped"] == counts["rows loaded"]
            assert sum(counts["by reason"].values()) == counts["rows skipped"]
            assert set(counts["by reason"]) <= set(SKIP_REASONS)
            event(f"cli: ok, {min(counts['rows kept'], 2)}+ kept")
        else:
            assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.exception, result.output)
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
            event(f"cli: one-line error {lines[0].replace(str(path), '<file>')[7:40]}")


# --- regressions: data -------------------------------------------------------------------------------

def jsonl(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD_ROW = '{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."}'


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_regression_json_integer_over_4300_digits_is_read_as_a_number(tmp_path, suffix):
    huge = "9" * 5000
    rows = [GOOD_ROW, '{"prompt": ' + huge + ', "chosen": "Hi!", "rejected": "No."}',
            '{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go.", "score": -' + huge + "}"]
    path = tmp_path / f"rows{suffix}"
    path.write_text("[" + ",\n".join(rows) + "]" if suffix == ".json" else "\n".join(rows), encoding="utf-8")
    loaded = load_records(str(path))
    assert [r.row_index for r in loaded.records] == [0, 2]
    assert [(s.row_index, s.reason) for s in loaded.skips] == [(1, "wrong_type")]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_regression_json_nested_too_deeply_is_one_line_error_naming_the_line(tmp_path, suffix):
    deep = '{"prompt": "Say hi.", "chosen": ' + "[" * 3000 + "]" * 3000 + ', "rejected": "No."}'
    path = tmp_path / f"rows{suffix}"
    path.write_text("[" + GOOD_ROW + ",\n" + deep + "]" if suffix == ".json" else GOOD_ROW + "\n" + deep + "\n")
    with pytest.raises(DpoLeanError) as err:
        load_records(str(path))
    assert "line 2: nested too deeply" in assert_one_line(err.value, str(path))


def test_regression_dataset_info_with_huge_integer_or_deep_nesting(tmp_path):
    jsonl(tmp_path / "pairs.jsonl", GOOD_ROW)
    registry = tmp_path / "dataset_info.json"
    registry.write_text('{"pairs": {"file_name": "pairs.jsonl", "size": ' + "7" * 5000 + "}}")
    assert len(load_records("pairs", dataset_dir=str(tmp_path)).records) == 1
    registry.write_text('{"pairs": {"file_name": "pairs.jsonl", "x": ' + "[" * 3000 + "]" * 3000 + "}}")
    with pytest.raises(DpoLeanError) as err:
        load_records("pairs", dataset_dir=str(tmp_path))
    assert "nested too deeply" in assert_one_line(err.value, str(registry))


def test_regression_csv_cell_too_deep_or_huge_for_json_stays_text(tmp_path):
    path = tmp_path / "rows.csv"
    deep, huge = "[" * 3000 + "]" * 3000, "[" + "9" * 5000 + "]"
    path.write_text(f'instruction,history,chosen,rejected\nSay hi.,"{deep}",Hi!,No.\nSay hi.,"{huge}",Hi!,No.\n'
                    'Say hi.,,Hi!,No.\n', encoding="utf-8")
    loaded = load_records(str(path))
    assert [(s.row_index, s.reason) for s in loaded.skips] == [(0, "wrong_type"), (1, "wrong_type")]
    assert [r.row_index for r in loaded.records] == [2]


def test_regression_lone_surrogate_is_a_bad_text_skip_not_a_tokenizer_crash(tmp_path, tiny_tokenizer):
    path = jsonl(tmp_path / "rows.jsonl", GOOD_ROW,
                 '{"prompt": "Say hi.", "chosen": "lone \\ud800 surrogate", "rejected": "Go away."}',
                 '{"prompt": [{"role": "system", "content": "x"}, {"role": "user", "content": "\\udfff"}], '
                 '"chosen": "Hi!", "rejected": "Go."}',
                 '{"prompt": "pair \\ud83d\\ude00 is fine", "chosen": "Hi!", "rejected": "Go."}')
    config = from_dict({"model_name_or_path": str(TINY_MODEL), "dataset": str(path), "template": "auto"})
    data = prepare_data(config, tiny_tokenizer)
    assert [r.row_index for r in data.rows] == [0, 3]
    assert [(s.row_index, s.reason, s.source) for s in data.skips] == [
        (1, "bad_text", f"{path} line 2"), (2, "bad_text", f"{path} line 3")]
    assert data.skips[0].detail.startswith("'chosen' has a lone surrogate \\ud800 at character 5")
    assert data.skips[1].detail.startswith("'prompt' message 1 (user) has a lone surrogate \\udfff at character 0")
    report = write_skip_report(data, tmp_path / "metrics").read_text(encoding="utf-8")
    assert json.loads(report)["skipped_by_reason"] == {"bad_text": 2}
    # A Record built without the normaliser is skipped by tokenisation too, not passed to the tokenizer.
    record = Record(7, [{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a\ud800"}],
                    [{"role": "assistant", "content": "b"}], location="mem row 7")
    skip = tokenize_record(record, tiny_tokenizer, LF_TEMPLATES["chatml"], 64, "keep_end")
    assert isinstance(skip, Skip) and (skip.reason, skip.source) == ("bad_text", "mem row 7")


def test_nul_rtl_combining_and_emoji_text_is_kept_and_tokenised(tmp_path, tiny_tokenizer):
    texts_ = ["nul \x00 byte", "שלום \u202eevil\u202c", "e\u0301\u0302", "👩🏽\u200d💻 😀", "\ufeffbom", "a\u2028b"]
    rows = [json.dumps({"prompt": f"Say {i}: {t}", "chosen": f"{t} yes", "rejected": f"{t} no"}, ensure_ascii=ascii_)
            for i, t in enumerate(texts_) for ascii_ in (True, False)]
    path = jsonl(tmp_path / "rows.jsonl", *rows)
    config = from_dict({"model_name_or_path": str(TINY_MODEL), "dataset": str(path), "template": "auto"})
    data = prepare_data(config, tiny_tokenizer)
    assert data.skips == [] and len(data.rows) == len(rows)
    for i, text in enumerate(texts_):
        escaped, raw = data.rows[2 * i], data.rows[2 * i + 1]  # the same row written with and without \u escapes
        assert (escaped.id, escaped.prompt_ids, escaped.chosen_ids) == (raw.id, raw.prompt_ids, raw.chosen_ids)
        assert tiny_tokenizer.decode(raw.chosen_ids) == unicodedata.normalize("NFC", text) + " yes<|im_end|>\n"


@pytest.mark.parametrize("template, chosen, rejected", [
    ("auto", "\u00e9", "e\u0301"),  # NFC makes them equal
    ("qwen3", "<think>\nHm.\n</think>\n\nHi!", "Hi!")])  # enable_thinking false drops the thought
def test_regression_identical_tokens_are_named_not_identical_after_truncation(tiny_tokenizer, template, chosen,
                                                                              rejected):
    record = Record(0, [{"role": "user", "content": "Say hi."}], [{"role": "assistant", "content": chosen}],
                    [{"role": "assistant", "content": rejected}])
    keys = {"enable_thinking": False} if template == "qwen3" else {}
    chat_template = template_for(from_dict({"template": template, **keys}), tiny_tokenizer)
    skip = tokenize_record(record, tiny_tokenizer, chat_template, 2048, "keep_end")
    assert isinstance(skip, Skip) and skip.reason == "identical_tokens"
    assert "differ as text" in skip.detail


def test_two_hundred_thousand_character_lines_are_truncated_or_skipped(tmp_path, tiny_tokenizer):
    row = {"prompt": "Repeat: " + LONG_LINE, "chosen": LONG_LINE, "rejected": "No. " + LONG_LINE}
    short = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
    json_path = tmp_path / "long.json"
    json_path.write_text(json.dumps([row, short]), encoding="utf-8")
    jsonl_path = jsonl(tmp_path / "long.jsonl", json.dumps(row), json.dumps(short))
    for path in (json_path, jsonl_path):
        config = dict(model_name_or_path=str(TINY_MODEL), dataset=str(path), template="auto", cutoff_len=512)
        data = prepare_data(from_dict(config), tiny_tokenizer)  # keep_end: the prompt's end and the completions' start
        long_row = data.rows[0]
        assert [r.row_index for r in data.rows] == [0, 1] and data.skips == []
        assert long_row.truncated and len(long_row.prompt_ids) + len(long_row.rejected_ids) == 512
        data = prepare_data(from_dict(config | {"truncation_mode": "keep_start"}), tiny_tokenizer)
        assert [r.row_index for r in data.rows] == [1]
        assert [(s.row_index, s.reason, s.source) for s in data.skips] == [(0, "prompt_too_long", f"{path} line 1")]


def test_regression_dataset_name_too_long_for_the_file_system_is_not_found(tmp_path):
    with pytest.raises(DpoLeanError) as err:
        load_records("x" * 300 + ".jsonl", dataset_dir=str(tmp_path))
    assert "not found" in assert_one_line(err.value)
    with pytest.raises(DpoLeanError) as err:
        load_records("pairs", dataset_dir=str(tmp_path / ("d" * 300)))
    assert "not found" in assert_one_line(err.value)


def test_regression_unreadable_data_file_is_one_line_error(tmp_path, monkeypatch):
    path = jsonl(tmp_path / "rows.jsonl", GOOD_ROW)

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: refuse(self))  # JSON lines are streamed from open()
    with pytest.raises(DpoLeanError) as err:
        load_records(str(path))
    assert "Permission denied" in assert_one_line(err.value, str(path))


def test_regression_column_names_with_line_breaks_or_surrogates_stay_one_printable_line(tmp_path):
    path = jsonl(tmp_path / "rows.jsonl", '{"a\\nb": 1, "\\ud800": 2, "c\\u2028d": 3}')
    with pytest.raises(DpoLeanError) as err:
        load_records(str(path))
    message = assert_one_line(err.value, str(path), "no row matches")
    assert "a\\nb" in message and "\\ud800" in message and "c\\u2028d" in message


def test_regression_registry_column_with_line_break_gives_one_line_skip_detail(tmp_path):
    jsonl(tmp_path / "pairs.jsonl", '{"q\\nx": "Say hi.", "chosen": "Hi!", "rejected": "No."}', '{"chosen": "a"}')
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"pairs": {"file_name": "pairs.jsonl", "formatting": "alpaca", "columns": {"prompt": "q\nx"}}}))
    loaded = load_records("pairs", dataset_dir=str(tmp_path))
    assert [(s.row_index, s.reason) for s in loaded.skips] == [(1, "missing_field")]
    assert loaded.skips[0].detail == "'q\\nx' is missing or null"


@pytest.mark.parametrize("file_name", ["\ud800.jsonl", "a\u0000b.jsonl"])
def test_regression_dataset_info_file_name_that_is_no_path_is_one_line_error(tmp_path, file_name):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": file_name}}))
    with pytest.raises(DpoLeanError) as err:
        load_records("pairs", dataset_dir=str(tmp_path))
    assert "not a usable path" in assert_one_line(err.value, "dataset_info.json", "'pairs'")


def test_regression_json_lines_in_a_json_file_whose_first_row_is_a_list(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[]\n' + GOOD_ROW + "\n[1, 2]\n", encoding="utf-8")
    loaded = load_records(str(path))
    assert [(s.row_index, s.reason, s.source) for s in loaded.skips] == [
        (0, "not_an_object", f"{path} line 1"), (2, "not_an_object", f"{path} line 3")]
    assert [r.row_index for r in loaded.records] == [1]
    path.write_text("[" + GOOD_ROW + "]\n", encoding="utf-8")  # a one-line array is still an array
    assert load_records(str(path)).num_rows == 1


def test_regression_skip_report_with_undecodable_file_name_is_utf8(tmp_path, tiny_tokenizer):
    path = tmp_path / os.fsdecode(b"rows\xff.jsonl")  # the name holds the lone surrogate \udcff
    jsonl(path, GOOD_ROW, '{"prompt": "Say hi.", "chosen": "Hi!"}')
    config = from_dict({"model_name_or_path": str(TINY_MODEL), "dataset": str(path), "template": "auto"})
    data = prepare_data(config, tiny_tokenizer)
    report = json.loads(write_skip_report(data, tmp_path / "metrics").read_text(encoding="utf-8"))
    assert report["skipped"][0]["source"] == f"{path} line 2"


def test_regression_csv_header_with_a_repeated_column_is_one_line_error(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,chosen,prompt,rejected\nSay hi.,Hi!,Say bye.,No.\n", encoding="utf-8")
    with pytest.raises(DpoLeanError) as err:  # csv.DictReader kept the last 'prompt' silently
        load_records(str(path))
    assert "column 'prompt' appears more than once" in assert_one_line(err.value, f"{path} line 1")


def test_regression_csv_row_with_more_cells_than_the_header_is_an_extra_cells_skip(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,chosen,rejected\nSay hi, please.,Hi!,No.\nSay hi.,Hi!,No.,\n", encoding="utf-8")
    loaded = load_records(str(path))  # row 0 was kept as prompt "Say hi", chosen " please.", rejected "Hi!"
    assert [(s.row_index, s.reason, s.source) for s in loaded.skips] == [(0, "extra_cells", f"{path} line 2")]
    assert loaded.skips[0].detail.startswith("4 cells under a header of 3 columns")
    assert [r.row_index for r in loaded.records] == [1]  # an empty trailing cell is harmless
    path.write_text("prompt,chosen,rejected\nSay hi, please.,Hi!,No.\n", encoding="utf-8")
    assert [s.reason for s in load_records(str(path)).skips] == ["extra_cells"]  # layout still detected
