"""The chunked log-prob path equals the naive full-logits computation, in value and in gradient."""

from __future__ import annotations

import pytest
import torch

from dpo_lean import modeling
from dpo_lean.layout import collate, collate_pairs, collate_shared
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
    expected = torch.log(torch.tensor(1 / (e + 2), dtype=torch.float64)) + torch.log(torch.tensor(1 / (2 + e**2), dtype=torch.float64))
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
    torch.testing.assert_close(ours, naive.double(), rtol=0, atol=1e-4)


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
    torch.testing.assert_close(ours, naive.double(), rtol=0, atol=1e-4)
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
            from dpo_lean.layout import mark_tails
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
# ---------------------------------------------------------------- bf16: float32 log-sum-exp, no per-chunk copies


def _bf16_head(n=40, hidden=32, vocab=500, seed=0):
    """bf16 hidden states and head whose logits are large (std ~11), so rounding them to bf16 shows (ulp 0.125-0.25)."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hidden, generator=g) * 2).bfloat16()
    w = torch.randn(vocab, hidden, generator=g).bfloat16()
    b = torch.randn(vocab, generator=g).bfloat16()
    return h, w, b, torch.randint(0, vocab, (n,), generator=g), torch.randn(n, generator=g, dtype=torch.float64)


def float64_token_logps(hidden, weight, targets, bias):
    """The reference: the same bf16 numbers, every operation in float64."""
    logits = hidden.double() @ weight.double().t() + bias.double()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("chunk_size", [7, 64])
def test_bf16_logps_and_gradients_match_a_float64_reference(chunk_size):
    h, w, b, targets, upstream = _bf16_head()
    hidden = h.clone().requires_grad_()
    ours = token_logps(hidden, w, targets, b, chunk_size)
    (ours.double() * upstream).sum().backward()

    h64 = h.double().requires_grad_()
    ref = float64_token_logps(h64, w, targets, b)
    (ref * upstream).sum().backward()
    # float32 from the matmul on: errors ~1e-5; logits rounded to bf16 first would be off by ~0.1
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=0, atol=2e-4)
    # the hidden-state gradient is bf16 (the hidden states' dtype): a few bf16 ulps of its scale
    scale = h64.grad.abs().max().item()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=2e-2, atol=2e-2 * scale)


def test_bf16_trainable_head_gradients_match_a_float64_reference():
    h, w, b, targets, upstream = _bf16_head(n=24)
    hidden, weight, bias = (x.clone().requires_grad_() for x in (h, w, b))
    (token_logps(hidden, weight, targets, bias, 5).double() * upstream).sum().backward()
    h64, w64, b64 = (x.double().requires_grad_() for x in (h, w, b))
    (float64_token_logps(h64, w64, targets, b64) * upstream).sum().backward()
    for ours, ref in ((hidden, h64), (weight, w64), (bias, b64)):
        scale = ref.grad.abs().max().item()
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=2e-2, atol=2e-2 * scale)


def _large_allocations(fn, at_least: int) -> int:
    """How many tensors of >= ``at_least`` elements the ops run by ``fn`` allocate (out=, in-place and views excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            fresh = [r.alias_info is None for r in func._schema.returns]
            results = out if isinstance(out, (tuple, list)) else (out,)
            Count.n += sum(1 for r, f in zip(results, fresh)
                           if f and isinstance(r, torch.Tensor) and r.numel() >= at_least)
            return out

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_logits_sized_allocation_per_chunk(dtype):
    """The forward and backward allocate their [chunk, vocab] buffers once, whatever the number of chunks."""
    h, w, b, targets, upstream = _bf16_head(n=64, hidden=32, vocab=500)
    h, w, b = h.to(dtype), w.to(dtype), b.to(dtype)

    def forward_backward(chunk_size):
        hidden = h.clone().requires_grad_()
        (token_logps(hidden, w, targets, b, chunk_size) * upstream.float()).sum().backward()

    counts = [_large_allocations(lambda: forward_backward(8), at_least=8 * 500),  # 8 chunks
              _large_allocations(lambda: forward_backward(32), at_least=8 * 500)]  # 2 chunks
    assert counts[0] == counts[1] <= 2, counts


def test_hidden_states_are_kept_for_backward_only_when_the_head_trains():
    h, w, b, targets, _ = _bf16_head(n=16)
    hidden = h.clone().requires_grad_()
    frozen = token_logps(hidden, w, targets, b, 4)
    trained = token_logps(hidden, w.clone().requires_grad_(), targets, b, 4)
    saved = lambda out: [t for t in out.grad_fn.saved_tensors if t is not None]  # noqa: E731
    assert not any(t.shape == hidden.shape and t.dtype == hidden.dtype and torch.equal(t, hidden) for t in saved(frozen))
    assert any(t.shape == hidden.shape and torch.equal(t, hidden) for t in saved(trained))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_logps_match_a_float64_reference(dtype):
    """On a GPU (torch.mm with a float32 output: no rounding of the logits to the head's dtype) as on CPU."""
    h, w, b, targets, upstream = _bf16_head()
    h, w, b, targets = (x.cuda() for x in (h.to(dtype), w.to(dtype), b.to(dtype), targets))
    hidden = h.clone().requires_grad_()
    ours = token_logps(hidden, w, targets, b, 7)
    (ours.double() * upstream.cuda()).sum().backward()
    h64 = h.double().requires_grad_()
    ref = float64_token_logps(h64, w, targets, b)
    (ref * upstream.cuda()).sum().backward()
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=0, atol=2e-4)
    scale = h64.grad.abs().max().item()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=2e-2, atol=2e-2 * scale)


def float64_softcapped_logps(hidden, weight, targets, bias, cap):
    """The reference: y = c * tanh(z / c) and log_softmax, every operation in float64 (autograd for gradients)."""
    logits = hidden.double() @ weight.double().t() + bias.double()
    return torch.log_softmax(cap * torch.tanh(logits / cap), dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_softcapped_logps_and_gradients_match_float64_autograd(chunk_size):
    """Final-logit softcapping (Gemma 2/4) with logits far past the cap (std ~11, cap 5): value, the hidden
    states' gradient (its Jacobian formed in the forward) and a trained head's, against float64 autograd."""
    g = torch.Generator().manual_seed(5)
    h, w, b = torch.randn(40, 16, generator=g) * 2, torch.randn(300, 16, generator=g), torch.randn(300, generator=g)
    targets, upstream = torch.randint(0, 300, (40,), generator=g), torch.randn(40, generator=g, dtype=torch.float64)
    hidden, weight, bias = (x.clone().requires_grad_() for x in (h, w, b))
    ours = token_logps(hidden, weight, targets, bias, chunk_size, softcap=5.0)
    (ours.double() * upstream).sum().backward()
    h64, w64, b64 = (x.double().requires_grad_() for x in (h, w, b))
    ref = float64_softcapped_logps(h64, w64, targets, b64, 5.0)
    (ref * upstream).sum().backward()
    assert (ref - float64_token_logps(h, w, targets, b)).abs().max() > 1.0  # the cap matters here
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=0, atol=2e-5)
    for got, want in ((hidden, h64), (weight, w64), (bias, b64)):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)
    frozen = h.clone().requires_grad_()
    (token_logps(frozen, w, targets, b, chunk_size, softcap=5.0).double() * upstream).sum().backward()
    torch.testing.assert_close(frozen.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)


def test_softcapped_log_sum_sq_probs_match_float64():
    g = torch.Generator().manual_seed(6)
    h, w, b = torch.randn(30, 8, generator=g) * 3, torch.randn(200, 8, generator=g), torch.randn(200, generator=g)
    z = h.double() @ w.double().t() + b.double()
    expected = torch.log((torch.softmax(5.0 * torch.tanh(z / 5.0), -1) ** 2).sum(-1))
    torch.testing.assert_close(log_sum_sq_probs(h, w, b, 7, softcap=5.0).double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("has_mm", [False, True])
def test_a_head_copied_to_float32_is_announced_with_its_cost(monkeypatch, capsys, has_mm):
    """Without torch.mm(..., out_dtype=float32) for a bf16 head (torch < 2.8, or CPU), log-probs copy the head to
    float32 at each forward: deferring the head says so once, with the copy's size; with it, nothing is said."""
    from dpo_lean import logprobs
    from dpo_lean.tiny import build_model

    model = build_model(40_000, hidden_size=256, num_layers=1).to(torch.bfloat16)
    monkeypatch.setitem(logprobs._FLOAT32_MM, ("cpu", torch.bfloat16), has_mm)
    modeling.defer_output_head(model)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("notice:")]
    if has_mm:
        assert lines == []
    else:  # 40,000 x 256 float32 values: 40,960,000 bytes
        assert len(lines) == 1 and "bfloat16 output head to float32" in lines[0] and "(0.04 GB more" in lines[0]
        assert "torch >= 2.8 on a CUDA GPU" in lines[0]
