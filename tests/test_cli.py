"""The dpo-lean command line: commands, one-line user errors, data-check reports and cache-info."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from conftest import FIXTURES, SHARED_DEMO
from make_fixtures import DEMO_ROWS, fixture_config

from dpo_lean.cli import main
from dpo_lean.config import Config
from dpo_lean.data.records import SKIP_REASONS

FIXTURE_CACHE = FIXTURES / "demo" / "ref_cache"
WORKFLOW = ["data-check", "precompute", "train", "evaluate", "export", "sweep", "cache-info", "config", "keys", "demo"]


def write_config(tmp_path: Path, **overrides) -> Path:
    """The fixture config as a YAML file, with output_dir and ref_cache_dir in tmp_path."""
    raw = fixture_config(FIXTURES)
    raw["output_dir"] = str(tmp_path / "output")
    raw["ref_cache_dir"] = str(tmp_path / "ref_cache")
    raw.update(overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *fragments: str) -> str:
    """Non-zero exit, exactly one stderr line 'Error: ...' holding every fragment, no traceback."""
    assert result.exit_code != 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def report_values(stdout: str) -> dict:
    """Counts and the token-length table from data-check's output."""
    out = {}
    for key in ("rows loaded", "rows kept", "rows skipped"):
        m = re.search(rf"^{key}: (\d+)$", stdout, re.M)
        assert m, f"no '{key}: N' line in:\n{stdout}"
        out[key] = int(m.group(1))
    m = re.search(r"^rows truncated to cutoff_len=(\d+): (\d+)$", stdout, re.M)
    assert m, f"no truncated line in:\n{stdout}"
    out["cutoff_len"], out["rows truncated"] = int(m.group(1)), int(m.group(2))
    out["reasons"] = {r: int(n) for r, n in re.findall(r"^  (\w+): (\d+), first ", stdout, re.M)}
    lines = stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.split() == ["tokens", "p50", "p90", "p99", "max"]]
    assert len(header) == 1, f"no token-length table header in:\n{stdout}"
    table = {}
    for line in lines[header[0] + 1: header[0] + 4]:
        name, *values = line.split()
        table[name] = dict(zip(("p50", "p90", "p99", "max"), map(int, values)))
    assert list(table) == ["prompt", "chosen", "rejected"], table
    out["table"] = table
    return out


def nearest_rank(values: list[int], q: int) -> int:
    values = sorted(values)
    return values[max(1, -(-len(values) * q // 100)) - 1]


def assert_table_sane(table: dict, cutoff_len: int) -> None:
    for name, stats in table.items():
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"] <= cutoff_len, (name, stats)


# ---------------------------------------------------------------- commands and errors


def test_help_lists_every_command_in_workflow_order_one_whole_line_each():
    result = invoke("--help")
    assert result.exit_code == 0
    lines = result.stdout.split("Commands:")[1].strip("\n").splitlines()
    assert [line.split()[0] for line in lines] == WORKFLOW  # no line wrapped onto a second one
    assert not [line for line in lines if line.rstrip().endswith("...")]  # no description cut short


def _executable() -> str:
    exe = Path(sys.executable).with_name("dpo-lean")
    return str(exe) if exe.exists() else shutil.which("dpo-lean") or pytest.fail("dpo-lean executable not found")


def test_typo_key_is_one_line_error_without_traceback_in_real_executable(tmp_path):
    """The installed executable: exit 1, stderr is exactly one 'Error:' line naming key and suggestion."""
    cfg = write_config(tmp_path)
    proc = subprocess.run([_executable(), "data-check", str(cfg), "pref_betta=0.1"], capture_output=True, text=True,
                          timeout=120, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("Error: ")
    assert "'pref_betta'" in lines[0] and "did you mean 'pref_beta'" in lines[0], lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "output").exists()  # failed before doing any work


@pytest.mark.parametrize("case", ["missing_config", "missing_dataset"])
def test_missing_paths_are_one_line_errors(tmp_path, case):
    cfg = write_config(tmp_path)
    missing_cfg, missing_data = tmp_path / "nope.yaml", tmp_path / "nowhere" / "pairs.jsonl"
    if case == "missing_config":
        result = invoke("data-check", missing_cfg)
        assert_one_line_error(result, str(missing_cfg), "not found")
    else:
        result = invoke("data-check", cfg, f"dataset={missing_data}")
        assert_one_line_error(result, str(missing_data), "not found")
    assert result.exit_code == 1
    assert result.stdout == ""


def test_user_errors_in_process(tmp_path):
    cfg = write_config(tmp_path)
    assert_one_line_error(invoke("data-check", cfg, "pref_betta=0.1"), "'pref_betta'", "did you mean 'pref_beta'")
    assert_one_line_error(invoke("data-check", cfg, "pref_beta"), "'pref_beta'", "key=value")
    assert_one_line_error(invoke("data-check", cfg, "cutoff_len=0"), "'cutoff_len'", ">= 2")
    assert_one_line_error(invoke("data-check", tmp_path / "nope.yaml"), "nope.yaml", "not found")
    assert_one_line_error(invoke("data-check", cfg, "dataset=demo_cse"), "'demo_cse'", "not found",
                          "did you mean 'demo_case'")
    assert_one_line_error(invoke("data-check", cfg, "model_name_or_path=null"), "'model_name_or_path'", "required")


def test_keys_prints_every_key():
    result = invoke("keys")
    assert result.exit_code == 0
    own, lf_only = result.stdout.split("[LLaMA-Factory keys refused]")
    printed = [line.split()[0] for line in own.splitlines() if line.startswith("  ")]
    assert printed == [f.name for f in dataclasses.fields(Config)]
    assert "use_unsloth (false)" in lf_only and "[LLaMA-Factory keys of no effect]" in lf_only


# ---------------------------------------------------------------- data-check


def test_data_check_fixture_demo(tmp_path):
    result = invoke("data-check", write_config(tmp_path))
    assert result.exit_code == 0, result.output
    values = report_values(result.stdout)
    assert (values["rows loaded"], values["rows kept"], values["rows skipped"]) == (DEMO_ROWS, DEMO_ROWS, 0)
    assert values["reasons"] == {}
    assert values["cutoff_len"] == 128 and values["rows truncated"] == 0
    assert "dataset: demo_case" in result.stdout
    assert f"{DEMO_ROWS} of {DEMO_ROWS} rows kept" in result.stdout
    assert not (tmp_path / "output" / "dpo_metrics" / "skipped_rows.json").exists()
    # The committed cache was built from the same rows and config: its token counts give the same table.
    cache = pq.read_table(FIXTURE_CACHE)
    for name in ("prompt", "chosen", "rejected"):
        counts = cache.column(f"{name}_tokens").to_pylist()
        expected = {f"p{q}": nearest_rank(counts, q) for q in (50, 90, 99)} | {"max": max(counts)}
        assert values["table"][name] == expected, name


needs_shared_demo = pytest.mark.skipif(not SHARED_DEMO.is_file(), reason=f"{SHARED_DEMO} is absent")


@needs_shared_demo
def test_data_check_shared_demo(tmp_path):
    cfg = write_config(tmp_path, dataset=str(SHARED_DEMO), cutoff_len=1024)
    result = invoke("data-check", cfg)
    assert result.exit_code == 0, result.output
    values = report_values(result.stdout)
    assert values["rows loaded"] == 300
    assert values["rows kept"] + values["rows skipped"] == 300
    assert sum(values["reasons"].values()) == values["rows skipped"]
    assert 0 <= values["rows truncated"] <= values["rows kept"]
    assert values["cutoff_len"] == 1024
    assert_table_sane(values["table"], 1024)

    result = invoke("data-check", cfg, "cutoff_len=128")
    assert result.exit_code == 0, result.output
    short = report_values(result.stdout)
    assert short["rows loaded"] == 300
    assert short["rows kept"] + short["rows skipped"] == 300
    assert short["rows truncated"] > 0
    assert short["rows truncated"] >= values["rows truncated"]
    assert_table_sane(short["table"], 128)
    assert short["table"]["prompt"]["max"] <= values["table"]["prompt"]["max"]


GOOD = [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
        {"prompt": "Count to two.", "chosen": "1 2", "rejected": "3"}]
LONG_PROMPT = {"prompt": "Repeat these words: " + "word " * 80, "chosen": "word", "rejected": "no"}
BAD = {  # reason -> a row skipped for that reason (prompt_too_long needs keep_start and a small cutoff_len)
    "missing_field": {"prompt": "Say hi.", "chosen": "Hi!"},
    "wrong_type": {"prompt": "Say hi.", "chosen": "Hi!", "rejected": 5},
    "empty_completion": {"prompt": "Say hi.", "chosen": "   ", "rejected": "Go away."},
    "identical_completions": {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hi!"},
    "bad_turns": {"prompt": "", "chosen": "Hi!", "rejected": "Go away."},
    "not_an_object": ["prompt", "chosen", "rejected"],
    "prompt_too_long": LONG_PROMPT,
}
SMALL_CUTOFF = {"truncation_mode": "keep_start", "cutoff_len": 64}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_data_check_reports_every_skip_reason(tmp_path):
    assert set(BAD) <= set(SKIP_REASONS)
    rows, expected = [GOOD[0]], {}  # row_index -> reason
    for reason, row in BAD.items():
        expected[len(rows)] = reason
        rows.append(row)
    rows += GOOD[1:]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = write_config(tmp_path, dataset=str(data), **SMALL_CUTOFF)

    result = invoke("data-check", cfg)
    assert result.exit_code == 0, result.output
    values = report_values(result.stdout)
    assert values["rows loaded"] == len(rows)
    assert values["rows kept"] == len(GOOD)
    assert values["rows skipped"] == len(BAD)
    assert values["rows kept"] + values["rows skipped"] == values["rows loaded"]
    assert values["reasons"] == {reason: 1 for reason in BAD}
    assert_table_sane(values["table"], 64)

    report_path = tmp_path / "output" / "dpo_metrics" / "skipped_rows.json"
    assert f"skipped rows: {report_path}" in result.stdout
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert {s["row_index"]: s["reason"] for s in report["skipped"]} == expected
    assert [s["row_index"] for s in report["skipped"]] == sorted(expected)
    assert report["skipped_by_reason"] == {reason: 1 for reason in BAD}
    assert (report["rows_loaded"], report["rows_kept"]) == (len(rows), len(GOOD))
    assert all(s["detail"] for s in report["skipped"])


def test_data_check_strict_fails_on_first_bad_row(tmp_path):
    rows = [GOOD[0], GOOD[1], BAD["wrong_type"], BAD["missing_field"], GOOD[2]]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = write_config(tmp_path, dataset=str(data))
    message = assert_one_line_error(invoke("data-check", cfg, "strict=true"), f"{data} line 3", "wrong_type", "strict")
    assert "missing_field" not in message
    assert invoke("data-check", cfg).exit_code == 0  # the same data passes without strict


def test_skips_found_while_tokenising_name_their_row(tmp_path):
    """prompt_too_long is found after loading; its report and strict error must still locate the row."""
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD[0], GOOD[1], LONG_PROMPT, GOOD[2]])
    cfg = write_config(tmp_path, dataset=str(data), **SMALL_CUTOFF)
    located = re.compile(rf"{re.escape(str(data))} line 3\b|\brow(_index)? 2\b")

    result = invoke("data-check", cfg)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "output" / "dpo_metrics" / "skipped_rows.json").read_text(encoding="utf-8"))
    assert [(s["row_index"], s["reason"]) for s in report["skipped"]] == [(2, "prompt_too_long")]
    assert report["skipped"][0]["source"] == f"{data} line 3", "skip source should locate the row like other skips"

    message = assert_one_line_error(invoke("data-check", cfg, "strict=true"), "prompt_too_long")
    assert located.search(message), f"strict error does not name the row: {message}"


def test_data_check_all_rows_bad(tmp_path):
    """Nothing kept: data-check still prints each reason's first row, its field and the fix, then fails."""
    rows = [BAD["missing_field"], BAD["wrong_type"], BAD["empty_completion"], BAD["wrong_type"]]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = write_config(tmp_path, dataset=str(data))
    result = invoke("data-check", cfg)
    message = assert_one_line_error(result, "all 4 rows were skipped", "missing_field", "wrong_type",
                                    "empty_completion", "the table above")
    assert "data-check" not in message, "data-check must not send the user to data-check"
    table = {line.split(":")[0].strip(): line for line in result.stdout.splitlines() if line.startswith("  ")}
    assert table["wrong_type"].startswith("  wrong_type: 2, first ")
    expected = {"missing_field": (f"{data} line 1", "'rejected'", "add the field"),
                "wrong_type": (f"{data} line 2", "'rejected' is", "give the field the type"),
                "empty_completion": (f"{data} line 3", "'chosen' is empty", "fill in the completion")}
    for reason, fragments in expected.items():
        for fragment in fragments:
            assert fragment in table[reason], (reason, fragment, table[reason])
    assert "skipped_rows.json" in result.stdout


def test_train_with_every_row_bad_names_the_first_row_and_its_fix(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [BAD["empty_completion"], BAD["missing_field"]])
    cfg = write_config(tmp_path, dataset=str(data))
    assert_one_line_error(invoke("precompute", cfg), "all 2 rows were skipped", f"first: {data} line 1",
                          "empty_completion", "fix: drop the row or fill in the completion",
                          "dpo-lean data-check CONFIG.yaml")


# ---------------------------------------------------------------- cache-info


def test_cache_info_on_complete_fixture_cache():
    result = invoke("cache-info", FIXTURE_CACHE)
    assert result.exit_code == 0, result.output
    assert f"rows: {DEMO_ROWS} of {DEMO_ROWS}" in result.stdout
    assert "status: complete" in result.stdout
    assert "problem:" not in result.stdout
    assert "cutoff_len: 128" in result.stdout


def _copy_cache(tmp_path: Path) -> tuple[Path, list[Path]]:
    cache = tmp_path / "ref_cache"
    shutil.copytree(FIXTURE_CACHE, cache)
    parts = sorted(cache.glob("part-*.parquet"))
    assert len(parts) >= 2
    return cache, parts


def test_cache_info_truncated_part_is_named_unreadable(tmp_path):
    cache, parts = _copy_cache(tmp_path)
    damaged = parts[1]
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    result = invoke("cache-info", cache)
    assert result.exit_code == 1, result.output
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and f"{damaged.name}: unreadable" in problems[0], problems
    assert "status: complete" not in result.stdout
    assert re.search(r"^status: (DAMAGED|INCOMPLETE)$", result.stdout, re.M)


def test_cache_info_deleted_part_is_incomplete(tmp_path):
    cache, parts = _copy_cache(tmp_path)
    removed_rows = pq.read_metadata(parts[-1]).num_rows
    parts[-1].unlink()
    result = invoke("cache-info", cache)
    assert result.exit_code == 1, result.output
    assert f"rows: {DEMO_ROWS - removed_rows} of {DEMO_ROWS}" in result.stdout
    assert "INCOMPLETE" in result.stdout
    assert "status: complete" not in result.stdout


def test_cache_info_takes_a_config_like_every_other_command(tmp_path):
    config = write_config(tmp_path, ref_cache_dir=str(FIXTURE_CACHE))
    by_config, by_folder = invoke("cache-info", config), invoke("cache-info", FIXTURE_CACHE)
    assert by_config.exit_code == 0, by_config.output
    assert by_config.stdout == by_folder.stdout and f"cache: {FIXTURE_CACHE}" in by_config.stdout
    damaged, _ = _copy_cache(tmp_path)
    next(damaged.glob("part-*.parquet")).unlink()
    result = invoke("cache-info", config, f"ref_cache_dir={damaged}")
    assert result.exit_code == 1 and "INCOMPLETE" in result.stdout


def test_config_shows_each_value_and_its_origin_the_files_and_what_is_ready_without_tokenising(tmp_path, monkeypatch):
    import dpo_lean.data.pipeline as pipeline

    cache = tmp_path / "ref_cache"
    shutil.copytree(FIXTURE_CACHE, cache)
    cfg = write_config(tmp_path, ref_cache_dir=str(cache))

    def show(*overrides):
        with monkeypatch.context() as m:
            m.setattr(pipeline, "encode_batches", lambda *a, **k: pytest.fail("config tokenised the dataset"))
            result = invoke("config", cfg, *overrides)
        assert result.exit_code == 0, result.output
        return result.stdout

    out = show("learning_rate=1e-4")
    assert re.search(r"^  learning_rate +0\.0001 +override$", out, re.M)
    assert re.search(rf"^  model_name_or_path +{re.escape(str(FIXTURES / 'tiny-model'))} +YAML$", out, re.M)
    assert re.search(r"^  pref_beta +0\.1 +default$", out, re.M)
    assert f"  dataset demo_case: {FIXTURES / 'demo' / 'demo_case.json'}" in out
    assert f"  reference cache: {cache} (precompute)" in out
    assert "  prepared data: not made yet for these settings: the next command tokenises the dataset" in out
    assert "  reference cache: made for these settings (64 rows cached)" in out and "  train: from step 0" in out
    invoke("data-check", cfg)
    out = show()
    assert re.search(r"^  prepared data: ready, 64 of 64 rows kept \(.*\.arrow\)$", out, re.M)
    assert "  reference cache: matches these settings; 64 of the 64 distinct rows are cached" in out
    out = show("cutoff_len=96")
    assert ("not made yet for these settings: the next command tokenises the dataset (the prepared data there was "
            "made for other settings: cutoff_len: 128 -> 96)") in out
    assert f"  reference cache: cache {cache} does not match: cutoff_len: 128 -> 96;" in out


def test_keys_offers_the_near_key_for_a_typo():
    result = CliRunner().invoke(main, ["keys", "learning_rte"])
    assert result.stdout.strip() == ("learning_rte: not a key of dpo-lean or of LLaMA-Factory 0.9.5's train command; "
                                     "did you mean 'learning_rate'?")


def test_cache_info_missing_directory(tmp_path):
    assert_one_line_error(invoke("cache-info", tmp_path / "no_cache"), str(tmp_path / "no_cache"), "does not exist")
