"""The chunked log-prob path equals the naive full-logits computation, in value and in gradient."""

from __future__ import annotations

import pytest
import torch

from dpo_lean import modeling
from dpo_lean.data.collate import collate, collate_pairs, collate_shared
from dpo_lean.logprobs import batch_logps, batch_scores, gather_logps, log_sum_sq_probs, token_logps


def naive_token_logps(hidden, weight, targets, bias=None):
    logits = hidden @ weight.t() + (0 if bias is None else bias)
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_token_logps_match_naive_in_value_and_gradient(chunk_size, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, requires_grad=True)
    weight = torch.randn(300, 16, generator=g, requires_grad=True)
    bias = torch.randn(300, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 300, (50,), generator=g)
    upstream = torch.randn(50, generator=g)

    ours = token_logps(hidden, weight, targets, bias, chunk_size)
    grads = torch.autograd.grad((ours * upstream).sum(), [hidden, weight] + ([bias] if with_bias else []))
    ref = naive_token_logps(hidden, weight, targets, bias)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [hidden, weight] + ([bias] if with_bias else []))

    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_head_gets_no_gradient_buffer_and_exact_hidden_gradient():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(8, 4, generator=g, requires_grad=True)
    weight = torch.randn(20, 4, generator=g)  # frozen, as the output head is in LoRA training
    targets, upstream = torch.randint(0, 20, (8,), generator=g), torch.randn(8, generator=g)
    (token_logps(hidden, weight, targets, chunk_size=3) * upstream).sum().backward()
    (expected,) = torch.autograd.grad((naive_token_logps(hidden, weight, targets) * upstream).sum(), [hidden])
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-6)


def test_gather_logps_sums_the_scored_tokens_only():
    # Hand-checkable: vocab 3, hidden = one-hot-ish so logits are known.
    weight = torch.eye(3)
    hidden = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [0, 2.0, 0], [0, 0, 0]]])  # [1, 4, 3]
    # sequence [2, 0, 1, 2], tokens 2 and 3 the completion: token 2 (id 1) is predicted by position 1,
    # logits [1, 0, 0]; token 3 (id 2) by position 2, logits [0, 2, 0]
    e = torch.e
    expected = (torch.log(torch.tensor(1 / (e + 2))) + torch.log(torch.tensor(1 / (2 + e**2))))
    out = gather_logps(hidden, weight, score_index=torch.tensor([1, 2]), score_targets=torch.tensor([1, 2]),
                       score_segment=torch.tensor([0, 0]), num_segments=1)
    torch.testing.assert_close(out, expected.reshape(1), rtol=0, atol=1e-6)


def test_model_logps_equal_naive_full_logits(tiny_config):
    """On the tiny model (4-bit, CPU), batch_logps equals log_softmax(full logits).gather(...) summed."""
    config = tiny_config(copy_cache=False)
    model = modeling.load_base_model(config, reference=True)
    head = model.get_output_embeddings()
    batch = collate_pairs([[1, 50, 60, 70], [1, 80]], [[90, 100, 110], [120, 130, 140, 150, 2]],
                          [[200, 210], [220, 2]], pad_id=0)
    with modeling.inference(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
        naive = (logp * batch["completion_mask"][:, 1:]).sum(1)
        modeling.defer_output_head(model)
        assert model.get_output_embeddings().head is head
        ours = batch_logps(model, batch, chunk_size=3)
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-4)


def test_policy_gradients_equal_naive_path(tiny_config):
    """LoRA gradients through the chunked path equal those through full logits."""
    config = tiny_config(copy_cache=False, lora_rank=4)
    policy = modeling.prepare_policy(config)
    policy.train()
    batch = collate_pairs([[1, 50, 60]], [[90, 100, 2]], [[200, 2]], pad_id=0)
    lora = [p for p in policy.parameters() if p.requires_grad]
    torch.manual_seed(0)
    for p in lora:  # move B off zero so gradients reach A too
        p.data.normal_(0, 0.02)
    ours = batch_logps(policy, batch, chunk_size=2).sum()
    g_ours = torch.autograd.grad(ours, lora)

    head = policy.get_output_embeddings().head
    hidden = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = head(hidden).float()
    logp = torch.log_softmax(logits, -1)[:, :-1].gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
    naive = (logp * batch["completion_mask"][:, 1:]).sum()
    g_naive = torch.autograd.grad(naive, lora)
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-4)
    for a, b in zip(g_ours, g_naive):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_log_sum_sq_probs_match_the_full_softmax(chunk_size):
    g = torch.Generator().manual_seed(3)
    hidden, weight, bias = torch.randn(30, 8, generator=g), torch.randn(200, 8, generator=g), torch.randn(200, generator=g)
    expected = torch.log((torch.softmax(hidden.double() @ weight.double().t() + bias.double(), -1) ** 2).sum(-1))
    ours = log_sum_sq_probs(hidden.requires_grad_(True), weight, bias, chunk_size)
    assert not ours.requires_grad  # WPO's weights carry no gradient
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-5)


PAIRS = ([[1, 50, 60, 70], [1, 80]], [[90, 100, 110], [120, 130, 140, 150, 2]], [[200, 210, 220, 230, 240], [220, 2]])


@pytest.mark.parametrize("layout", ["pairs", "shared"])
def test_tail_and_wpo_scores_equal_naive_full_logits(tiny_config, layout):
    """LD-DPO's tail sums (tokens past the pair's shorter completion) and WPO's mean aligned log-probs, from the
    chunked path in either layout, equal a naive computation on the full logits of two sequences per pair."""
    config = tiny_config(copy_cache=False)
    model = modeling.load_base_model(config, reference=True)
    two = collate_pairs(*PAIRS, pad_id=0)
    with modeling.inference(model):
        logits = model(input_ids=two["input_ids"], attention_mask=two["attention_mask"]).logits.double()
        modeling.defer_output_head(model)
        batch = collate(*PAIRS, pad_id=0, tails=True) if layout == "pairs" else collate_shared(*PAIRS, pad_id=0)
        if layout == "shared":
            from dpo_lean.data.collate import mark_tails
            mark_tails(batch)
        scores = batch_scores(model, batch, chunk_size=2, wpo=True)
        stacked = batch_logps(model, batch, chunk_size=2)
    logp_all = torch.log_softmax(logits, -1)[:, :-1]
    logp = logp_all.gather(2, two["input_ids"][:, 1:, None]).squeeze(2)
    lss = torch.log((logp_all.exp() ** 2).sum(-1))
    mask = two["completion_mask"][:, 1:].double()
    position = (mask.cumsum(1) - 1) * mask  # 0-based position in the completion
    lengths = mask.sum(1)
    shared = torch.minimum(lengths[:2], lengths[2:]).repeat(2)
    tail = mask * (position >= shared[:, None])
    assert tail.sum() == 2 + 3  # pair 0: rejected is 2 tokens longer; pair 1: chosen is 3 longer
    torch.testing.assert_close(scores["logps"].double(), (logp * mask).sum(1), rtol=0, atol=1e-4)
    torch.testing.assert_close(scores["tail_logps"].double(), (logp * tail).sum(1), rtol=0, atol=1e-4)
    torch.testing.assert_close(scores["wpo_logps"].double(), ((logp - lss) * mask).sum(1) / lengths, rtol=0, atol=1e-4)
    assert stacked.shape == (4, 2)
    torch.testing.assert_close(stacked, torch.stack([scores["logps"], scores["tail_logps"]], 1), rtol=0, atol=1e-5)
