"""The chunked log-prob path equals the naive full-logits computation, in value and in gradient."""

from __future__ import annotations

import pytest
import torch

from dpo_lean import modeling
from dpo_lean.data.collate import collate_pairs
from dpo_lean.logprobs import batch_logps, gather_logps, token_logps


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
