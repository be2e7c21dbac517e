"""Prefix sharing, in one place: the two batch layouts, the shared mask, the per-batch choice, the model check.

two sequences per pair (``collate_pairs``):   [prompt | chosen]  and  [prompt | rejected]
one shared sequence per pair (``collate_shared``, prefix sharing):  [prompt | chosen | rejected]

Both give ``score_index`` (flat positions into [rows * T] whose hidden state predicts a completion
token), ``score_targets`` (that token) and ``score_segment`` (0..B-1 for chosen i, B..2B-1 for
rejected i), so logprobs.batch_logps sums the same tokens with the same predictors either way.
``collate`` picks the layout per batch (``Sharing.pays``: fewer FLOPs, ``layout_flops``); with ``tails`` it
also marks each scored token that lies past the pair's shorter completion (``score_tail``, for LD-DPO).

On a loaded model:

    layout    = window_layout(model)            # its sliding window and the layers that use it, as transformers does
    result    = check(model, dtype, layout)     # shared vs two sequences on a small pair, within float rounding
    sharing   = prefix_sharing(config, ...)     # the Sharing collate uses, or None (off, or auto on a model that fails)

The check's tolerance is :func:`sharing_tolerance`, a rounding-error bound scaled to the compute dtype, the
depth and the scored tokens (derived in its docstring); the measured difference is printed once.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import launch
from .config import Config
from .errors import DpoLeanError
from .logprobs import batch_logps, batch_scores
from .modeling import autocast, batch_to, inference


def _check_prompts(prompts: list[list[int]]) -> None:
    """Every pair needs a prompt token: its last one predicts the first completion token (position -1 would read
    the previous row's last hidden state). Tokenisation skips such rows ("empty_prompt"); this makes it certain."""
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"pairs {empty} of the batch have no prompt tokens; tokenisation should have skipped them")


def _scores(spans: list[tuple[int, list[int], list[int]]], width: int, num_pairs: int, num_tokens: int) -> dict:
    """spans: (row, predictor positions, target ids) per completion, chosen ones first, then rejected ones.

    ``num_tokens`` counts prompt + chosen and prompt + rejected of every pair, whatever the layout, so
    tokens/s compares layouts on the same work.
    """
    index, targets, segment = [], [], []
    for seg, (row, positions, ids) in enumerate(spans):
        index += [row * width + p for p in positions]
        targets += ids
        segment += [seg] * len(ids)
    return {"score_index": torch.tensor(index, dtype=torch.long),
            "score_targets": torch.tensor(targets, dtype=torch.long),
            "score_segment": torch.tensor(segment, dtype=torch.long), "num_pairs": num_pairs,
            "num_tokens": num_tokens}


def collate_pairs(prompts: list[list[int]], chosens: list[list[int]], rejecteds: list[list[int]],
                  pad_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``completion_mask`` ([2B, T]) plus the score fields.

    Row i is prompt_i + chosen_i, row B + i is prompt_i + rejected_i; completion_mask is 1 on
    completion tokens only.
    """
    _check_prompts(prompts)
    seqs = [p + c for p, c in zip(prompts, chosens)] + [p + r for p, r in zip(prompts, rejecteds)]
    completions = list(chosens) + list(rejecteds)
    prompt_lens = [len(p) for p in prompts] * 2
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(zip(seqs, prompt_lens)):
        input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, :len(seq)] = 1
        completion_mask[i, n_prompt:len(seq)] = 1
    spans = [(i, list(range(n - 1, n - 1 + len(c))), c) for i, (n, c) in enumerate(zip(prompt_lens, completions))]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            **_scores(spans, width, len(prompts), sum(len(s) for s in seqs))}


def shared_attention_mask(p: int, c: int, r: int, width: int, dtype: torch.dtype,
                          window: int | None = None) -> torch.Tensor:
    """[width, width] mask for [prompt | chosen | rejected | padding]: boolean (True = may attend, what
    SDPA takes and runs fastest with) when ``dtype`` is torch.bool, else additive (0 or the dtype's
    minimum, what eager attention adds to its scores).

    Causal, and rejected never sees chosen; padding rows see only themselves (no all-masked row,
    so no NaN from the softmax). ``window``: a sliding window in positions, as transformers applies it
    to two sequences (a query at position q sees keys at positions > q - window); rejected positions
    restart after the prompt, so a rejected token sees the prompt tokens it would see in its own sequence.
    """
    region = torch.full((width,), 3)
    region[:p], region[p:p + c], region[p + c:p + c + r] = 0, 1, 2
    i, j = torch.arange(width)[:, None], torch.arange(width)[None, :]
    allowed = (j <= i) & ((region[None, :] == 0) | (region[None, :] == region[:, None])) & (region[:, None] != 3)
    if window is not None:
        pos = torch.arange(width)
        pos[p + c:p + c + r] -= c
        allowed &= (pos[:, None] - pos[None, :]) < window
    allowed |= i == j
    if dtype == torch.bool:
        return allowed
    return torch.zeros((width, width), dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


def collate_shared(prompts: list[list[int]], chosens: list[list[int]], rejecteds: list[list[int]],
                   pad_id: int, mask_dtype: torch.dtype = torch.float32, window: int | None = None,
                   layer_types: tuple[str, ...] | None = None) -> dict:
    """One row per pair, [prompt | chosen | rejected], with a 4-D mask and position ids.

    Rejected positions restart where the prompt ends; the last prompt position predicts the first
    token of both completions. With a sliding ``window`` that a row's positions outgrow, the mask is
    windowed: for every layer, or, given the model's ``layer_types``, as a {layer type: mask} dict in
    which only "sliding_attention" layers get the window (what transformers' models take).
    """
    _check_prompts(prompts)
    seqs = [p + c + r for p, c, r in zip(prompts, chosens, rejecteds)]
    width = max(len(s) for s in seqs)
    span = max(len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosens, rejecteds))  # positions used
    windows = [None] if window is None or span <= window else [None, window] if layer_types else [window]
    b = len(seqs)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    masks = {w: torch.empty((b, 1, width, width), dtype=mask_dtype) for w in windows}
    chosen_spans, rejected_spans = [], []
    for i, (p, c, r) in enumerate(zip(prompts, chosens, rejecteds)):
        n_p, n_c, n_r = len(p), len(c), len(r)
        input_ids[i, :n_p + n_c + n_r] = torch.tensor(p + c + r, dtype=torch.long)
        position_ids[i, :n_p + n_c + n_r] = torch.tensor(
            list(range(n_p + n_c)) + list(range(n_p, n_p + n_r)), dtype=torch.long)
        for w, mask in masks.items():
            mask[i, 0] = shared_attention_mask(n_p, n_c, n_r, width, mask_dtype, w)
        chosen_spans.append((i, list(range(n_p - 1, n_p + n_c - 1)), c))
        rejected_spans.append((i, [n_p - 1] + list(range(n_p + n_c, n_p + n_c + n_r - 1)), r))
    if len(masks) == 1:
        attention_mask = next(iter(masks.values()))
    else:
        attention_mask = {t: masks[window if t == "sliding_attention" else None] for t in layer_types}
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            **_scores(chosen_spans + rejected_spans, width, b,
                      sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosens, rejecteds)))}


def layout_flops(lengths: list[int], hidden_size: int, intermediate_size: int) -> int:
    """Forward FLOPs per decoder layer of a right-padded batch of sequences with these ``lengths``:

        rows * width * (8 H^2 + 6 H I + 4 width H)

    the projections (q, k, v, o: 4 H^2 multiply-adds a token; the gated MLP: 3 H I) and attention over all
    ``width`` keys (scores and weighted sum: 2 width H), padding included. The output head is left out:
    both layouts score the same completion tokens with it.
    """
    width, h = max(lengths), hidden_size
    return len(lengths) * width * (8 * h * h + 6 * h * intermediate_size + 4 * width * h)


@dataclass(frozen=True)
class Sharing:
    """Prefix sharing for a model that takes the shared mask: on every batch (``always``), or on the
    batches where one [prompt | chosen | rejected] sequence per pair costs fewer FLOPs than two sequences
    (prompt-heavy pairs save the prompt's second pass; with short prompts, the longer shared rows' attention
    can cost more than the prompt saves)."""

    mask_dtype: torch.dtype
    hidden_size: int
    intermediate_size: int
    always: bool = False
    window: int | None = None  # the model's sliding window, in positions (see collate_shared)
    layer_types: tuple[str, ...] | None = None  # set where only some layers slide: the mask goes as a dict

    def pays(self, prompts: list[list[int]], chosens: list[list[int]], rejecteds: list[list[int]]) -> bool:
        if self.always:
            return True
        two = [len(p) + len(c) for p, c in zip(prompts, chosens)] + [len(p) + len(r) for p, r in zip(prompts, rejecteds)]
        one = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosens, rejecteds)]
        h, i = self.hidden_size, self.intermediate_size
        return layout_flops(one, h, i) < layout_flops(two, h, i)


def describe_layout(sharing: Sharing | None) -> str:
    if sharing is None:
        return "two sequences per pair"
    return "one shared sequence per pair" if sharing.always else "prefix sharing on the batches where it saves work"


def mark_tails(batch: dict) -> dict:
    """Add ``score_tail`` [N] bool: True for a scored token at position >= min(n_w, n_l) of its completion, the
    part past the pair's shorter completion (LD-DPO's "verbose" tokens); the shorter completion has none.

    Every completion's tokens are contiguous and in order in the score fields (``_scores``), so a token's
    position in its completion is its offset from its segment's first token.
    """
    segment, b = batch["score_segment"], batch["num_pairs"]
    counts = torch.bincount(segment, minlength=2 * b)
    position = torch.arange(segment.shape[0]) - (torch.cumsum(counts, 0) - counts)[segment]
    shared = torch.minimum(counts[:b], counts[b:]).repeat(2)
    batch["score_tail"] = position >= shared[segment]
    return batch


def collate(prompts: list[list[int]], chosens: list[list[int]], rejecteds: list[list[int]], pad_id: int,
            sharing: Sharing | None = None, tails: bool = False) -> dict:
    """The batch in the shared layout where ``sharing`` says it pays, else as two sequences per pair;
    ``tails``: with ``score_tail`` (see ``mark_tails``)."""
    if sharing is not None and sharing.pays(prompts, chosens, rejecteds):
        batch = collate_shared(prompts, chosens, rejecteds, pad_id, mask_dtype=sharing.mask_dtype,
                               window=sharing.window, layer_types=sharing.layer_types)
    else:
        batch = collate_pairs(prompts, chosens, rejecteds, pad_id)
    return mark_tails(batch) if tails else batch


# ---------------------------------------------------------------- on a loaded model

FULL, SLIDING = "full_attention", "sliding_attention"
CHECK_WINDOW = 8  # the sliding window the check runs with: shorter than its pair, so the pair exercises it
CONFIDENCE = 4.0  # lambda of the probabilistic bound: exceeded with probability < 2 exp(-lambda^2 / 2) = 7e-4
# A long chosen completion moves the rejected positions far from where two sequences put them.
CHECK_PAIR = ([[1, 5, 9, 13, 17]], [[2 + (7 * i) % 61 for i in range(32)]], [[3, 7, 11, 15]])


def text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


@dataclass(frozen=True)
class WindowLayout:
    """A sliding ``window`` in positions (None: none), and ``layer_types`` where only some layers slide."""

    window: int | None = None
    layer_types: tuple[str, ...] | None = None


def window_layout(model) -> WindowLayout | str:
    """The sliding window as transformers 5 applies it to two sequences with a 2-D mask, or why the shared mask
    cannot say it (a str).

    ``config.layer_types`` names each layer's mask ("sliding_attention" layers get the window: Qwen2 with
    use_sliding_window past max_window_layers, Gemma 2/3's alternating layers); a model without it (Mistral,
    Mixtral, Phi-3, Starcoder2) slides every layer when ``config.sliding_window`` is set.
    """
    cfg = text_config(model)
    types = getattr(cfg, "layer_types", None)
    kinds = set(types or ())
    if kinds - {FULL, SLIDING}:
        return f"its layers of type {sorted(kinds - {FULL, SLIDING})} are not steered by an attention mask alone"
    window = getattr(cfg, "sliding_window", None) or None
    if window is None or (types is not None and SLIDING not in kinds):
        return WindowLayout()
    return WindowLayout(window, None if types is None or kinds == {SLIDING} else tuple(sorted(kinds)))


def sharing_tolerance(logit_rms: torch.Tensor, num_layers: int, inner: int, dtype: torch.dtype) -> torch.Tensor:
    """The largest difference in a completion's summed log-prob that float rounding explains, between two runs of one
    model on the same tokens (shared layout vs two sequences; precompute's batches vs training's at step 0):

        tolerance = sum_t  2 * lambda * sqrt(L + 1) * (u + sqrt(n) * u32) * rms_v(z_t,v)        (lambda = 4)

    ``logit_rms`` [completions]: sum over the completion's tokens t of the root mean square of their logits z_t;
    L the decoder layers; n (``inner``) the longest inner product of a layer (the MLP's intermediate size);
    u the compute dtype's unit roundoff (eps / 2: bf16 2^-8, fp16 2^-11, fp32 2^-24), u32 float32's.

    Why: both runs do the same arithmetic on every token, grouped differently (other GEMM shapes, another SDPA
    kernel over other keys, other padding), so they differ by rounding only. A stage's matmuls accumulate in float32
    (GPU and CPU GEMM and SDPA kernels do) over at most n terms and round their output to the compute dtype: a
    relative error of at most sqrt(n) u32 + u with the probabilistic bound (Higham & Mary, SIAM J. Sci. Comput.
    2019: a sum of k independent roundings stays within lambda sqrt(k) u, except with probability
    < 2 exp(-lambda^2 / 2) = 7e-4). The residual stream takes L + 1 such updates (L layers, the final norm),
    again independent: lambda sqrt(L + 1) of them, relative to the hidden state. The logits are linear in the
    hidden state and inherit that relative error, |dz_v| <= lambda sqrt(L + 1) (u + sqrt(n) u32) rms(z); and
    log-softmax is 2-Lipschitz in the max norm (|d logp_y| <= |dz_y| + max_v |dz_v|), hence the 2. A
    completion's tokens may err with one sign, so their bounds add: linear in the token count. A worst-case
    bound (n u per matmul, L u over the layers) is so loose in bf16 that it would pass a mask that leaks chosen
    tokens into rejected ones.
    """
    u, u32 = torch.finfo(dtype).eps / 2, torch.finfo(torch.float32).eps / 2
    return 2 * CONFIDENCE * math.sqrt(num_layers + 1) * (u + math.sqrt(inner) * u32) * logit_rms


def model_tolerance(model, logit_rms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`sharing_tolerance` for ``model`` (its depth and widest inner product, from its text config)."""
    cfg = text_config(model)
    inner = max(cfg.hidden_size, getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size)
    return sharing_tolerance(logit_rms, cfg.num_hidden_layers, inner, dtype)


@dataclass(frozen=True)
class CheckResult:
    works: bool
    detail: str  # why not, or the measured difference and the bound


def check(model, dtype: torch.dtype, layout: WindowLayout) -> CheckResult:
    """Does this model score [prompt | chosen | rejected] under a 4-D mask as it scores two sequences?

    Checked numerically on a small pair, so a model that ignores position_ids, 4-D masks or a per-layer mask
    dict, or an attention kernel that cannot take them, is caught rather than trusted. A sliding window runs
    shrunk to CHECK_WINDOW tokens (the model's config too, for the two-sequence side), so the pair tests it.
    """
    attention = getattr(model.config, "_attn_implementation", "sdpa")
    if attention not in ("sdpa", "eager"):
        return CheckResult(False, f"attention {attention!r} cannot take a 4-D attention mask")
    dev = next(model.parameters()).device
    window = min(layout.window, CHECK_WINDOW) if layout.window else None
    pairs = collate_pairs(*CHECK_PAIR, pad_id=0)
    shared = collate_shared(*CHECK_PAIR, pad_id=0, mask_dtype=shared_mask_dtype(model, dtype), window=window,
                            layer_types=layout.layer_types)
    try:
        with _sliding_window(model, window), inference(model), autocast(dtype, dev):
            two_scores = batch_scores(model, batch_to(pairs, dev), rms=True)
            one = batch_logps(model, batch_to(shared, dev))
    except Exception as e:  # any model that rejects the inputs falls back to two sequences
        return CheckResult(False, f"it rejects the shared inputs ({type(e).__name__}: {str(e).strip()[:120]})")
    two, tolerance = two_scores["logps"], model_tolerance(model, two_scores["logit_rms"], dtype)
    difference = (one - two).abs()
    figures = (f"{difference.max().item():.2e} nats at most, float rounding explains {tolerance.min().item():.2e} "
               f"({str(dtype).removeprefix('torch.')}, {len(pairs['score_targets'])} tokens)")
    if bool(torch.isfinite(one).all() and (difference <= tolerance).all()):
        return CheckResult(True, f"shared and two-sequence log-probs differ by {figures}")
    return CheckResult(False, f"its shared-layout log-probs differ from two sequences by {figures}")


@contextmanager
def _sliding_window(model, window: int | None):
    """The model's config.sliding_window set to ``window`` (None: untouched) for the two-sequence side of the check."""
    cfg = text_config(model)
    saved = getattr(cfg, "sliding_window", None)
    if window is not None:
        cfg.sliding_window = window
    try:
        yield
    finally:
        if window is not None:
            cfg.sliding_window = saved


def shared_mask_dtype(model, dtype: torch.dtype) -> torch.dtype:
    """Boolean masks for SDPA (its fast kernels take them; an additive float mask is slower on CPU), additive
    masks in the compute dtype for eager attention."""
    return torch.bool if getattr(model.config, "_attn_implementation", None) == "sdpa" else dtype


def prefix_sharing(config: Config, model, dtype: torch.dtype) -> Sharing | None:
    """prefix_sharing: false -> None; true -> every batch (an error where the model cannot take the mask);
    auto -> the batches where it saves work, on a model that takes the mask (else None and one warning)."""
    if config.prefix_sharing is False:
        return None
    layout = window_layout(model)
    result = check(model, dtype, layout) if isinstance(layout, WindowLayout) else CheckResult(False, layout)
    name = f"{model.config.model_type!r} with attention {getattr(model.config, '_attn_implementation', None)!r}"
    if not result.works and config.prefix_sharing is True:
        raise DpoLeanError(f"config key 'prefix_sharing': true, but {name} cannot use the shared layout: "
                           f"{result.detail}; set it to auto")
    if not result.works:
        warnings.warn(f"prefix sharing: {name} cannot use the shared layout ({result.detail}); chosen and "
                      "rejected run as two sequences", stacklevel=2)
        return None
    launch.say(f"prefix sharing check: {result.detail}")
    cfg = text_config(model)
    hidden = cfg.hidden_size
    return Sharing(shared_mask_dtype(model, dtype), hidden, getattr(cfg, "intermediate_size", None) or 4 * hidden,
                   always=config.prefix_sharing is True, window=layout.window, layer_types=layout.layer_types)
