"""Rows are cached by content id: a grown dataset computes only its new rows, a shrunk one uses what is there,
and train checks each cached row against the token ids it has now."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from conftest import FIXTURES

from dpo_lean import cache, scoring
from dpo_lean.errors import DpoLeanError
from dpo_lean.precompute import run_precompute

VALUES = ["id", "ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tail_logps", "ref_rejected_tail_logps",
          "chosen_tokens", "rejected_tokens", "prompt_tokens", "ids_sha256"]
LEFT_OUT = [3, 20, 41, 63]  # rows of the 64-row demo data missing from the smaller dataset


def _dataset(tmp_path, name: str, keep) -> str:
    """A copy of the demo dataset folder holding only the rows ``keep`` says."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(FIXTURES / "demo" / "dataset_info.json", folder)
    rows = json.loads((FIXTURES / "demo" / "demo_case.json").read_text())
    (folder / "demo_case.json").write_text(json.dumps([r for i, r in enumerate(rows) if keep(i)]))
    return str(folder)


def _by_id(cache_dir) -> pd.DataFrame:
    state = cache.scan(cache_dir)
    assert not state.problems
    return state.table.to_pandas()[VALUES].sort_values("id").reset_index(drop=True)


@pytest.fixture
def smaller(tiny_config, tmp_path):
    """A cache precomputed on the demo data without LEFT_OUT rows, and the config of the whole demo data on it."""
    cache_dir = str(tmp_path / "cache")
    run_precompute(tiny_config(copy_cache=False, ref_cache_dir=cache_dir,
                               dataset_dir=_dataset(tmp_path, "smaller", lambda i: i not in LEFT_OUT)))
    return tiny_config(copy_cache=False, ref_cache_dir=cache_dir, dataset_dir=_dataset(tmp_path, "all", lambda i: True))


def test_added_rows_are_computed_alone_and_give_a_from_scratch_runs_values(smaller, tiny_config, tmp_path):
    """Before: the dataset's content hash was compared, so one added row refused (or with overwrite_cache,
    recomputed) the whole cache."""
    before = _by_id(smaller.resolved_ref_cache_dir)
    summary = run_precompute(smaller)
    assert summary["rows"] == len(LEFT_OUT) and summary["complete"]
    grown = _by_id(smaller.resolved_ref_cache_dir)
    assert before.merge(grown, how="left", indicator=True)["_merge"].eq("both").all()  # kept as they were
    scratch_dir = tmp_path / "scratch"
    run_precompute(tiny_config(copy_cache=False, ref_cache_dir=str(scratch_dir), dataset_dir=smaller.dataset_dir))
    pd.testing.assert_frame_equal(grown, _by_id(scratch_dir), check_exact=True)  # this machine: exact
    assert len(scoring.prepare_run(smaller)[3]) == 64


def test_train_names_the_rows_that_are_not_in_the_cache(smaller):
    with pytest.raises(DpoLeanError) as err:
        scoring.prepare_run(smaller)
    message = str(err.value)
    assert message.startswith(f"{len(LEFT_OUT)} of 64 training rows are not in the cache ")
    assert f"(first: row {LEFT_OUT[0]})" in message and "run `dpo-lean precompute CONFIG.yaml`" in message
    assert "\n" not in message


def test_rows_removed_from_the_dataset_are_left_unused(tiny_config, tmp_path):
    """The committed 64-row cache serves a dataset of 40 of its rows (before: refused, dataset.content_sha256)."""
    config = tiny_config(dataset_dir=_dataset(tmp_path, "fewer", lambda i: i % 8 < 5))
    ref = scoring.prepare_run(config)[3]
    fixture = _by_id(FIXTURES / "demo" / "ref_cache").set_index("id")
    assert len(ref) == 40
    for row_id, values in ref.items():
        assert values == tuple(fixture.loc[row_id, scoring.REF_COLUMNS]), row_id
    assert run_precompute(config)["rows"] == 0  # nothing to compute either; the 24 other rows stay
    assert len(cache.scan(config.resolved_ref_cache_dir).table) == 64


def test_a_row_cached_from_other_token_ids_is_refused_by_train_and_recomputed_by_precompute(tiny_config, monkeypatch):
    """Before: train compared token counts only, so a row tokenised differently at the same length passed."""
    from dpo_lean.data.prepared import PreparedRows

    config = tiny_config()
    real = PreparedRows.take

    def retokenised(self, positions):  # as a tokenizer change the fingerprint cannot see would do
        rows = real(self, positions)
        for row in rows:
            if row.row_index == 5:
                row.chosen_ids[-1] = (row.chosen_ids[-1] + 1) % 100  # one token id, same counts
        return rows

    monkeypatch.setattr(PreparedRows, "take", retokenised)  # every row train and precompute read
    with pytest.raises(DpoLeanError) as err:
        scoring.prepare_run(config)
    message = str(err.value)
    assert "row 5 " in message and "other token ids" in message and "dpo-lean precompute" in message
    assert "\n" not in message
    summary = run_precompute(config)  # removes the part holding it and recomputes that part's rows
    assert summary["complete"] and summary["rows"] == 16
    assert len(scoring.prepare_run(config)[3]) == 64


def test_rows_of_the_same_content_are_cached_once_and_serve_every_copy(tiny_config, tmp_path):
    folder = tmp_path / "repeats"
    folder.mkdir()
    shutil.copy(FIXTURES / "demo" / "dataset_info.json", folder)
    rows = json.loads((FIXTURES / "demo" / "demo_case.json").read_text())
    (folder / "demo_case.json").write_text(json.dumps(rows + rows[:3]))  # 67 rows, 3 of them repeats
    config = tiny_config(copy_cache=False, ref_cache_dir=str(tmp_path / "cache"), dataset_dir=str(folder))
    summary = run_precompute(config)
    assert summary["rows"] == 64 and summary["complete"]
    _, data, _, ref = scoring.prepare_run(config)
    assert len(data.rows) == 67 and len(ref) == 64 and all(r.id in ref for r in data.rows)
