"""Prepared data: tokenised once, in batches and worker processes, with the ids of the row-at-a-time path; reused
by every later command with the same fingerprint, rebuilt when stale or damaged, its skip report exact."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import FIXTURES, SHARED_DEMO
from test_cli import invoke, write_config
from test_lf_parity import LF, base_tokenizer, case_config, records

from dpo_lean import storage
from dpo_lean.config import from_dict
from dpo_lean.data import parallel, prepared
from dpo_lean.data.pipeline import prepare_data
from dpo_lean.data.records import Skip
from dpo_lean.data.sources import load_records
from dpo_lean.data.template_model import Template
from dpo_lean.data.templates import fix_tokenizer, template_for
from dpo_lean.data.tokenize import TokenizedRow, common_prefix_length, truncate

MODES = ("keep_end", "keep_start", "llamafactory")


# ---------------------------------------------------------------- the row-at-a-time path, as it was before batching


def reference_row(record, tokenizer, template, cutoff_len, mode):
    """tokenize_record before this change: each row alone, three apply_chat_template calls (Jinja) or LF's slots
    each encoded by tokenizer.encode."""
    where = record.location or record.source
    if isinstance(template, Template):
        prompt, chosen, rejected = template.encode_pair(tokenizer, record.prompt, record.chosen, record.rejected)
    else:
        def ids(messages, generation):
            return list(tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=generation,
                                                      tokenize=True, return_dict=True)["input_ids"])
        p, fc, fr = ids(record.prompt, True), ids(record.prompt + record.chosen, False), ids(record.prompt + record.rejected, False)
        n = min(common_prefix_length(p, fc), common_prefix_length(p, fr))
        prompt, chosen, rejected = p[:n], fc[n:], fr[n:]
    if chosen == rejected:
        return Skip(record.row_index, where, "identical_tokens",
                    f"chosen and rejected differ as text but give the same {len(chosen)} tokens")
    fitted = truncate(prompt, chosen, rejected, cutoff_len, mode)
    if fitted is None:
        return Skip(record.row_index, where, "prompt_too_long", f"prompt has {len(prompt)} tokens, cutoff_len is {cutoff_len}")
    p, c, r = fitted
    if not p:
        return Skip(record.row_index, where, "empty_prompt", "the prompt renders to no tokens before the completions")
    if c == r:
        return Skip(record.row_index, where, "identical_after_truncation",
                    f"chosen and rejected agree on their first {len(c)} tokens")
    return TokenizedRow(record.row_index, record.id, p, c, r, (len(p), len(c), len(r)) != (len(prompt), len(chosen), len(rejected)))


def batched(recs, tokenizer, template, cutoff_len, mode, workers):
    """What prepare_data writes, read back as rows and skips, through encode_batches with ``workers`` processes."""
    rows, skips = [], []
    chunks = [(recs[i:i + 16], []) for i in range(0, len(recs), 16)]  # many chunks, so their order counts
    for batch, batch_skips in parallel.encode_batches(chunks, tokenizer, template, cutoff_len, mode, workers):
        rows += prepared.PreparedRows(pa.Table.from_batches([batch], prepared.SCHEMA)).take(range(batch.num_rows))
        skips += batch_skips
    return rows, skips


def split(outs):
    return [o for o in outs if isinstance(o, TokenizedRow)], [o for o in outs if isinstance(o, Skip)]


@pytest.mark.parametrize("mode", MODES)
def test_batched_ids_equal_the_row_at_a_time_path_for_every_lf_template(mode):
    cutoff = LF["cutoff_len"]["short"]
    for case in sorted(LF["cases"]) + ["plain"]:
        tokenizer = copy.deepcopy(base_tokenizer())
        fix_tokenizer(tokenizer, case_config(case).template)
        template = template_for(case_config(case), tokenizer)
        expected = split([reference_row(r, tokenizer, template, cutoff, mode) for r in records()])
        assert batched(records(), tokenizer, template, cutoff, mode, 1) == expected, case


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["auto", "qwen3", "llama3"])
def test_one_and_two_workers_give_the_row_at_a_time_ids_on_the_demo_rows(tiny_tokenizer, name, mode, workers):
    """The tiny model's own Jinja template (auto) and two LF templates, on the demo rows (plus ../shared/data)."""
    spec = "demo_case" + (f",{SHARED_DEMO}" if SHARED_DEMO.exists() else "")
    recs = load_records(spec, str(FIXTURES / "demo")).records
    tokenizer = copy.deepcopy(tiny_tokenizer)
    fix_tokenizer(tokenizer, name)
    template = template_for(from_dict({"template": name}), tokenizer)
    whole = split([reference_row(r, tokenizer, template, 10**6, mode) for r in recs])[0]
    cutoff = max(len(r.prompt_ids) for r in whole) + 2  # every prompt fits; the longest rows' completions are cut
    expected = split([reference_row(r, tokenizer, template, cutoff, mode) for r in recs])
    assert len(expected[0]) > 10 and any(r.truncated for r in expected[0])
    assert batched(recs, tokenizer, template, cutoff, mode, workers) == expected


# ---------------------------------------------------------------- reuse, staleness, damage


@pytest.fixture
def count_tokenising(monkeypatch):
    """How many rows went through the tokeniser (prepare_data runs it in this process with one worker)."""
    seen = []
    real = parallel.tokenize_records

    def counting(recs, *args):
        seen.extend(r.row_index for r in recs)
        return real(recs, *args)
    monkeypatch.setattr(parallel, "tokenize_records", counting)
    return seen


def test_a_second_data_check_reuses_the_prepared_data(tmp_path, count_tokenising):
    path = write_config(tmp_path)
    first = invoke("data-check", path)
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("prepared ") and "(1 worker)" in first.stdout.splitlines()[0]
    tokenised = len(count_tokenising)
    second = invoke("data-check", path)
    assert second.exit_code == 0, second.output
    folder = tmp_path / "output" / "prepared"
    assert second.stdout.splitlines()[0].startswith(f"reused prepared data {folder}")
    assert len(count_tokenising) == tokenised > 0
    assert first.stdout.split("\n", 1)[1] == second.stdout.split("\n", 1)[1]  # the same report, word for word


def test_a_changed_cutoff_or_data_file_is_tokenised_again_and_the_stale_files_go(tmp_path, tiny_tokenizer, count_tokenising,
                                                                                capsys):
    data = tmp_path / "data.jsonl"
    shutil.copy(FIXTURES / "data" / "trl_standard.jsonl", data)
    config = dict(dataset=str(data), template="auto", output_dir=str(tmp_path / "out"))
    a = prepare_data(from_dict(config), tiny_tokenizer).path  # the rows are let go: no reader holds the file
    capsys.readouterr()
    b = prepare_data(from_dict(config | {"cutoff_len": 8}), tiny_tokenizer)
    assert capsys.readouterr().out.endswith("was made for other settings (cutoff_len: 2048 -> 8); tokenising again\n")
    assert not b.reused and b.path != a and not a.exists()
    assert [len(r.prompt_ids) + len(r.chosen_ids) for r in b.rows] == [8, 8]
    del b
    data.write_text(data.read_text() + '{"prompt": "New row.", "chosen": " Yes.", "rejected": " No."}\n')
    c = prepare_data(from_dict(config | {"cutoff_len": 8}), tiny_tokenizer)
    assert f"(sources.0:{data}.sha256: " in capsys.readouterr().out
    assert not c.reused and c.num_rows == 3 and len(c.rows) == 3
    assert len(count_tokenising) == 2 + 2 + 3
    assert sorted(p.name for p in c.path.parent.glob("[!.]*")) == sorted([c.path.name, c.path.stem + ".json"])


READER = """
import json, sys
from dpo_lean import modeling
from dpo_lean.config import from_dict
from dpo_lean.data.pipeline import prepare_data
from dpo_lean.scoring import to_dataset
config = from_dict(json.loads(sys.argv[1]))
data = prepare_data(config, modeling.load_tokenizer(config))
print(data.path, flush=True)
sys.stdin.readline()  # meanwhile another process prepares the same dataset with another cutoff_len
print(len(to_dataset(data.rows, None)), flush=True)  # train opens the file again (datasets maps it by path)
"""


def test_a_build_leaves_the_prepared_data_a_live_process_reads_and_a_later_one_removes_it(tmp_path):
    """A `data-check CFG cutoff_len=8` while a train (another process) uses the prepared data of the same dataset:
    the train's file stays, and the train opens it again later; once that process is gone, the next build
    removes it."""
    from dpo_lean import modeling

    data = tmp_path / "data.jsonl"
    shutil.copy(FIXTURES / "data" / "trl_standard.jsonl", data)
    config = dict(model_name_or_path=str(FIXTURES / "tiny-model"), dataset=str(data), template="auto",
                  output_dir=str(tmp_path / "out"))
    reader = subprocess.Popen([sys.executable, "-c", READER, json.dumps(config)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        held = Path(reader.stdout.readline().strip())
        assert held.name.endswith(".arrow"), reader.stderr.read()
        tokenizer = modeling.load_tokenizer(from_dict(config))
        other = prepare_data(from_dict(config | {"cutoff_len": 8}), tokenizer)
        assert not other.reused and other.path != held and held.exists() and held.with_suffix(".json").exists()
        out, err = reader.communicate("go\n", timeout=300)
    finally:
        reader.kill()
    assert reader.returncode == 0 and out.strip() == "2", err
    del other
    prepare_data(from_dict(config | {"cutoff_len": 16}), tokenizer)
    assert not held.exists() and not held.with_suffix(".json").exists()
    assert len(list(held.parent.glob("*.arrow"))) == 1


def test_template_options_are_in_the_key(tmp_path, tiny_tokenizer):
    """enable_thinking and default_system change ids, so they change the key (and the data is rebuilt)."""
    config = dict(dataset="demo_case", dataset_dir=str(FIXTURES / "demo"), template="qwen3", output_dir=str(tmp_path))
    tokenizer = copy.deepcopy(tiny_tokenizer)
    fix_tokenizer(tokenizer, "qwen3")
    on = prepare_data(from_dict(config), tokenizer)
    off = prepare_data(from_dict(config | {"enable_thinking": False}), tokenizer)
    system = prepare_data(from_dict(config | {"default_system": "Be terse."}), tokenizer)
    assert not off.reused and not system.reused and len({on.path, off.path, system.path}) == 3
    assert on.rows[0].chosen_ids != off.rows[0].chosen_ids


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_arrow", "bad_json"])
def test_damaged_prepared_data_is_rebuilt_with_a_one_line_notice(tmp_path, tiny_tokenizer, capsys, damage):
    config = from_dict(dict(dataset="demo_case", dataset_dir=str(FIXTURES / "demo"), template="auto",
                            cutoff_len=96, output_dir=str(tmp_path)))
    good = prepare_data(config, tiny_tokenizer)
    expected = list(good.rows)
    arrow, meta = good.path, good.path.with_suffix(".json")
    del good
    if damage == "truncate":
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    elif damage == "garbage":
        arrow.write_bytes(b"not arrow at all")
    elif damage == "no_arrow":
        arrow.unlink()
    else:
        meta.write_text("{")
    capsys.readouterr()
    again = prepare_data(config, tiny_tokenizer)
    notice = [line for line in capsys.readouterr().out.splitlines() if "unreadable" in line]
    assert len(notice) == 1 and notice[0].startswith(f"prepared data {arrow} is unreadable (")
    assert not again.reused and list(again.rows) == expected
    assert prepare_data(config, tiny_tokenizer).reused


def test_a_build_killed_before_its_metadata_is_rebuilt_and_its_temp_file_removed(tmp_path, tiny_tokenizer, count_tokenising):
    config = from_dict(dict(dataset="demo_case", dataset_dir=str(FIXTURES / "demo"), template="auto", output_dir=str(tmp_path)))
    good = prepare_data(config, tiny_tokenizer)
    good.path.with_suffix(".json").unlink()  # the arrow file was renamed, the metadata never written
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a writer that was killed: its pid is free
    leftover = good.path.parent / f".{good.path.name}.{storage.host()}.{gone.pid}.tmp"
    leftover.write_bytes(b"half")
    n = len(count_tokenising)
    again = prepare_data(config, tiny_tokenizer)
    assert not again.reused and len(count_tokenising) == 2 * n and not leftover.exists()


def test_overwrite_cache_tokenises_again(tmp_path, tiny_tokenizer):
    config = dict(dataset="demo_case", dataset_dir=str(FIXTURES / "demo"), template="auto", output_dir=str(tmp_path))
    prepare_data(from_dict(config), tiny_tokenizer)
    assert not prepare_data(from_dict(config | {"overwrite_cache": True}), tiny_tokenizer).reused


def test_the_skip_report_is_exact_when_reused(tmp_path, tiny_tokenizer):
    """Every skip (load stage and tokenisation) and its detail, in row order, equal the row-at-a-time path's."""
    config = from_dict(dict(dataset=str(FIXTURES / "data" / "bad_rows.jsonl"), template="auto", cutoff_len=24,
                            truncation_mode="keep_start", output_dir=str(tmp_path)))
    loaded = load_records(config.dataset)
    template = template_for(config, tiny_tokenizer)
    outs = [reference_row(r, tiny_tokenizer, template, 24, "keep_start") for r in loaded.records]
    expected = sorted(loaded.skips + [o for o in outs if isinstance(o, Skip)], key=lambda s: s.row_index)
    assert len({s.reason for s in expected}) >= 4
    first = prepare_data(config, tiny_tokenizer)
    second = prepare_data(config, tiny_tokenizer)
    assert second.reused and first.skips == second.skips == expected
    assert second.num_rows == loaded.num_rows and [r.row_index for r in second.rows] == [
        o.row_index for o in outs if isinstance(o, TokenizedRow)]
    write = json.loads((second.path.with_suffix(".json")).read_text())
    assert write["num_rows"] == loaded.num_rows


def test_workers_two_writes_the_same_prepared_rows_as_one(tmp_path, tiny_tokenizer):
    base = dict(dataset="demo_case", dataset_dir=str(FIXTURES / "demo"), template="auto", cutoff_len=64)
    one = prepare_data(from_dict(base | {"output_dir": str(tmp_path / "a")}), tiny_tokenizer)
    two = prepare_data(from_dict(base | {"output_dir": str(tmp_path / "b"), "preprocessing_num_workers": 2}), tiny_tokenizer)
    assert two.workers == 2 and "(2 workers)" in two.describe()
    assert one.rows.table.equals(two.rows.table) and one.skips == two.skips


def test_precompute_then_train_tokenise_once_in_total(tmp_path, count_tokenising):
    path = write_config(tmp_path, max_steps=1, save_strategy="no", plot_loss=False, val_size=4)
    pre = invoke("precompute", path)
    assert pre.exit_code == 0, pre.output
    tokenised = sorted(count_tokenising)
    assert tokenised and len(set(tokenised)) == len(tokenised)
    train = invoke("train", path)
    assert train.exit_code == 0, train.output
    assert sorted(count_tokenising) == tokenised and train.stdout.startswith("reused prepared data ")


@pytest.mark.parametrize("name", ["bad_rows.jsonl", "sharegpt.json", "alpaca.csv", "trl_standard.jsonl"])
def test_streamed_chunks_hold_the_rows_and_skips_of_a_whole_load(name):
    """One row a chunk: the same records, skips and sources as the whole file at once (the layout is detected
    over all rows in a first pass, not per chunk)."""
    from dpo_lean.data.sources import LoadedData, stream_records

    path = str(FIXTURES / "data" / name)
    whole = load_records(path)
    summary, records, skips = LoadedData(), [], []
    for chunk_records, chunk_skips in stream_records(path, summary=summary, chunk_rows=1):
        assert len(chunk_records) + len(chunk_skips) == 1
        records += chunk_records
        skips += chunk_skips
    assert (records, skips, summary.num_rows, summary.sources) == (whole.records, whole.skips, whole.num_rows, whole.sources)


def test_rows_are_gathered_in_the_order_asked_across_the_file_batches(tmp_path, tiny_tokenizer):
    config = from_dict(dict(dataset="demo_case", dataset_dir=str(FIXTURES / "demo"), template="auto", output_dir=str(tmp_path)))
    rows = prepare_data(config, tiny_tokenizer).rows
    table = rows.table
    small = prepared.PreparedRows(pa.Table.from_batches(table.to_batches(max_chunksize=5)))  # many batches
    order = [len(small) - 1, 0, 7, 3, 12, 5, 5]
    expected = table.take(pa.array(order)).to_pylist()
    got = small.take(order)
    assert [(r.row_index, r.prompt_ids, r.chosen_ids, r.rejected_ids) for r in got] == [
        (e["row_index"], e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in expected]
    view = small.subset(order[::-1])
    assert view.take([0, 2]) == [got[-1], got[-3]] and list(view)[-1] == got[0]


def test_a_cold_prepare_hashes_each_dataset_file_once(tmp_path, tiny_tokenizer, monkeypatch):
    """Before: source_identity hashed the file to key the prepared data, then reading its rows hashed it again."""
    import hashlib

    from dpo_lean import fingerprint

    data = tmp_path / "rows.json"
    shutil.copy(FIXTURES / "data" / "sharegpt.json", data)
    read = []
    real_open = open

    def counting_open(file, mode="r", *a, **k):
        if Path(file).resolve() == data.resolve() and "b" in mode:
            read.append(mode)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr("builtins.open", counting_open)
    prepare_data(from_dict(dict(dataset=str(data), template="auto", output_dir=str(tmp_path / "out"))), tiny_tokenizer)
    monkeypatch.undo()
    assert len(read) == 1  # one hash; the rows themselves are read as text
    assert fingerprint.file_sha256(data) == hashlib.sha256(data.read_bytes()).hexdigest()
