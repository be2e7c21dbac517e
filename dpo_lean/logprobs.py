"""Per-sequence log-probs from final hidden states, in chunks, at completion positions only.

    logp(y | x) = sum_{t in completion} [ h_{t-1} . W[y_t]  -  logsumexp_v(h_{t-1} . W[v]) ]

h are the final hidden states, W the output head ([vocab, hidden]). A [batch, seq, vocab] logits
tensor never exists: only completion positions are scored, ``chunk_size`` positions at a time, in one
float32 logits buffer allocated once per call. The logits are accumulated and kept in float32 from the
matmul on (a bf16 or fp16 head's logits are never rounded to its dtype), and log-sum-exp runs in float32.
Each token's gradient with respect to its hidden state is formed in the forward, while its chunk's logits
exist, so the backward keeps and recomputes no logits (only a trainable head makes it recompute them).
Per-token values are float32; each completion's sum is accumulated in float64 and stays float64 (the reference
cache stores it so, and the losses form policy - reference from it), since a sum over thousands of tokens is
large and a log-ratio is the small difference of two of them.

A head whose model softcaps its final logits (Gemma 2, Gemma 4: ``final_logit_softcapping`` c) is scored on
y = c * tanh(z / c) in place of z, per chunk, in float32 (:func:`softcap_`); modeling.defer_output_head moves the
cap from the model's forward to here. A logit scale (Cohere's ``logit_scale``, Granite's ``logits_scaling``) needs
nothing here: the model multiplies its hidden states by it before the deferred head, the same thing for a bias-free
head.

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


def softcap_(logits: torch.Tensor, cap: float, slope: torch.Tensor | None = None) -> torch.Tensor:
    """In place: z -> y = c * tanh(z / c), final-logit softcapping (as transformers' Gemma models compute it);
    ``slope`` (same shape, optional) receives its derivative dy/dz = 1 - tanh(z / c)^2."""
    t = logits.div_(cap).tanh_()
    if slope is not None:
        torch.mul(t, t, out=slope).neg_().add_(1.0)
    return t.mul_(cap)


def _logp_gradient_(logits: torch.Tensor, total: torch.Tensor, targets: torch.Tensor,
                    slope: torch.Tensor | None) -> torch.Tensor:
    """In place: exp(y - peak) -> d log p(target) / d z = (onehot(target) - softmax(y)) * dy/dz, per row.

    ``logits`` holds exp(y - peak) and ``total`` its row sums (:func:`_exp_shifted_`); ``slope`` is dy/dz of a
    softcapped head (:func:`softcap_`), None where y = z."""
    d = logits.div_(total).neg_()  # -softmax
    d.scatter_add_(1, targets, torch.ones_like(d[:, :1]))
    return d.mul_(slope) if slope is not None else d


def has_float32_mm(weight: torch.Tensor) -> bool:
    """Can a head of ``weight``'s dtype multiply into float32 in place, ``torch.mm(..., out_dtype=float32)``?
    (CUDA with torch >= 2.8; not on CPU.) Probed once per (device type, dtype); a float32 head needs nothing."""
    key = (weight.device.type, weight.dtype)
    if weight.dtype not in (torch.bfloat16, torch.float16):
        return True
    if key not in _FLOAT32_MM:
        probe = torch.empty((1, 1), dtype=torch.float32, device=weight.device)
        try:
            torch.mm(weight[:1], weight[:1].t(), out_dtype=torch.float32, out=probe)
            _FLOAT32_MM[key] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _FLOAT32_MM[key] = False
    return _FLOAT32_MM[key]


def float32_copy_notice(weight: torch.Tensor) -> str | None:
    """The one line to print where log-probs must copy a bf16/fp16 head to float32 (no float32 mm here), with what
    the copy costs; None where no copy is made."""
    if has_float32_mm(weight):
        return None
    gb = weight.numel() * 4 / 1e9
    return (f"notice: torch {torch.__version__} has no torch.mm(..., out_dtype=float32) on {weight.device.type}; "
            f"log-probs copy the {str(weight.dtype).removeprefix('torch.')} output head to float32 at each forward "
            f"({gb:.2f} GB more while it is scored); torch >= 2.8 on a CUDA GPU multiplies it in place")


class _Float32Logits:
    """out = h @ W.T + b in float32, accumulated in float32 and never rounded to W's dtype.

    A float32 head multiplies as it is; a bf16/fp16 head uses ``torch.mm(..., out_dtype=float32)`` where the
    device has it (CUDA, torch >= 2.8: tensor-core speed, float32 output), else one float32 copy of W per call
    (modeling.defer_output_head prints a notice saying so).
    """

    def __init__(self, weight: torch.Tensor, rows: int):
        self.rows, self.cast = rows, None  # cast: -softmax in W's dtype for the Jacobian matmul, made on first use
        self.w = weight if has_float32_mm(weight) else weight.float()

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
    """token_logps[i] = log_softmax(y_i)[targets[i]] with y_i = hidden[i] @ W.T + b (softcapped: c * tanh of it),
    chunk by chunk, in float32.

    d token_logp_i / d y_i = onehot(target_i) - softmax(y_i), and dy/dz = 1 - tanh(z / c)^2 for a softcapped head
    (1 without), so
        d token_logp_i / d hidden_i = ((onehot(target_i) - p_i) * dy/dz_i) @ W          (J_i, one row of [N, H])
    Each token's log-prob depends on its own hidden state only, so J is computed in the forward, chunk by
    chunk while the chunk's logits exist, and the backward is grad_hidden = grad_out[:, None] * J: no
    logits are kept or recomputed, and ``hidden`` is not kept. Only when W or b need gradients (a trained
    head) are ``hidden`` kept and each chunk's softmax recomputed in the backward. A softcapped head keeps a
    second [chunk, vocab] float32 buffer for dy/dz while gradients are formed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap):
        n_total = hidden.shape[0]
        out = torch.empty(n_total, dtype=torch.float32, device=hidden.device)
        jacobian = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        with _Chunks(weight, hidden, chunk_size, softcap, slopes=jacobian is not None) as chunks:
            for s, logits, slope in chunks.logits(hidden, bias):
                tgt = targets[s:s + chunk_size, None]
                target_logit = logits.gather(1, tgt).squeeze(1)
                peak, total = _exp_shifted_(logits)
                out[s:s + chunk_size] = target_logit - (peak + total.log()).squeeze(1)
                if jacobian is not None:
                    chunks.head.jacobian(_logp_gradient_(logits, total, tgt, slope), jacobian[s:s + chunk_size])
        trained_head = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        ctx.save_for_backward(hidden if trained_head else None, weight, bias, targets, jacobian)
        ctx.chunk_size, ctx.trained_head, ctx.softcap = chunk_size, trained_head, softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, jacobian = ctx.saved_tensors
        grad_h = (grad_out[:, None] * jacobian).to(jacobian.dtype) if jacobian is not None else None
        if not ctx.trained_head:
            return grad_h, None, None, None, None, None
        need_w, need_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        size = ctx.chunk_size
        with _Chunks(weight, hidden, size, ctx.softcap, slopes=True) as chunks:
            for s, logits, slope in chunks.logits(hidden, bias):
                d = _logp_gradient_(logits, _exp_shifted_(logits)[1], targets[s:s + size, None], slope)
                d *= grad_out[s:s + size, None]
                if need_w:
                    grad_w.addmm_(d.t(), hidden[s:s + size].float())
                if need_b:
                    grad_b += d.sum(0)
        return (grad_h,
                grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None,
                None, None, None)


class _Chunks:
    """The chunk loop's buffers, allocated once per call: one float32 [chunk, vocab] logits buffer worked on in
    place (a fresh tensor per chunk, and log-sum-exp's temporaries, made the pass slower than the full logits),
    and for a softcapped head with ``slopes`` a second one for dy/dz. Autocast is off inside: dtypes are chosen
    here."""

    def __init__(self, weight: torch.Tensor, hidden: torch.Tensor, chunk_size: int, softcap: float | None,
                 slopes: bool = False):
        rows = max(1, min(chunk_size, hidden.shape[0]))
        self.chunk_size, self.softcap, self.head = chunk_size, softcap, _Float32Logits(weight, rows)
        self.buffer = torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=hidden.device)
        self.slopes = torch.empty_like(self.buffer) if softcap and slopes else None
        self._autocast = torch.autocast(hidden.device.type, enabled=False)

    def __enter__(self):
        self._autocast.__enter__()
        return self

    def __exit__(self, *exc):
        self._autocast.__exit__(*exc)

    def logits(self, hidden: torch.Tensor, bias: torch.Tensor | None):
        """(start, the chunk's float32 logits y, its dy/dz or None) for each chunk of ``hidden``."""
        size = self.chunk_size
        for s in range(0, hidden.shape[0], size):
            n = min(size, hidden.shape[0] - s)
            logits = self.head.logits(hidden[s:s + size], self.buffer[:n], bias)
            slope = self.slopes[:n] if self.slopes is not None else None
            if self.softcap:
                softcap_(logits, self.softcap, slope)
            yield s, logits, slope


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None, chunk_size: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for flat [N, H] hidden states, float32 [N]; ``softcap``: the head's final-logit
    softcapping c (logits y = c * tanh(z / c)), None for none."""
    chunk_size = chunk_size or auto_chunk_size(weight.shape[0])
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, chunk_size, softcap or None)


def _segment_sums(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """sum_{i: segment[i] = s} values[i] for each segment s, float64 [num_segments] (values float32 [N]).

    Accumulated in float64: one float32 accumulator over a completion's tokens rounds at every add, an error that
    grows with the length (about 1e-6 of a 2,000-token sum); in float64 the sum carries only the per-token values'
    own error. The backward hands ``values`` its float32 gradient, d sum_s / d values[i] = [segment[i] = s].
    """
    total = torch.zeros(num_segments, dtype=torch.float64, device=values.device)
    return total.index_add(0, segment, values.to(torch.float64))


def gather_logps(hidden: torch.Tensor, weight: torch.Tensor, score_index: torch.Tensor,
                 score_targets: torch.Tensor, score_segment: torch.Tensor, num_segments: int,
                 bias: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Summed log-prob per segment, float64 [num_segments] (see _segment_sums).

    hidden [rows, T, H]; score_index are flat positions into rows * T whose hidden state predicts
    score_targets; score_segment says which completion each scored token belongs to.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])[score_index]
    return _segment_sums(token_logps(flat, weight, score_targets, bias, chunk_size), score_segment, num_segments)


def log_sum_sq_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     chunk_size: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """log sum_v p_v^2 of the next-token distribution at each of the flat [N, H] hidden states, float32 [N],
    without gradient (WPO's alignment term), a chunk of logits y at a time (softcapped as in :func:`token_logps`):

        log sum_v p_v^2 = logsumexp_v(2 y_v) - 2 logsumexp_v(y_v)
    """
    chunk_size = chunk_size or auto_chunk_size(weight.shape[0])
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.no_grad(), _Chunks(weight, hidden, chunk_size, softcap or None) as chunks:
        for s, logits, _ in chunks.logits(hidden, bias):
            lse = torch.logsumexp(logits, dim=-1)
            out[s:s + chunk_size] = torch.logsumexp(logits.mul_(2), dim=-1) - 2 * lse
    return out


def logit_rms(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              chunk_size: int | None = None) -> torch.Tensor:
    """rms_v(z_v) = sqrt(mean_v z_v^2) of the logits z = h @ W.T + b (before any softcap) at each of the flat [N, H]
    hidden states, float32 [N], without gradient: the scale the logits' rounding errors take
    (layout.sharing_tolerance)."""
    chunk_size = chunk_size or auto_chunk_size(weight.shape[0])
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.no_grad(), _Chunks(weight, hidden, chunk_size, None) as chunks:
        for s, logits, _ in chunks.logits(hidden, bias):
            out[s:s + chunk_size] = logits.pow_(2).mean(dim=-1).sqrt_()
    return out


def completion_scores(token_values: torch.Tensor, batch: dict,
                      token_log_sum_sq: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-completion sums of scored-token log-probs ([chosen..., rejected...], [2B] each, float64: _segment_sums):

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


def batch_scores(model, batch: dict, chunk_size: int | None = None, wpo: bool = False,
                 rms: bool = False) -> dict[str, torch.Tensor]:
    """Run ``model`` (its output head deferred, see modeling.defer_output_head) and score the batch: the
    :func:`completion_scores` of its completions (``wpo``: also WPO's term, one more no-grad pass of the head
    over the completion positions, a chunk at a time; ``rms``: also ``logit_rms``, the sum over each completion's
    tokens of :func:`logit_rms`, another such pass).

    ``batch`` comes from layout (either layout): the model gets ``input_ids``, ``attention_mask``
    (and ``position_ids`` for the shared layout); the score fields say which tokens to sum.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    out = model(**inputs, use_cache=False)  # a DDP wrapper's forward, so gradients synchronise
    deferred = getattr(model, "module", model).get_output_embeddings()
    head, softcap = deferred.head, getattr(deferred, "softcap", None)
    flat = out.logits.reshape(-1, out.logits.shape[-1])[batch["score_index"]]
    with whole(head):
        values = token_logps(flat, head.weight, batch["score_targets"], head.bias, chunk_size, softcap)
        log_sum_sq = log_sum_sq_probs(flat.detach(), head.weight, head.bias, chunk_size, softcap) if wpo else None
        token_rms = logit_rms(flat.detach(), head.weight, head.bias, chunk_size) if rms else None
    scores = completion_scores(values, batch, log_sum_sq)
    if rms:
        scores["logit_rms"] = torch.zeros_like(scores["logps"]).index_add_(
            0, batch["score_segment"], token_rms.to(scores["logps"].dtype))
    return scores


def whole(head: torch.nn.Module):
    """The head's parameters gathered whole while the log-probs read them: DeepSpeed ZeRO-3 partitions them again
    after each module's forward (FSDP keeps the output head gathered from the forward to the backward itself)."""
    params = [p for p in head.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def batch_logps(model, batch: dict, chunk_size: int | None = None) -> torch.Tensor:
    """Summed log-prob of each completion, float64 [2B] (chosen..., rejected...); for a batch with ``score_tail``,
    [2B, 2]: the sum and the sum past the pair's shorter completion (what the reference cache stores)."""
    scores = batch_scores(model, batch, chunk_size)
    return torch.stack([scores["logps"], scores["tail_logps"]], dim=1) if "tail_logps" in scores else scores["logps"]
