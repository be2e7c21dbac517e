"""val_size's held-out rows: chosen by seed, a share or a count as in LLaMA-Factory, and every copy of a repeated pair
(same content id) on one side, so eval never scores a pair training saw."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from dpo_lean.data import prepared
from dpo_lean.data.tokenize import TokenizedRow
from dpo_lean.errors import DpoLeanError
from dpo_lean.scoring import duplicate_note, split_rows


def rows_with_ids(ids: list[str]) -> prepared.PreparedRows:
    rows = [TokenizedRow(i, row_id, [1, 2], [3], [4], False) for i, row_id in enumerate(ids)]
    return prepared.PreparedRows(pa.Table.from_batches([prepared.to_batch(rows)]))


# 40 rows: ids 0..24, ids 0..9 twice, ids 0..4 a third time (15 extra copies), shuffled into one order
IDS = [f"id{i}" for i in list(range(25)) + list(range(10)) + list(range(5))]
random.Random(7).shuffle(IDS)


@pytest.mark.parametrize("val_size", [0.25, 0.1, 10, 3])
def test_every_copy_of_a_pair_is_on_one_side(val_size):
    rows = rows_with_ids(IDS)
    wanted = int(val_size) if val_size >= 1 else round(val_size * len(IDS))
    for seed in range(30):
        train, held = split_rows(rows, val_size, seed)
        assert not set(train.ids) & set(held.ids), seed
        assert len(train) + len(held) == len(IDS)
        assert wanted <= len(held) < wanted + 3  # whole ids until the count: at most one id's extra copies past it
        again = split_rows(rows, val_size, seed)[1]
        assert list(again.column("row_index")) == list(held.column("row_index"))  # the same rows for the same seed


def test_without_duplicates_the_rows_held_out_are_a_seeded_draw_of_rows():
    """With no repeated ids: exactly the rows random.Random(seed).shuffle picks first (the split's meaning before)."""
    rows = rows_with_ids([f"id{i}" for i in range(40)])
    for seed in (0, 1, 42):
        order = list(range(40))
        random.Random(seed).shuffle(order)
        _, held = split_rows(rows, 0.2, seed)
        assert sorted(held.column("row_index")) == sorted(order[:8])


def test_a_split_of_copies_only_that_leaves_no_training_rows_is_refused():
    with pytest.raises(DpoLeanError) as err:
        split_rows(rows_with_ids(["a", "a", "a", "a"]), 1, seed=0)
    assert "leaves no training rows (4 rows kept, copies of 1 distinct pairs)" in str(err.value)


def test_the_duplicates_are_counted_where_they_touch_evaluation():
    rows = rows_with_ids(IDS)
    train, held = split_rows(rows, 0.25, 0)
    assert duplicate_note(rows, held, eval_dataset=False) == (
        "data: 15 rows repeat another row's content (same id); val_size holds each id's copies out together, or none "
        "of them")
    assert duplicate_note(rows, rows.subset([]), eval_dataset=False) is None  # no val_size: nothing to say
    eval_rows = rows_with_ids(["id1", "id2", "id2", "new"])
    assert duplicate_note(rows, eval_rows, eval_dataset=True).startswith(
        "eval_dataset: 2 of its distinct pairs are also training rows")
