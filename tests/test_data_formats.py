"""Dataset finding, reading and layout normalisation: dpo_lean.data.sources and dpo_lean.data.formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_lean.data.formats import LAYOUTS, FormatSpec, normalise_row
from dpo_lean.data.records import SKIP_REASONS, RowSkipped, row_id
from dpo_lean.data.sources import load_records
from dpo_lean.errors import DpoLeanError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
DEMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "dpo_en_demo.json"

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
EXPECTED = [  # (prompt, chosen, rejected) of the four rows every full-layout fixture holds
    ([SYSTEM, {"role": "user", "content": "Name a prime number."}], "7", "8"),
    ([{"role": "user", "content": "Translate 'cat' into French."}], "chat", "chien"),
    ([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Summarise this sentence:\nThe cat sat on the warm mat."}],
     "A cat rested on a mat.", "Dogs bark."),
    ([{"role": "user", "content": "Summarise this sentence:\nThe cat sat on the warm mat."}],
     "A cat rested on a mat.", "Dogs bark."),
]
FULL_LAYOUTS = ["alpaca.json", "sharegpt.json", "trl_conversational.jsonl", "trl_implicit.jsonl"]
STANDARD_ROWS = [1, 3]  # the rows a TRL standard (prompt text) file can hold


def content(records):
    return [(r.id, r.prompt, r.chosen, r.rejected) for r in records]


def expected_content(rows=range(4)):
    out = []
    for i in rows:
        prompt, chosen, rejected = EXPECTED[i]
        chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
        out.append((row_id(prompt, chosen, rejected), prompt, chosen, rejected))
    return out


def read_rows(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]


def write_variants(rows: list, tmp_path: Path, stem: str) -> list[Path]:
    """The same rows as .json array, .jsonl, JSON lines named .json, and .parquet."""
    paths = [tmp_path / f"{stem}_array.json", tmp_path / f"{stem}.jsonl", tmp_path / f"{stem}_lines.json",
             tmp_path / f"{stem}.parquet"]
    paths[0].write_text(json.dumps(rows, indent=2))
    for path in paths[1:3]:
        path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    columns = list(dict.fromkeys(key for row in rows for key in row))  # from_pylist reads keys off row 0 only
    pq.write_table(pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows]), paths[3])
    return paths


# --- layouts and file types ---------------------------------------------------------------------

@pytest.mark.parametrize("fixture", FULL_LAYOUTS)
def test_layouts_give_identical_records_in_every_file_type(fixture, tmp_path):
    rows = read_rows(FIXTURES / fixture)
    for path in [FIXTURES / fixture, *write_variants(rows, tmp_path, Path(fixture).stem)]:
        loaded = load_records(str(path))
        assert content(loaded.records) == expected_content(), path
        assert loaded.skips == [] and loaded.num_rows == 4
        assert [r.row_index for r in loaded.records] == [0, 1, 2, 3]
        assert all(r.source == str(path) for r in loaded.records)


def test_detected_layout_is_reported():
    layouts = [load_records(str(FIXTURES / name)).sources[0]["layout"] for name in FULL_LAYOUTS]
    assert layouts == ["alpaca", "sharegpt", "trl", "trl_implicit"]


@pytest.mark.parametrize("fixture", ["trl_standard.jsonl", "trl_standard.csv"])
def test_trl_standard_matches_other_layouts(fixture, tmp_path):
    expected = expected_content(STANDARD_ROWS)
    loaded = load_records(str(FIXTURES / fixture))
    assert content(loaded.records) == expected
    if fixture.endswith(".jsonl"):
        for path in write_variants(read_rows(FIXTURES / fixture), tmp_path, "std"):
            assert content(load_records(str(path)).records) == expected


def test_csv_alpaca_with_json_history_cell():
    loaded = load_records(str(FIXTURES / "alpaca.csv"))
    assert content(loaded.records) == expected_content()


def test_csv_rows_are_located_by_starting_line(tmp_path):
    path = tmp_path / "std.csv"
    path.write_text('prompt,chosen,rejected\n"two\nlines",a,b\nthree,same,same\n')
    loaded = load_records(str(path))
    assert [(s.source, s.reason) for s in loaded.skips] == [(f"{path} line 4", "identical_completions")]


def test_sharegpt_plain_string_completions_and_tool_roles(tmp_path):
    path = tmp_path / "tools.jsonl"
    row = {"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "w"}'},
                             {"from": "observation", "value": "sunny"}],
           "system": "Be brief.", "tools": "[]", "chosen": "It is sunny.", "rejected": {"from": "gpt", "value": "Rain."}}
    path.write_text(json.dumps(row) + "\n")
    record = load_records(str(path)).records[0]
    assert [m["role"] for m in record.prompt] == ["system", "user", "assistant", "tool"]
    assert record.prompt[0]["content"] == "Be brief."
    assert record.chosen == [{"role": "assistant", "content": "It is sunny."}]


def test_a_sharegpt_tool_list_is_a_counted_skip_not_silently_dropped(tmp_path):
    """LF renders a tools column into the system prompt; dpo-lean does not, so it says so instead of training on
    other prompts than the SFT run's. An empty list (as JSON text or a list) is no tool list."""
    base = {"conversations": [{"from": "human", "value": "Weather?"}], "chosen": "Sunny.", "rejected": "Rain."}
    tools = '[{"name": "weather", "parameters": {}}]'
    rows = [{**base, "tools": tools}, {**base, "tools": " [] "}, {**base, "tools": []}, base,
            {**base, "tools": [{"name": "w"}]}]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_records(str(path))
    assert [r.row_index for r in loaded.records] == [1, 2, 3]
    assert [(s.row_index, s.source, s.reason, s.detail) for s in loaded.skips] == [
        (0, f"{path} line 1", "tools_not_rendered", "'tools' holds a tool list"),
        (4, f"{path} line 5", "tools_not_rendered", "'tools' holds a tool list")]


def test_extra_message_keys_and_columns_are_ignored(tmp_path):
    path = tmp_path / "extra.jsonl"
    row = {"prompt": [{"role": "user", "content": "Translate 'cat' into French.", "name": "x"}],
           "chosen": [{"role": "assistant", "content": "chat"}], "rejected": [{"role": "assistant", "content": "chien"}],
           "score": 3}
    path.write_text(json.dumps(row))
    assert content(load_records(str(path)).records) == expected_content([1])


# --- dataset_info.json --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["alpaca_demo", "sharegpt_demo", "alpaca_remapped", "sharegpt_remapped", "trl_unranked"])
def test_registered_names_with_columns_and_tags(name):
    loaded = load_records(name, dataset_dir=str(FIXTURES))
    assert content(loaded.records) == expected_content()
    assert all(r.source == name for r in loaded.records)
    assert loaded.sources[0]["name"] == name and loaded.sources[0]["rows"] == 4
    assert len(loaded.sources[0]["sha256"]) == 64


def test_relative_spec_under_dataset_dir_and_cwd(monkeypatch):
    monkeypatch.chdir(FIXTURES.parent)
    by_dir = load_records("alpaca.json", dataset_dir="data")
    by_cwd = load_records("data/alpaca.json", dataset_dir="elsewhere")
    assert content(by_dir.records) == content(by_cwd.records) == expected_content()
    assert by_dir.skips == [] and by_dir.sources[0]["path"] == str((FIXTURES / "alpaca.json").resolve())


def registry(tmp_path: Path, entries: dict) -> Path:
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    (root / "dataset_info.json").write_text(json.dumps(entries))
    return root


@pytest.mark.parametrize("file_name", ["../outside.json", "/ABS/outside.json", "link.json"])
def test_file_name_escaping_dataset_dir_is_refused(file_name, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy(FIXTURES / "alpaca.json", outside)
    root = registry(tmp_path, {"escape": {"file_name": file_name.replace("/ABS", str(tmp_path))}})
    (root / "link.json").symlink_to(outside)
    with pytest.raises(DpoLeanError, match=r"escape.*outside"):
        load_records("escape", dataset_dir=str(root))


def test_hub_entry_and_hub_id_use_load_dataset(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path == "org/missing":
            raise FileNotFoundError("Dataset 'org/missing' doesn't exist on the Hub\nmore detail")
        return datasets.Dataset.from_list(read_rows(FIXTURES / "trl_conversational.jsonl"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    root = registry(tmp_path, {"hubbed": {"hf_hub_url": "org/pairs", "subset": "en", "split": "test"}})
    loaded = load_records("hubbed,org/other", dataset_dir=str(root), max_samples=3)
    assert calls == [("org/pairs", "en", "test"), ("org/other", None, "train")]
    assert content(loaded.records) == expected_content([0, 1, 2]) * 2
    assert [r.row_index for r in loaded.records] == [0, 1, 2, 3, 4, 5]
    assert loaded.sources[1]["path"] == "org/other" and loaded.sources[1]["sha256"].startswith("org/other@")
    with pytest.raises(DpoLeanError, match=r"'org/missing'.*FileNotFoundError.*doesn't exist on the Hub\);") as err:
        load_records("org/missing", dataset_dir=str(root))
    assert "\n" not in str(err.value)


def test_unknown_spec_names_paths_and_closest_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DpoLeanError) as err:
        load_records("sharegpt_dem", dataset_dir=str(FIXTURES))
    message = str(err.value)
    assert "'sharegpt_dem'" in message and str(FIXTURES / "sharegpt_dem") in message
    assert "did you mean 'sharegpt_demo'?" in message and "\n" not in message
    with pytest.raises(DpoLeanError, match="not found"):
        load_records("missing/file.jsonl", dataset_dir=str(FIXTURES))


def test_bad_registry_entries(tmp_path):
    root = registry(tmp_path, {"fmt": {"file_name": "a.json", "formatting": "openai"},
                               "col": {"file_name": "a.json", "columns": {"images": "imgs"}},
                               "nothing": {"ranking": True}})
    for name, pattern in [("fmt", "formatting 'openai'"), ("col", "columns key 'images'"), ("nothing", "no file_name")]:
        with pytest.raises(DpoLeanError, match=pattern):
            load_records(name, dataset_dir=str(root))


# --- malformed files, skips and counts ----------------------------------------------------------

def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": }\n')
    with pytest.raises(DpoLeanError, match=rf"{path} line 3: not valid JSON"):
        load_records(str(path))


def test_malformed_json_array_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "a",\n   "chosen": b}\n]\n')
    with pytest.raises(DpoLeanError, match=rf"{path} line 4: not valid JSON"):
        load_records(str(path))
    path.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"}\n  {"prompt": "a"}\n]\n')
    with pytest.raises(DpoLeanError, match=rf"{path} line 3: not valid JSON \(expected ','"):
        load_records(str(path))


def test_json_array_skips_are_located_by_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "a",\n'
                    '   "chosen": "b", "rejected": "b"}\n]\n')
    assert [s.source for s in load_records(str(path)).skips] == [f"{path} line 3"]


def test_every_bad_row_kind_is_skipped_with_reason_and_index():
    path = FIXTURES / "bad_rows.jsonl"
    loaded = load_records(str(path))
    got = [(s.row_index, s.reason, s.source) for s in loaded.skips]
    assert got == [
        (1, "missing_field", f"{path} line 2"),
        (2, "wrong_type", f"{path} line 3"),
        (3, "empty_completion", f"{path} line 5"),
        (4, "identical_completions", f"{path} line 6"),
        (5, "bad_turns", f"{path} line 7"),
        (6, "not_an_object", f"{path} line 8"),
        (7, "missing_field", f"{path} line 9"),
        (8, "bad_turns", f"{path} line 10"),
        (9, "bad_text", f"{path} line 11"),  # a lone surrogate cannot be tokenised; a NUL byte alone can
    ]
    assert "rejected" in loaded.skips[0].detail and "prompt" in loaded.skips[6].detail
    assert loaded.skips[8].detail.startswith("'chosen' has a lone surrogate \\ud800 at character 5")
    assert [r.row_index for r in loaded.records] == [0]
    assert len(loaded.records) + len(loaded.skips) == loaded.num_rows == 10
    assert all(s.reason in SKIP_REASONS for s in loaded.skips)


def test_skip_reasons_cover_later_stages():
    assert {"prompt_too_long", "identical_after_truncation", "missing_field", "wrong_type", "empty_completion",
            "identical_completions", "bad_turns", "not_an_object"} <= set(SKIP_REASONS)
    assert all(isinstance(text, str) and "\n" not in text for text in SKIP_REASONS.values())


@pytest.mark.parametrize("rows, reason", [
    ([{"conversations": [{"from": "gpt", "value": "x"}], "chosen": "a", "rejected": "b"}], "bad_turns"),
    ([{"conversations": [{"from": "human", "value": "x"}], "chosen": {"from": "human", "value": "a"}, "rejected": "b"}], "bad_turns"),
    ([{"conversations": [{"from": "robot", "value": "x"}], "chosen": "a", "rejected": "b"}], "bad_turns"),
    ([{"conversations": "hello", "chosen": "a", "rejected": "b"}], "wrong_type"),
    ([{"instruction": "x", "history": [["only one"]], "chosen": "a", "rejected": "b"}], "wrong_type"),
    ([{"instruction": "", "input": "", "chosen": "a", "rejected": "b"}], "bad_turns"),
    ([{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
       "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "a"}]}], "bad_turns"),
    ([{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
       "rejected": [{"role": "user", "content": "q"}]}], "empty_completion"),
    ([{"prompt": "q", "chosen": [], "rejected": "b"}], "empty_completion"),
])
def test_row_level_skip_reasons(rows, reason, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    loaded = load_records(str(path))
    assert [s.reason for s in loaded.skips] == [reason] and loaded.records == []


def test_no_matching_layout_is_an_error(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": "a2"}\n')
    with pytest.raises(DpoLeanError, match=rf"{path}: no row matches.*answer, question.*sharegpt") as err:
        load_records(str(path))
    assert "\n" not in str(err.value)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DpoLeanError, match="no rows"):
        load_records(str(path))
    assert load_records(str(FIXTURES / "alpaca.json"), max_samples=0).num_rows == 0


# --- max_samples and multiple datasets ----------------------------------------------------------

def test_max_samples_keeps_first_rows_of_each_dataset():
    loaded = load_records(f"{FIXTURES / 'bad_rows.jsonl'}, alpaca_demo", dataset_dir=str(FIXTURES), max_samples=3)
    assert loaded.num_rows == 6 and [s["rows"] for s in loaded.sources] == [3, 3]
    assert [r.row_index for r in loaded.records] == [0, 3, 4, 5]
    assert [(s.row_index, s.reason) for s in loaded.skips] == [(1, "missing_field"), (2, "wrong_type")]
    assert content(loaded.records[1:]) == expected_content([0, 1, 2])


def test_comma_separated_datasets_have_global_row_index():
    specs = [str(FIXTURES / "trl_standard.jsonl"), str(FIXTURES / "bad_rows.jsonl"), "sharegpt_demo"]
    loaded = load_records(",".join(specs), dataset_dir=str(FIXTURES))
    assert loaded.num_rows == 2 + 10 + 4 == len(loaded.records) + len(loaded.skips)
    assert [s["name"] for s in loaded.sources] == specs
    assert [s.row_index for s in loaded.skips] == [i + 2 for i in range(1, 10)]
    assert [r.row_index for r in loaded.records] == [0, 1, 2, 12, 13, 14, 15]
    assert [r.source for r in loaded.records] == [specs[0]] * 2 + [specs[1]] + [specs[2]] * 4


# --- the real LLaMA-Factory sample --------------------------------------------------------------

def test_dpo_en_demo_as_file_and_registered(tmp_path):
    if not DEMO.is_file():
        pytest.skip(f"{DEMO} is absent")
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(DEMO, root / "dpo_en_demo.json")
    (root / "dataset_info.json").write_text(json.dumps({"dpo_en_demo": {
        "file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}))
    as_file = load_records(str(DEMO))
    registered = load_records("dpo_en_demo", dataset_dir=str(root))
    for loaded in (as_file, registered):
        assert len(loaded.records) == 300 and loaded.skips == [] and loaded.num_rows == 300
        assert sum(r.prompt[0]["role"] == "system" for r in loaded.records) == 80
    assert [r.id for r in as_file.records] == [r.id for r in registered.records]
    assert as_file.sources[0]["sha256"] == registered.sources[0]["sha256"]


# --- robustness: any JSON row is a Record or a Skip, never a crash ---------------------------------

_KEYS = ["prompt", "chosen", "rejected", "instruction", "input", "history", "system", "conversations",
         "from", "value", "role", "content"]
_ROLES = st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool", "observation", "x"])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | _ROLES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(row=st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=6) | _JSON,
       layout=st.sampled_from(list(LAYOUTS)), text_cells=st.booleans())
def test_any_row_normalises_or_skips(row, layout, text_cells):
    try:
        prompt, chosen, rejected = normalise_row(row, layout, FormatSpec(text_cells=text_cells))
    except RowSkipped as skipped:
        assert skipped.reason in SKIP_REASONS
        return
    for messages in (prompt, chosen, rejected):
        assert messages and all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in messages)
    assert prompt[-1]["role"] in ("user", "tool") and chosen[0]["role"] == "assistant" and chosen != rejected
