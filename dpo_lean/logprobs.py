"""Per-sequence log-probs from final hidden states, in chunks, at completion positions only.

    logp(y | x) = sum_{t in completion} [ h_{t-1} . W[y_t]  -  logsumexp_v(h_{t-1} . W[v]) ]

h are the final hidden states, W the output head ([vocab, hidden]). A [batch, seq, vocab] logits
tensor never exists: only completion positions are scored, ``chunk_size`` positions at a time, in one
float32 logits buffer allocated once per call. The logits are accumulated and kept in float32 from the
matmul on (a bf16 or fp16 head's logits are never rounded to its dtype), and log-sum-exp runs in float32.
Each token's gradient with respect to its hidden state is formed in the forward, while its chunk's logits
exist, so the backward keeps and recomputes no logits (only a trainable head makes it recompute them).

Precompute and train both score with :func:`batch_scores` (precompute through :func:`batch_logps`),
so the reference and the policy are scored by the same code.
"""

from __future__ import annotations

import contextlib

import torch

LOGITS_BUDGET_ELEMENTS = 2**25  # one chunk of float32 logits: 128 MB
_FLOAT32_MM: dict[tuple[str, torch.dtype], bool] = {}  # (device type, dtype) -> has mm(..., out_dtype=float32)


def auto_chunk_size(vocab_size: int) -> int:
    return max(1, LOGITS_BUDGET_ELEMENTS // vocab_size)


def _exp_shifted_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: logits -> exp(logits - peak) per row; returns (peak, sum of the exps), both [rows, 1]."""
    peak = logits.amax(dim=-1, keepdim=True)
    return peak, logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)


class _Float32Logits:
    """out = h @ W.T + b in float32, accumulated in float32 and never rounded to W's dtype.

    A float32 head multiplies as it is; a bf16/fp16 head uses ``torch.mm(..., out_dtype=float32)`` where the
    device has it (CUDA, torch >= 2.8: tensor-core speed, float32 output), else one float32 copy of W per call.
    """

    def __init__(self, weight: torch.Tensor, rows: int):
        self.rows, self.cast = rows, None  # cast: -softmax in W's dtype for the Jacobian matmul, made on first use
        key = (weight.device.type, weight.dtype)
        if weight.dtype in (torch.bfloat16, torch.float16) and _FLOAT32_MM.get(key, True):
            probe = torch.empty((1, 1), dtype=torch.float32, device=weight.device)
            try:
                torch.mm(weight[:1], weight[:1].t(), out_dtype=torch.float32, out=probe)
                _FLOAT32_MM[key] = True
            except (RuntimeError, NotImplementedError, TypeError):
                _FLOAT32_MM[key] = False
        self.w = weight if weight.dtype == torch.float32 or _FLOAT32_MM.get(key, False) else weight.float()

    def logits(self, h: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = self.w
        if w.dtype == torch.float32:
            torch.matmul(h.to(torch.float32), w.t(), out=out)
        else:
            torch.mm(h.to(w.dtype), w.t(), out_dtype=torch.float32, out=out)
        if bias is not None:
            out += bias
        return out

    def jacobian(self, d: torch.Tensor, out: torch.Tensor) -> None:
        """out = d @ W (d float32 [rows, vocab], out [rows, hidden] in the hidden states' dtype)."""
        w = self.w
        if w.dtype != torch.float32:
            if self.cast is None:
                self.cast = torch.empty((self.rows, w.shape[0]), dtype=w.dtype, device=w.device)
            d = self.cast[:d.shape[0]].copy_(d)
        if out.dtype == w.dtype:
            torch.matmul(d, w, out=out)
        else:
            out.copy_(d @ w)


class _ChunkedTokenLogps(torch.autograd.Function):
    """token_logps[i] = log_softmax(hidden[i] @ W.T + b)[targets[i]], chunk by chunk, in float32.

    d token_logp_i / d logits_i = onehot(target_i) - softmax(logits_i), so
        d token_logp_i / d hidden_i = (onehot(target_i) - p_i) @ W          (J_i, one row of [N, H])
    Each token's log-prob depends on its own hidden state only, so J is computed in the forward, chunk by
    chunk while the chunk's logits exist, and the backward is grad_hidden = grad_out[:, None] * J: no
    logits are kept or recomputed, and ``hidden`` is not kept. Only when W or b need gradients (a trained
    head) are ``hidden`` kept and each chunk's softmax recomputed in the backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        n_total = hidden.shape[0]
        rows = max(1, min(chunk_size, n_total))
        out = torch.empty(n_total, dtype=torch.float32, device=hidden.device)
        jacobian = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        head = _Float32Logits(weight, rows)
        # One float32 logits buffer for all chunks, worked on in place: a fresh [chunk, vocab] tensor (and
        # log-sum-exp's temporaries) per chunk made the pass slower than computing the full logits.
        buffer = torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen here, not by autocast
            for s in range(0, n_total, chunk_size):
                logits = head.logits(hidden[s:s + chunk_size], buffer[:min(chunk_size, n_total - s)], bias)
                tgt = targets[s:s + chunk_size, None]
                target_logit = logits.gather(1, tgt).squeeze(1)
                peak, total = _exp_shifted_(logits)
                out[s:s + chunk_size] = target_logit - (peak + total.log()).squeeze(1)
                if jacobian is not None:
                    d = logits.div_(total).neg_()  # -softmax
                    d.scatter_add_(1, tgt, torch.ones_like(d[:, :1]))
                    head.jacobian(d, jacobian[s:s + chunk_size])
        trained_head = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        ctx.save_for_backward(hidden if trained_head else None, weight, bias, targets, jacobian)
        ctx.chunk_size, ctx.trained_head = chunk_size, trained_head
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, jacobian = ctx.saved_tensors
        grad_h = (grad_out[:, None] * jacobian).to(jacobian.dtype) if jacobian is not None else None
        if not ctx.trained_head:
            return grad_h, None, None, None, None
        need_w, need_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        rows = max(1, min(ctx.chunk_size, hidden.shape[0]))
        head = _Float32Logits(weight, rows)
        buffer = torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], ctx.chunk_size):
                h = hidden[s:s + ctx.chunk_size]
                logits = head.logits(h, buffer[:h.shape[0]], bias)
                d = logits.div_(_exp_shifted_(logits)[1]).neg_()  # -softmax
                d.scatter_add_(1, targets[s:s + ctx.chunk_size, None], torch.ones_like(d[:, :1]))
                d *= grad_out[s:s + ctx.chunk_size, None]
                if need_w:
                    grad_w.addmm_(d.t(), h.float())
                if need_b:
                    grad_b += d.sum(0)
        return (grad_h,
                grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None,
                None, None)


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for flat [N, H] hidden states, float32 [N]."""
    chunk_size = chunk_size or auto_chunk_size(weight.shape[0])
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, chunk_size)


def _segment_sums(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    return torch.zeros(num_segments, dtype=values.dtype, device=values.device).index_add(0, segment, values)


def gather_logps(hidden: torch.Tensor, weight: torch.Tensor, score_index: torch.Tensor,
                 score_targets: torch.Tensor, score_segment: torch.Tensor, num_segments: int,
                 bias: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Summed log-prob per segment, float32 [num_segments].

    hidden [rows, T, H]; score_index are flat positions into rows * T whose hidden state predicts
    score_targets; score_segment says which completion each scored token belongs to.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])[score_index]
    return _segment_sums(token_logps(flat, weight, score_targets, bias, chunk_size), score_segment, num_segments)


def log_sum_sq_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     chunk_size: int | None = None) -> torch.Tensor:
    """log sum_v p_v^2 of the next-token distribution at each of the flat [N, H] hidden states, float32 [N],
    without gradient (WPO's alignment term), a chunk of logits at a time:

        log sum_v p_v^2 = logsumexp_v(2 z_v) - 2 logsumexp_v(z_v)
    """
    chunk_size = chunk_size or auto_chunk_size(weight.shape[0])
    n_total = hidden.shape[0]
    rows = max(1, min(chunk_size, n_total))
    out = torch.empty(n_total, dtype=torch.float32, device=hidden.device)
    head = _Float32Logits(weight, rows)
    buffer = torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=hidden.device)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, n_total, chunk_size):
            logits = head.logits(hidden[s:s + chunk_size], buffer[:min(chunk_size, n_total - s)], bias)
            lse = torch.logsumexp(logits, dim=-1)
            out[s:s + chunk_size] = torch.logsumexp(logits.mul_(2), dim=-1) - 2 * lse
    return out


def completion_scores(token_values: torch.Tensor, batch: dict,
                      token_log_sum_sq: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-completion sums of scored-token log-probs ([chosen..., rejected...], [2B] each):

        logps       the sum over the completion's tokens
        tail_logps  the sum over its tokens past the pair's shorter completion (LD-DPO; when the batch has
                    ``score_tail``, see layout); 0 for the shorter one
        wpo_logps   mean over its tokens of (log p_t - log sum_v p_v^2), no gradient (WPO; when
                    ``token_log_sum_sq`` is given)
    """
    segment, n = batch["score_segment"], 2 * batch["num_pairs"]
    scores = {"logps": _segment_sums(token_values, segment, n)}
    if "score_tail" in batch:
        scores["tail_logps"] = _segment_sums(token_values * batch["score_tail"].to(token_values.dtype), segment, n)
    if token_log_sum_sq is not None:
        with torch.no_grad():
            counts = _segment_sums(torch.ones_like(token_values), segment, n)
            scores["wpo_logps"] = _segment_sums(token_values.detach() - token_log_sum_sq, segment, n) / counts
    return scores


def batch_scores(model, batch: dict, chunk_size: int | None = None, wpo: bool = False) -> dict[str, torch.Tensor]:
    """Run ``model`` (its output head deferred, see modeling.defer_output_head) and score the batch: the
    :func:`completion_scores` of its completions (``wpo``: also WPO's term, one more no-grad pass of the head
    over the completion positions, a chunk at a time).

    ``batch`` comes from layout (either layout): the model gets ``input_ids``, ``attention_mask``
    (and ``position_ids`` for the shared layout); the score fields say which tokens to sum.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    out = model(**inputs, use_cache=False)  # a DDP wrapper's forward, so gradients synchronise
    head = getattr(model, "module", model).get_output_embeddings().head
    flat = out.logits.reshape(-1, out.logits.shape[-1])[batch["score_index"]]
    with whole(head):
        values = token_logps(flat, head.weight, batch["score_targets"], head.bias, chunk_size)
        log_sum_sq = log_sum_sq_probs(flat.detach(), head.weight, head.bias, chunk_size) if wpo else None
    return completion_scores(values, batch, log_sum_sq)


def whole(head: torch.nn.Module):
    """The head's parameters gathered whole while the log-probs read them: DeepSpeed ZeRO-3 partitions them again
    after each module's forward (FSDP keeps the output head gathered from the forward to the backward itself)."""
    params = [p for p in head.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def batch_logps(model, batch: dict, chunk_size: int | None = None) -> torch.Tensor:
    """Summed log-prob of each completion, [2B] (chosen..., rejected...); for a batch with ``score_tail``,
    [2B, 2]: the sum and the sum past the pair's shorter completion (what the reference cache stores)."""
    scores = batch_scores(model, batch, chunk_size)
    return torch.stack([scores["logps"], scores["tail_logps"]], dim=1) if "tail_logps" in scores else scores["logps"]
