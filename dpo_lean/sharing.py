"""Prefix sharing on a loaded model: may it score [prompt | chosen | rejected] as one sequence, and with which mask.

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
from .data.collate import Sharing, collate_pairs, collate_shared
from .errors import DpoLeanError
from .logprobs import batch_logps
from .modeling import autocast, batch_to, inference

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
    """The largest |shared - two sequences| in a completion's summed log-prob that float rounding explains:

        tolerance = sum_t  2 * lambda * sqrt(L + 1) * (u + sqrt(n) * u32) * rms_v(z_t,v)        (lambda = 4)

    ``logit_rms`` [completions]: sum over the completion's tokens t of the root mean square of their logits z_t;
    L the decoder layers; n (``inner``) the longest inner product of a layer (the MLP's intermediate size);
    u the compute dtype's unit roundoff (eps / 2: bf16 2^-8, fp16 2^-11, fp32 2^-24), u32 float32's.

    Why: both layouts do the same arithmetic on every token, grouped differently (other GEMM shapes, another
    SDPA kernel over other keys), so they differ by rounding only. A stage's matmuls accumulate in float32 (GPU
    and CPU GEMM and SDPA kernels do) over at most n terms and round their output to the compute dtype: a
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
            two = batch_logps(model, batch_to(pairs, dev))
            one = batch_logps(model, batch_to(shared, dev))
            rms = _logit_rms(model, batch_to(pairs, dev))
    except Exception as e:  # any model that rejects the inputs falls back to two sequences
        return CheckResult(False, f"it rejects the shared inputs ({type(e).__name__}: {str(e).strip()[:120]})")
    cfg = text_config(model)
    inner = max(cfg.hidden_size, getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size)
    tolerance = sharing_tolerance(rms, cfg.num_hidden_layers, inner, dtype)
    difference = (one - two).abs()
    figures = (f"{difference.max().item():.2e} nats at most, float rounding explains {tolerance.min().item():.2e} "
               f"({str(dtype).removeprefix('torch.')}, {len(pairs['score_targets'])} tokens)")
    if bool(torch.isfinite(one).all() and (difference <= tolerance).all()):
        return CheckResult(True, f"shared and two-sequence log-probs differ by {figures}")
    return CheckResult(False, f"its shared-layout log-probs differ from two sequences by {figures}")


def _logit_rms(model, batch: dict) -> torch.Tensor:
    """Per completion, the sum over its tokens of rms_v(logits): the scale rounding errors of the logits take."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    hidden = model(**inputs, use_cache=False).logits  # the head is deferred: final hidden states
    head = model.get_output_embeddings().head
    flat = hidden.reshape(-1, hidden.shape[-1])[batch["score_index"]]
    logits = (flat.to(head.weight.dtype) @ head.weight.t()).float()
    rms = logits.pow(2).mean(dim=-1).sqrt()
    return torch.zeros(2 * batch["num_pairs"], device=rms.device).index_add(0, batch["score_segment"], rms)


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
