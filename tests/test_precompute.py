"""Phase 1: the cache's values, its contract, resume after SIGKILL, shards, and fingerprint refusal."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from dpo_lean import cache, modeling
from dpo_lean.config import from_dict
from dpo_lean.data.collate import collate_pairs
from dpo_lean.data.pipeline import prepare_data
from dpo_lean.errors import DpoLeanError
from dpo_lean.logprobs import batch_logps
from dpo_lean.precompute import run_precompute

CONTRACT = ["row_index", "id", "ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tail_logps",
            "ref_rejected_tail_logps", "chosen_tokens", "rejected_tokens", "prompt_tokens"]


def cached(cache_dir) -> pd.DataFrame:
    state = cache.scan(cache_dir)
    assert not state.problems and state.complete
    return state.table.to_pandas().sort_values("row_index").reset_index(drop=True)


@pytest.fixture
def fresh(tiny_config, tmp_path):
    """Config whose cache starts empty, plus an uninterrupted run's cache to compare with."""
    def make(**overrides):
        return tiny_config(copy_cache=False, ref_cache_dir=str(tmp_path / "cache"), **overrides)
    return make


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from conftest import FIXTURES
    from make_fixtures import fixture_config
    raw = fixture_config(FIXTURES)
    raw["ref_cache_dir"] = str(tmp_path_factory.mktemp("uninterrupted") / "cache")
    raw["output_dir"] = str(tmp_path_factory.mktemp("out"))
    run_precompute(from_dict(raw))
    return cached(raw["ref_cache_dir"])


def test_cache_is_a_parquet_directory_with_the_contract_columns(fresh, tmp_path):
    run_precompute(fresh())
    df = pd.read_parquet(tmp_path / "cache")  # any Parquet reader reads the directory as it is
    assert list(df.columns) == CONTRACT and len(df) == 64 and df["row_index"].is_unique
    meta = pq.ParquetFile(next((tmp_path / "cache").glob("part-*.parquet"))).schema_arrow.metadata
    manifest = json.loads((tmp_path / "cache" / cache.MANIFEST).read_text())
    assert json.loads(meta[cache.META_FINGERPRINT]) == manifest["fingerprint"]
    assert manifest["expected_rows"] == 64 and manifest["runs"][-1]["rows"] == 64


def test_values_equal_naive_full_logits_per_row(tiny_config):
    """Each cached value equals log_softmax(full logits).gather summed over completion tokens, row by row."""
    config = tiny_config()
    df = cached(config.resolved_ref_cache_dir)
    model = modeling.load_base_model(config, reference=True)  # 4-bit, head not deferred: full logits
    rows = {r.row_index: r for r in prepare_data(config, modeling.load_tokenizer(config)).rows}
    worst = 0.0
    with modeling.inference(model):
        for rec in df.itertuples():
            r = rows[rec.row_index]
            for completion, value in ((r.chosen_ids, rec.ref_chosen_logps), (r.rejected_ids, rec.ref_rejected_logps)):
                ids = torch.tensor([r.prompt_ids + completion])
                logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, :-1]
                naive = logp.gather(1, ids[0, 1:, None]).squeeze(1)[len(r.prompt_ids) - 1:].sum().item()
                worst = max(worst, abs(naive - value))
            assert (rec.chosen_tokens, rec.rejected_tokens, rec.prompt_tokens) == (
                len(r.chosen_ids), len(r.rejected_ids), len(r.prompt_ids))
    assert worst < 1e-4


def test_cache_equals_the_training_forward_at_step_0(tiny_config):
    """Before any update the policy is the reference: training-mode 4-bit LoRA forward reproduces the cache."""
    config = tiny_config()
    df = cached(config.resolved_ref_cache_dir).set_index("row_index")
    rows = prepare_data(config, modeling.load_tokenizer(config)).rows
    policy = modeling.prepare_policy(config)
    policy.train()
    for i in range(0, len(rows), 5):  # other batch shapes than precompute used
        batch_rows = rows[i:i + 5]
        batch = collate_pairs([r.prompt_ids for r in batch_rows], [r.chosen_ids for r in batch_rows],
                              [r.rejected_ids for r in batch_rows], pad_id=0)
        logps = batch_logps(policy, batch).detach()
        want = torch.tensor([df.loc[r.row_index, "ref_chosen_logps"] for r in batch_rows]
                            + [df.loc[r.row_index, "ref_rejected_logps"] for r in batch_rows])
        assert (logps - want).abs().max().item() < 1e-3


def test_two_shards_equal_one_run(fresh, tmp_path, uninterrupted):
    first = run_precompute(fresh(num_shards=2, shard_index=0))
    assert not first["complete"]
    second = run_precompute(fresh(num_shards=2, shard_index=1))
    assert second["complete"] and first["rows"] + second["rows"] == 64
    pd.testing.assert_frame_equal(cached(tmp_path / "cache"), uninterrupted)


def test_shard_per_process_under_a_launcher(fresh, monkeypatch):
    from dpo_lean.precompute import shard_of

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert shard_of(fresh()) == (4, 2)


def test_rerun_of_a_complete_cache_computes_nothing(tiny_config):
    assert run_precompute(tiny_config())["rows"] == 0


def test_refuses_to_mix_into_a_cache_with_another_fingerprint(tiny_config):
    with pytest.raises(DpoLeanError) as err:
        run_precompute(tiny_config(cutoff_len=64))
    assert "cutoff_len: 128 -> 64" in str(err.value) and "overwrite_cache" in str(err.value)
    summary = run_precompute(tiny_config(cutoff_len=64, overwrite_cache=True))
    assert summary["complete"] and summary["rows"] == 64
    assert cache.read_manifest(tiny_config().resolved_ref_cache_dir)["fingerprint"]["cutoff_len"] == 64


def test_damaged_part_is_recomputed(tiny_config, uninterrupted):
    config = tiny_config()
    part = sorted(config.resolved_ref_cache_dir.glob("part-*.parquet"))[1]
    redone = pq.read_table(part).column("row_index").to_pylist()
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    summary = run_precompute(config)
    assert summary["rows"] == 16 and summary["complete"]
    repaired = cached(config.resolved_ref_cache_dir)
    is_redone = repaired["row_index"].isin(redone)
    # Recomputed rows: exactly this machine's uninterrupted run. Kept rows were computed on another CPU (the
    # committed fixture), so they agree with this machine's within kernel rounding only.
    pd.testing.assert_frame_equal(repaired[is_redone], uninterrupted[is_redone], check_exact=True)
    pd.testing.assert_frame_equal(repaired, uninterrupted, check_exact=False, atol=1e-4, rtol=0)


def test_committed_fixture_cache_is_complete_and_sound():
    from conftest import FIXTURES

    state = cache.scan(FIXTURES / "demo" / "ref_cache")
    assert state.complete and not state.problems and len(state.parts) == 4


def test_full_precision_reference_is_its_own_fingerprint(fresh):
    summary = run_precompute(fresh(ref_precision="fp32"))
    manifest = cache.read_manifest(fresh().resolved_ref_cache_dir)
    assert summary["complete"] and manifest["fingerprint"]["reference"] == {
        "precision": "fp32", "quantization": None, "dtype": "float32"}


def test_out_of_memory_batch_is_retried_at_half_size(tiny_config, monkeypatch):
    """A CUDA out-of-memory error on a batch splits it in halves; the values come out in the same order."""
    import dpo_lean.precompute as pre

    config = tiny_config()
    rows = prepare_data(config, modeling.load_tokenizer(config)).rows[:8]
    model = modeling.prepare_reference(config)
    whole = pre.score_batch(model, rows, 0, None, torch.device("cpu"), torch.float32)
    real, sizes = pre.batch_logps, []

    def small_batches_only(model, batch, chunk_size=None):
        sizes.append(batch["input_ids"].shape[0] // 2)
        if sizes[-1] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, batch, chunk_size)

    monkeypatch.setattr(pre, "batch_logps", small_batches_only)
    split = pre.score_batch(model, rows, 0, None, torch.device("cpu"), torch.float32)
    assert sizes == [8, 4, 2, 2, 4, 2, 2]
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-5)
