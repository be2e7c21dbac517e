"""Each completion's summed log-prob is exact to float64 rounding of its float32 per-token values (issue 27): within
1e-8 x |sum| + 1e-6 nats of a float64 full-logits forward summed in float64, on completions of 1,000+ tokens, for what
precompute caches (both layouts, the LD-DPO tail sums), train's policy scores and evaluate's; the cache holds the float64
sums precompute computed; the log-ratios reach the loss formed in float64.

The long rows are generated here (words of the tiny tokenizer's corpus, 1,000 to 2,400 tokens a completion) and scored
with the committed tiny model (4-bit, as the fixture config loads it); the expected values come from
tests/float64_reference.py: the same weights dequantised into a float64 copy, plain forwards, float64 sums. A float32
accumulator is off by 2e-7 to 7e-7 of such a sum here (up to 5e-3 nats), 17 to 60 times what this tolerance allows;
float64 accumulation of the per-token values uses at most a fifth of it.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FIXTURES
from float64_reference import float64_model
from make_fixtures import fixture_config

from dpo_lean import cache, modeling, precompute, scoring
from dpo_lean.config import from_dict
from dpo_lean.data.pipeline import prepare_data
from dpo_lean.logprobs import batch_scores, completion_scores
from dpo_lean.objective import pair_metrics
from dpo_lean.tiny import ENGLISH, WORDS

# (words of chosen, words of rejected) per row: about 1.35 tokens a word; each row has a tail of 1,000+ tokens
WORDS_PER_ROW = ((850, 1800), (1600, 800))
LOGP_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tail_logps", "ref_rejected_tail_logps")


def within(value: float, exact: float) -> bool:
    return abs(value - exact) <= 1e-8 * abs(exact) + 1e-6


def assert_within(values: list[float], exact: list[float], what: str) -> None:
    bad = [(i, v, e) for i, (v, e) in enumerate(zip(values, exact)) if not within(v, e)]
    assert not bad, f"{what}: (index, value, float64) beyond 1e-8 |sum| + 1e-6 nats: {bad}"


def long_rows() -> list[dict]:
    rng = random.Random(27)
    pool = list(WORDS) + ENGLISH.split()
    text = lambda k: " ".join(rng.choice(pool) for _ in range(k))  # noqa: E731
    return [{"conversations": [{"from": "human", "value": f"Write {c} words."}],
             "chosen": {"from": "gpt", "value": text(c)}, "rejected": {"from": "gpt", "value": text(r)}}
            for c, r in WORDS_PER_ROW]


def float64_token_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p of each completion token, float64, from one full-logits forward of ``model`` (a float64 copy)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return logp.gather(1, ids[0, 1:, None])[len(prompt) - 1:, 0]


class Exact:
    """Per completion (chosen of each row, then rejected of each row): the float64 sum and the sum past the pair's
    shorter completion."""

    def __init__(self, model, rows):
        tokens = ([float64_token_logps(model, r.prompt_ids, r.chosen_ids) for r in rows]
                  + [float64_token_logps(model, r.prompt_ids, r.rejected_ids) for r in rows])
        shorter = [min(len(r.chosen_ids), len(r.rejected_ids)) for r in rows] * 2
        self.sums = [float(t.sum()) for t in tokens]
        self.tails = [float(t[k:].sum()) for t, k in zip(tokens, shorter)]


@pytest.fixture(scope="module")
def long_setup(tmp_path_factory):
    """The config of each layout (its own cache), the prepared long rows, the float64 reference's sums, and what
    precompute's scorer returned for every row in each layout (recorded as it ran)."""
    tmp = tmp_path_factory.mktemp("long")
    (tmp / "long.json").write_text(json.dumps(long_rows()))
    raw = {**fixture_config(FIXTURES), "dataset": str(tmp / "long.json"), "cutoff_len": 3000,
           "output_dir": str(tmp / "out"), "precompute_ref_batch_size": 2, "lora_rank": 4}
    config = from_dict(raw)
    rows = sorted(prepare_data(config, modeling.load_tokenizer(config)).rows, key=lambda r: r.row_index)
    assert not any(r.truncated for r in rows)
    assert min(min(len(r.chosen_ids), len(r.rejected_ids)) for r in rows) >= 1000
    assert min(abs(len(r.chosen_ids) - len(r.rejected_ids)) for r in rows) >= 1000  # tails of 1,000+ tokens
    configs, computed = {}, {}
    scorer = precompute.BatchScorer.__call__

    def recording(self, batch_rows):
        logps = scorer(self, batch_rows)
        n = len(batch_rows)
        for i, r in enumerate(batch_rows):
            computed[layout][r.id] = (logps[i, 0].item(), logps[n + i, 0].item(), logps[i, 1].item(),
                                      logps[n + i, 1].item())
        return logps

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precompute.BatchScorer, "__call__", recording)
        for layout, sharing in (("two sequences", False), ("shared", True)):
            computed[layout] = {}
            configs[layout] = from_dict({**raw, "prefix_sharing": sharing, "ref_cache_dir": str(tmp / f"cache-{sharing}")})
            precompute.run_precompute(configs[layout])
    exact = Exact(float64_model(modeling.load_base_model(config), config.model_name_or_path), rows)
    return configs, rows, exact, computed


def cached_columns(config, rows) -> dict[str, list[float]]:
    table = {r["id"]: r for r in cache.scan(config.resolved_ref_cache_dir).table.to_pylist()}
    return {c: [table[r.id][c] for r in rows] for c in LOGP_COLUMNS}


@pytest.mark.parametrize("layout", ["two sequences", "shared"])
def test_precompute_caches_every_sum_and_tail_sum_exact_to_float64(long_setup, layout):
    configs, rows, exact, _ = long_setup
    cached = cached_columns(configs[layout], rows)
    assert_within(cached["ref_chosen_logps"] + cached["ref_rejected_logps"], exact.sums, f"{layout}: sums")
    assert_within(cached["ref_chosen_tail_logps"] + cached["ref_rejected_tail_logps"], exact.tails,
                  f"{layout}: tail sums")
    assert min(abs(s) for s in exact.sums) > 5000  # sums where float32 accumulation is off by ~1e-3 nats


@pytest.mark.parametrize("layout", ["two sequences", "shared"])
def test_the_cache_holds_the_float64_sums_precompute_computed(long_setup, layout):
    configs, rows, _, computed = long_setup
    for part in configs[layout].resolved_ref_cache_dir.glob("part-*.parquet"):  # as any Parquet reader sees them
        schema = pq.read_schema(part)
        assert all(schema.field(c).type == "double" for c in LOGP_COLUMNS), schema
    cached = cached_columns(configs[layout], rows)
    for k, r in enumerate(rows):
        assert tuple(cached[c][k] for c in LOGP_COLUMNS) == computed[layout][r.id]  # to the bit
    values = np.array([cached[c] for c in LOGP_COLUMNS[:2]]).ravel()
    assert (values.astype(np.float32).astype(np.float64) != values).all()  # none was rounded to float32


@pytest.fixture(scope="module")
def trained_policy(long_setup, tmp_path_factory):
    """A policy as train builds it, with random LoRA weights (so it is not the reference), saved as an adapter; and
    the float64 values of that adapter merged into the float64 copy."""
    config, rows = long_setup[0]["two sequences"], long_setup[1]
    policy = modeling.prepare_policy(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    adapter = tmp_path_factory.mktemp("adapter")
    policy.save_pretrained(adapter)
    plain = float64_model(modeling.load_base_model(config), config.model_name_or_path, adapter=str(adapter))
    return policy, adapter, Exact(plain, rows)


def test_train_scores_the_policy_exact_to_float64(long_setup, trained_policy):
    """train's step: its collator and batch_scores on the trainable policy, gradients on."""
    configs, _, reference, _ = long_setup
    config = configs["two sequences"]
    policy, _, exact = trained_policy
    _, data, _, ref = scoring.prepare_run(config)  # the cache, verified and joined as train joins it
    dataset = scoring.to_dataset(data.rows, ref)
    batch = scoring.PairCollator(0, tails=True)([dataset[i] for i in range(len(dataset))])
    policy.train()
    scores = batch_scores(policy, batch, config.logprob_chunk_size)
    assert scores["logps"].requires_grad and scores["logps"].dtype == torch.float64
    assert_within(scores["logps"].tolist(), exact.sums, "policy sums")
    assert_within(scores["tail_logps"].tolist(), exact.tails, "policy tail sums")
    assert max(abs(a - b) for a, b in zip(exact.sums, reference.sums)) > 1  # the policy is not the reference


def test_evaluate_scores_exact_to_float64(long_setup, trained_policy):
    """evaluate's own scoring of the saved adapter: the mean summed log-probs, and the rewards beta (pi - ref) whose
    log-ratios (pi - ref, sums of -10,000 nats that differ by a few) are formed in float64."""
    from dpo_lean.evaluate import load_policy, score

    configs, rows, ref_exact, _ = long_setup
    config = configs["shared"]
    _, adapter, exact = trained_policy
    _, data, _, ref = scoring.prepare_run(config)
    metrics = score(config, load_policy(config, str(adapter)), scoring.EvalSet(data.rows, ref, "long rows"), 0)
    n, beta = len(rows), config.pref_beta
    for k, side in enumerate(("chosen", "rejected")):
        policy, reference = exact.sums[k * n:(k + 1) * n], ref_exact.sums[k * n:(k + 1) * n]
        assert within(metrics[f"eval_logps/{side}"], sum(policy) / n), side
        reward = beta * sum(p - r for p, r in zip(policy, reference)) / n
        allowed = beta * (2e-8 * max(abs(x) for x in policy + reference) + 2e-6)
        assert abs(metrics[f"eval_rewards/{side}"] - reward) <= allowed, (side, metrics[f"eval_rewards/{side}"], reward)


# ---------------------------------------------------------------- the sums' dtype and gradient; the loss's inputs


def test_sums_are_float64_and_the_gradient_reaching_the_token_values_is_float32():
    """3,000 float32 values near -8 in two completions: the sums equal math.fsum to float64 rounding (a float32
    accumulator is off by ~1e-3), and d sum / d value = the upstream weight of the value's completion, in float32."""
    generator = torch.Generator().manual_seed(1)
    values = (-8 - torch.rand(3000, generator=generator)).requires_grad_()
    segment = torch.cat([torch.zeros(1200, dtype=torch.long), torch.ones(1800, dtype=torch.long)])
    sums = completion_scores(values, {"score_segment": segment, "num_pairs": 1})["logps"]
    assert sums.dtype == torch.float64
    for s, part in zip(sums.tolist(), (values[:1200], values[1200:])):
        exact = math.fsum(part.tolist())
        assert abs(s - exact) <= 1e-12 * abs(exact)
    (sums * torch.tensor([0.25, -3.0], dtype=torch.float64)).sum().backward()
    assert values.grad.dtype == torch.float32
    assert torch.equal(values.grad, torch.where(segment == 0, 0.25, -3.0).float())


def test_the_log_ratios_reach_the_loss_formed_in_float64():
    """Cached and policy sums that differ in their fourth decimal (below float32's resolution at 20,000 nats): the
    collated reference columns keep them, and the sigmoid loss, rewards and margins equal the formula in float64."""
    ref_w, ref_l, pi_w, pi_l = -20000.0004321, -19990.9876543, -20000.1234567, -19990.4567891
    row = {"row_index": 0, "prompt_ids": [1, 2], "chosen_ids": [3] * 4, "rejected_ids": [4] * 5, "length": 7,
           "ref_chosen_logps": ref_w, "ref_rejected_logps": ref_l, "ref_chosen_tail_logps": 0.0,
           "ref_rejected_tail_logps": -1.0}
    batch = scoring.PairCollator(0)([row])
    assert batch["ref_chosen_logps"].item() == ref_w and batch["ref_rejected_logps"].item() == ref_l
    scores = {"logps": torch.tensor([pi_w, pi_l], dtype=torch.float64)}
    config = from_dict({"pref_loss": "sigmoid", "pref_beta": 0.1})
    losses, stats = pair_metrics(config, scores, batch)
    margin = 0.1 * ((pi_w - ref_w) - (pi_l - ref_l))
    assert losses.item() == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-6)
    assert stats["rewards/chosen"].item() == pytest.approx(0.1 * (pi_w - ref_w), rel=1e-12)
    assert stats["rewards/margins"].item() == pytest.approx(margin, rel=1e-12)
