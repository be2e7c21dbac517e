"""Phase 1: the cache's values, its contract, resume after SIGKILL, shards, and fingerprint refusal."""

from __future__ import annotations

import json
import weakref

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from dpo_lean import cache, modeling
from dpo_lean.config import from_dict
from dpo_lean.data.pipeline import prepare_data
from dpo_lean.errors import DpoLeanError
from dpo_lean.layout import collate_pairs
from dpo_lean.logprobs import batch_logps
from dpo_lean.precompute import run_precompute

CONTRACT = ["row_index", "id", "ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tail_logps",
            "ref_rejected_tail_logps", "chosen_tokens", "rejected_tokens", "prompt_tokens", "ids_sha256"]


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


def test_refuses_to_mix_into_a_cache_with_another_fingerprint(tiny_config, monkeypatch):
    import dpo_lean.data.pipeline as pipeline

    def tokenising(*args, **kwargs):
        raise AssertionError("the dataset was tokenised before the cache was refused")

    with monkeypatch.context() as m, pytest.raises(DpoLeanError) as err:
        m.setattr(pipeline, "encode_batches", tokenising)
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


def cuda_oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")


class FakeOutOfMemory:
    """A CUDA out-of-memory error raised after the forward has allocated its activations (as a real one is):
    a forward hook on the last decoder layer keeps a weak reference to that layer's output, then raises
    ``error()`` when more than ``fits`` pairs are in the batch (the first ``times`` such batches; None: all).
    ``sizes`` records the pairs of every forward; ``alive`` the failed attempts' activations that were still in
    memory when the next forward started."""

    def __init__(self, model, fits: int, error=cuda_oom, times: int | None = None):
        self.fits, self.sizes, self.alive, self.failed = fits, [], [], []
        self.error, self.times = error, times
        self.hooks = [model.model.layers[-1].register_forward_hook(self.after_layer),
                      model.register_forward_pre_hook(self.before_forward)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()

    def before_forward(self, module, args):
        self.alive.append(sum(ref() is not None for ref in self.failed))

    def after_layer(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        pairs = hidden.shape[0] // 2
        self.sizes.append(pairs)
        if pairs > self.fits and (self.times is None or len(self.failed) < self.times):
            self.failed.append(weakref.ref(hidden))
            raise self.error()


def test_out_of_memory_retries_at_half_size_after_freeing_and_later_batches_keep_that_size(tiny_config):
    """An out-of-memory batch is retried in halves once the failed forward's activations are freed (not from
    inside the except block, whose traceback pins them); the size that worked is kept for the next batches."""
    import dpo_lean.precompute as pre

    config = tiny_config()
    rows = prepare_data(config, modeling.load_tokenizer(config)).rows[:16]
    model = modeling.prepare_reference(config)
    direct = pre.BatchScorer(model, 0, None, torch.device("cpu"), torch.float32)
    whole = [direct(rows[:8]), direct(rows[8:])]
    oom = FakeOutOfMemory(model, fits=2)
    scorer = pre.BatchScorer(model, 0, None, torch.device("cpu"), torch.float32)
    split = [scorer(rows[:8]), scorer(rows[8:])]
    assert oom.sizes == [8, 4, 2, 2, 2, 2] + [2, 2, 2, 2]  # the second batch starts at the size that worked
    assert scorer.max_rows == 2 and len(oom.failed) == 2
    assert oom.alive == [0] * len(oom.sizes)  # every failed attempt's activations were gone before the next try
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # same values, same order: [chosen..., rejected...]


def test_out_of_memory_on_a_single_pair_is_a_one_line_error(tiny_config):
    import dpo_lean.precompute as pre

    config = tiny_config()
    rows = prepare_data(config, modeling.load_tokenizer(config)).rows[:2]
    model = modeling.prepare_reference(config)
    FakeOutOfMemory(model, fits=0)
    with pytest.raises(DpoLeanError) as err:
        pre.BatchScorer(model, 0, None, torch.device("cpu"), torch.float32)(rows)
    assert "out of memory" in str(err.value) and f"row {rows[0].row_index}" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def scorer_setup(tmp_path_factory):
    """The fixture rows (longest first, as precompute runs them), the reference, and each batch of 8 scored whole."""
    from conftest import FIXTURES
    from make_fixtures import fixture_config

    import dpo_lean.precompute as pre

    config = from_dict({**fixture_config(FIXTURES), "output_dir": str(tmp_path_factory.mktemp("out"))})
    rows = prepare_data(config, modeling.load_tokenizer(config)).rows
    rows = rows.take([int(i) for part in pre.plan_parts(rows, 8, 64) for batch in part for i in batch][:32])
    model = modeling.prepare_reference(config)
    direct = pre.BatchScorer(model, 0, None, torch.device("cpu"), torch.float32)
    batches = [rows[i:i + 8] for i in range(0, 32, 8)]
    return model, batches, [direct(b) for b in batches]


def score_all(model, batches, **kwargs):
    import dpo_lean.precompute as pre

    scorer = pre.BatchScorer(model, 0, None, torch.device("cpu"), torch.float32, **kwargs)
    return scorer, [scorer(b) for b in batches]


def assert_same(got, want):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # same values, same order: [chosen..., rejected...]


@pytest.mark.parametrize("message", [
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "HIP out of memory. Tried to allocate 2.00 GiB",
    "[enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes",
])
def test_out_of_memory_shaped_runtime_errors_halve_the_batch(scorer_setup, message):
    """cuBLAS failing to allocate its workspace arrives as a plain RuntimeError, and so do other backends' out of
    memory: each halves the batch like CUDA's OutOfMemoryError."""
    model, batches, whole = scorer_setup
    with FakeOutOfMemory(model, fits=4, error=lambda: RuntimeError(message), times=1) as oom:
        scorer, split = score_all(model, batches[:1])
    assert oom.sizes == [8, 4, 4] and scorer.max_rows == 4
    assert_same(split, whole[:1])


def test_other_runtime_errors_are_not_taken_for_out_of_memory(scorer_setup):
    model, batches, _ = scorer_setup
    error = lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied")  # noqa: E731
    with FakeOutOfMemory(model, fits=4, error=error) as oom, pytest.raises(RuntimeError, match="cannot be multiplied"):
        score_all(model, batches[:1])
    assert oom.sizes == [8]


def test_out_of_memory_while_moving_the_batch_to_the_device_halves_it(scorer_setup, monkeypatch):
    """The batch (a shared-layout mask is [B, 1, T, T]) can run the device out of memory as it is moved there."""
    model, batches, whole = scorer_setup
    real, moved = modeling.batch_to, []

    def batch_to(batch, dev):
        moved.append(batch["input_ids"].shape[0] // 2)
        if moved[-1] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return real(batch, dev)

    monkeypatch.setattr(modeling, "batch_to", batch_to)
    scorer, split = score_all(model, batches[:1])
    assert moved == [8, 4, 2, 2, 2, 2] and scorer.max_rows == 2
    assert_same(split, whole[:1])


def test_the_batch_grows_back_after_clean_batches(scorer_setup, capsys):
    """One early out-of-memory halves the batch; after grow_after clean pieces the full size is tried again."""
    model, batches, whole = scorer_setup
    with FakeOutOfMemory(model, fits=4, times=1) as oom:
        scorer, split = score_all(model, batches[:2], grow_after=2)
    assert oom.sizes == [8, 4, 4, 8] and scorer.max_rows == 8
    assert capsys.readouterr().err.splitlines() == [
        "precompute: out of memory at 8 pairs a batch; continuing at 4",
        "precompute: 2 clean batches at 4 pairs a batch; trying 8 again"]
    assert_same(split, whole[:2])


def test_a_grown_size_that_runs_out_again_halves_and_waits_twice_as_long(scorer_setup, capsys):
    model, batches, whole = scorer_setup
    with FakeOutOfMemory(model, fits=4) as oom:
        scorer, split = score_all(model, batches, grow_after=2)
    assert oom.sizes == [8, 4, 4] + [8, 4, 4] + [4, 4] + [8, 4, 4]
    halved = "precompute: out of memory at 8 pairs a batch; continuing at 4"
    assert capsys.readouterr().err.splitlines() == [
        halved, "precompute: 2 clean batches at 4 pairs a batch; trying 8 again",
        halved, "precompute: 4 clean batches at 4 pairs a batch; trying 8 again", halved]
    assert scorer.grow_after == 8 and scorer.max_rows == 4
    assert_same(split, whole)


def test_precompute_after_an_early_out_of_memory_grows_back_and_caches_the_same_values(fresh, uninterrupted,
                                                                                       monkeypatch, capsys):
    """The first (longest) batch of 4 runs out of memory once: 16 clean batches of 2 later it is back at 4, and
    the cache equals an uninterrupted run's."""
    import dpo_lean.precompute as pre

    real, fakes = modeling.prepare_reference, []

    def prepare_reference(config):
        model = real(config)
        fakes.append(FakeOutOfMemory(model, fits=2, times=1))
        return model

    monkeypatch.setattr(pre.modeling, "prepare_reference", prepare_reference)
    run_precompute(fresh(precompute_ref_batch_size=4, prefix_sharing=False))  # two sequences a pair: the fake counts
    err = capsys.readouterr().err
    assert "precompute: out of memory at 4 pairs a batch; continuing at 2" in err
    assert "precompute: 16 clean batches at 2 pairs a batch; trying 4 again" in err
    assert fakes[0].sizes == [4] + [2] * 16 + [4] * 8
    df = cached(fresh().resolved_ref_cache_dir)
    pd.testing.assert_frame_equal(df.drop(columns=LOGPS), uninterrupted.drop(columns=LOGPS))
    for column in LOGPS:
        assert (df[column] - uninterrupted[column]).abs().max() < 1e-5, column


LOGPS = ["ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tail_logps", "ref_rejected_tail_logps"]


@pytest.mark.cuda
def test_cuda_out_of_memory_retry_starts_with_the_failed_attempts_memory_released(tiny_config):
    """On a GPU: 256 MB allocated by a forward that then runs out of memory are free when the half-size retry starts."""
    import dpo_lean.precompute as pre

    config = tiny_config()
    rows = prepare_data(config, modeling.load_tokenizer(config)).rows[:8]
    model = modeling.prepare_reference(config)
    dev = modeling.device()
    start, at_forward = torch.cuda.memory_allocated(dev), []

    def before(module, args):
        at_forward.append(torch.cuda.memory_allocated(dev) - start)

    def after(module, args, output):
        ballast = torch.empty(2**28, dtype=torch.uint8, device=dev)  # noqa: F841 (pinned only by this frame)
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[0] // 2 > 2:  # more than 2 pairs
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    model.register_forward_pre_hook(before)
    model.model.layers[-1].register_forward_hook(after)
    scorer = pre.BatchScorer(model, 0, None, dev, modeling.compute_dtype(config, dev))
    scorer(rows)
    assert scorer.max_rows == 2 and len(at_forward) == 6  # 8 pairs fail, 4 fail, then 4 x 2
    assert max(at_forward) < 2**27, at_forward  # no 256 MB ballast of a failed attempt left when a retry starts


@pytest.mark.cuda
def test_cuda_real_out_of_memory_halves_the_batch_and_gives_the_same_values(tiny_config):
    """On a GPU: under a memory cap of 3/4 of what 256 pairs take (measured here, then set with
    torch.cuda.set_per_process_memory_fraction), a real CUDA out-of-memory error halves the batch; the values
    equal an uncapped run's, and the next batch starts at the size that worked."""
    import dpo_lean.precompute as pre

    config = tiny_config()
    rows = prepare_data(config, modeling.load_tokenizer(config)).rows[:64] * 4  # 256 pairs: well above the granularity
    model = modeling.prepare_reference(config)
    dev = modeling.device()
    dtype = modeling.compute_dtype(config, dev)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    whole = pre.BatchScorer(model, 0, None, dev, dtype)(rows)
    need = torch.cuda.max_memory_allocated(dev) - base  # what 256 pairs take on top of the model
    torch.cuda.empty_cache()
    cap = base + int(0.75 * need) + 2**20
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(dev).total_memory, dev)
    try:
        scorer = pre.BatchScorer(model, 0, None, dev, dtype)
        capped = scorer(rows)
        halved_to = scorer.max_rows
        again = scorer(rows)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
    assert halved_to is not None and halved_to <= 128, (need, cap)
    assert scorer.max_rows == halved_to  # the next batch started at the size that worked
    torch.testing.assert_close(capped, whole, rtol=0, atol=1e-3)
    torch.testing.assert_close(again, capped, rtol=0, atol=1e-5)
