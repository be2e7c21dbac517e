"""``data-check --show N`` (rows as the model sees them) and ``--dump-ids PATH`` (every kept row's ids)."""

from __future__ import annotations

import gzip
import json

from conftest import FIXTURES
from test_cli import assert_one_line_error, invoke, write_config

PARITY = FIXTURES / "lf_parity"


def dumped(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_dump_ids_are_llamafactorys_for_every_kept_row(tmp_path):
    """qwen3_nothink, llamafactory truncation, on the parity rows: LF 0.9.5's own ids, skipped rows absent."""
    lf = json.loads(gzip.decompress((PARITY / "lf_ids.json.gz").read_bytes()))
    short, case = lf["cutoff_len"]["short"], lf["cases"]["qwen3_nothink"]
    cfg = write_config(tmp_path, model_name_or_path=str(PARITY / "tokenizer"), dataset=lf["datasets"],
                       dataset_dir=str(PARITY / "data"), template="qwen3_nothink", cutoff_len=short,
                       truncation_mode="llamafactory")
    result = invoke("data-check", cfg, "--dump-ids", tmp_path / "ids.jsonl")
    assert result.exit_code == 0, result.output
    expected = []
    for i, ((p, c, r), (s, t)) in enumerate(zip(case["rows"], case["cut"]["llamafactory"])):
        if c[:t] != r[:t]:  # LF trains on a pair it cut to equal completions; dpo-lean skips and counts it
            expected.append({"row_index": i, "prompt_ids": p[:s], "chosen_ids": c[:t], "rejected_ids": r[:t]})
    assert dumped(tmp_path / "ids.jsonl") == expected
    assert f"ids of {len(expected)} kept rows: {tmp_path / 'ids.jsonl'}" in result.stdout
    assert len(expected) < len(case["rows"])  # a skipped row is left out


def test_show_marks_special_tokens_newlines_and_the_completion_start(tmp_path):
    rows = json.loads((FIXTURES / "demo" / "demo_case.json").read_text(encoding="utf-8"))
    cfg = write_config(tmp_path, template="qwen3_nothink")  # <|im_start|>: an added token, not in the special map
    result = invoke("data-check", cfg, "--show", "2", "--dump-ids", tmp_path / "ids.jsonl")
    assert result.exit_code == 0, result.output
    ids = dumped(tmp_path / "ids.jsonl")
    for i in (0, 1):
        row, n = rows[i], ids[i]
        assert "system" not in [t["from"] for t in row["conversations"]]  # the first rows of the fixture have none
        expected = "\n".join([
            f"row {i}: prompt {len(n['prompt_ids'])} tokens, chosen {len(n['chosen_ids'])}, rejected {len(n['rejected_ids'])}",
            "┌─ prompt",
            "⟦<|im_start|>⟧user↵",
            f"{row['conversations'][0]['value']}⟦<|im_end|>⟧↵",
            "⟦<|im_start|>⟧assistant↵",
            "├─ chosen (the completion starts here)",
            f"{row['chosen']['value']}⟦<|im_end|>⟧↵",
            "├─ rejected (the completion starts here)",
            f"{row['rejected']['value']}⟦<|im_end|>⟧↵",
            "└─"])
        assert "\n" + expected + "\n" in result.stdout
    assert "row 2:" not in result.stdout


def test_show_more_rows_than_kept_shows_all_and_zero_shows_none(tmp_path):
    cfg = write_config(tmp_path, max_samples=3)
    assert invoke("data-check", cfg, "--show", "10").stdout.count("\n┌─ prompt\n") == 3
    assert "┌─ prompt" not in invoke("data-check", cfg).stdout


def test_dump_ids_to_an_unwritable_place_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = invoke("data-check", write_config(tmp_path), "--dump-ids", tmp_path / "file" / "ids.jsonl")
    assert_one_line_error(result, "cannot write", "ids.jsonl")
