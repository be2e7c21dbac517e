"""Loading the base model (4-bit NF4 or plain dtype), the LoRA policy, and the tokenizer.

The reference (precompute) and the policy's base (train) come from :func:`load_base_model`, so by
default they are numerically the same model and the step-0 loss is ln 2.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from .config import Config
from .data.collate import Sharing, collate_pairs, collate_shared
from .data.templates import prepare_tokenizer
from .errors import DpoLeanError

ATTN_IMPLEMENTATIONS = {"auto": None, "sdpa": "sdpa", "eager": "eager", "disabled": "eager",
                        "fa2": "flash_attention_2"}


def device() -> torch.device:
    """This process's device: its local GPU under torchrun/accelerate, else GPU 0, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def compute_dtype(config: Config, dev: torch.device, precision: str = "base") -> torch.dtype:
    """float32 on CPU; on GPU bf16/fp16 as the config (or an explicit reference precision) asks."""
    if precision in ("bf16", "fp16", "fp32"):
        wanted = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        return torch.float32 if dev.type == "cpu" and wanted is torch.float16 else wanted
    if dev.type == "cpu":
        return torch.float32
    return torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32


def load_tokenizer(config: Config):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            config.model_name_or_path, revision=config.model_revision, cache_dir=config.cache_dir,
            trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as e:
        raise DpoLeanError(f"config key 'model_name_or_path': cannot load a tokenizer from "
                           f"{config.model_name_or_path!r} ({_first_line(e)})") from None
    prepare_tokenizer(tokenizer, config)  # the template's fix-ups (LLaMA-Factory's EOS, pad, stop words)
    return tokenizer


def quantization_config(config: Config, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.quantization_type,
                              bnb_4bit_use_double_quant=config.double_quantization, bnb_4bit_compute_dtype=dtype)


def load_base_model(config: Config, reference: bool = False):
    """The base model as the config describes it, frozen, dropout off, output head deferred for chunked log-probs.

    ``reference=True`` applies ``ref_precision``: "base" loads exactly what the policy's base is.
    """
    from transformers import AutoModelForCausalLM

    dev = device()
    precision = config.ref_precision if reference else "base"
    dtype = compute_dtype(config, dev, precision)
    quantized = config.quantization_bit == 4 and precision == "base"
    kwargs = dict(revision=config.model_revision, cache_dir=config.cache_dir, dtype=dtype,
                  trust_remote_code=config.trust_remote_code,
                  attn_implementation=ATTN_IMPLEMENTATIONS[config.flash_attn])
    if config.use_safetensors_only:
        kwargs["use_safetensors"] = True
    if quantized:
        kwargs["quantization_config"] = quantization_config(config, dtype)
    if dev.type == "cuda":
        kwargs["device_map"] = {"": dev.index}
    try:
        model = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        msg = _first_line(e)
        hint = (" (set use_safetensors_only: false only if you trust its pickle weights)"
                if "safetensors" in msg.lower() else "")
        raise DpoLeanError(f"config key 'model_name_or_path': cannot load {config.model_name_or_path!r}: "
                           f"{msg}{hint}") from None
    model.requires_grad_(False)
    disable_dropout(model)
    keep_4bit_on_training_kernel(model)
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in the base model (as TRL's disable_dropout), so the policy at step 0 is the reference."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def _force_training_kernel(module: nn.Module, args) -> None:
    module.training = True


def keep_4bit_on_training_kernel(model: nn.Module) -> None:
    """Keep every bitsandbytes 4-bit layer on its training kernel, even under model.eval().

    On x86 CPUs (bitsandbytes 0.50) a 4-bit layer whose no-grad forward runs with training=False repacks
    its weight for good into an inference layout: results differ (up to ~0.2 nats per sequence) and the
    model can no longer be trained. Precompute, training and evaluation must share one numeric path, so
    the 4-bit layers always see training=True; dropout elsewhere still follows train()/eval().
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # bitsandbytes absent: no 4-bit layers to guard
        return
    for m in model.modules():
        if isinstance(m, Linear4bit) and not getattr(m, "_dpo_lean_pinned", False):
            m.register_forward_pre_hook(_force_training_kernel)
            m._dpo_lean_pinned = True


class DeferredHead(nn.Module):
    """Stands in for the output head: passes hidden states through; logprobs applies ``head`` in chunks."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def defer_output_head(model) -> None:
    """Make ``model(...).logits`` the final hidden states, so no [batch, seq, vocab] tensor is built."""
    head = model.get_output_embeddings()
    if isinstance(head, DeferredHead):
        return
    if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
        raise DpoLeanError(f"model {model.config.model_type!r} post-processes its logits (softcapping or "
                           "scaling), which dpo-lean's chunked log-probs do not support yet")
    if not isinstance(head, nn.Linear):
        raise DpoLeanError(f"model {model.config.model_type!r}: its output head is a {type(head).__name__}, "
                           "not a linear layer; dpo-lean cannot compute its log-probs in chunks")
    model.set_output_embeddings(DeferredHead(head))


def prepare_reference(config: Config):
    model = load_base_model(config, reference=True)
    defer_output_head(model)
    model.eval()
    return model


def prepare_policy(config: Config):
    """4-bit (or plain) base + LoRA adapters, gradient checkpointing, head deferred; no reference anywhere."""
    from peft import LoraConfig, get_peft_model

    if "lm_head" in config.lora_target_modules:
        raise DpoLeanError("config key 'lora_target': lm_head cannot take LoRA in dpo-lean (its log-probs are "
                           "computed in chunks from the frozen head); remove it")
    base = load_base_model(config)
    if not config.disable_gradient_checkpointing:
        enable_checkpointing(base)
    base.config.use_cache = False
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.resolved_lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)  # LoRA A init
    try:
        with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(base, lora)
    except ValueError as e:
        raise DpoLeanError(f"config key 'lora_target': {config.lora_target!r} ({_first_line(e)})") from None
    defer_output_head(model)
    keep_4bit_on_training_kernel(model)
    return model


def enable_checkpointing(model) -> None:
    """Gradient (activation) checkpointing, non-reentrant: inputs need not require grad."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.22 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prefix_sharing_works(model, dtype: torch.dtype) -> bool:
    """Does this model score [prompt | chosen | rejected] under a 4-D mask as it scores two sequences?

    Checked numerically on a small pair, so a model that ignores position_ids or 4-D masks, or an
    attention kernel that cannot take them, is caught rather than trusted.
    """
    from .logprobs import batch_logps

    if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    dev = next(model.parameters()).device
    # A long chosen completion moves the rejected positions far from where two sequences put them.
    pair = ([[1, 5, 9, 13, 17]], [[2 + (7 * i) % 61 for i in range(32)]], [[3, 7, 11, 15]])
    try:
        with inference(model):
            two = batch_logps(model, batch_to(collate_pairs(*pair, pad_id=0), dev))
            one = batch_logps(model, batch_to(collate_shared(*pair, pad_id=0,
                                                        mask_dtype=shared_mask_dtype(model, dtype)), dev))
    except Exception:  # any model that rejects the inputs falls back to two sequences
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    return bool(torch.isfinite(one).all() and (one - two).abs().max() < tolerance)


def shared_mask_dtype(model, dtype: torch.dtype) -> torch.dtype:
    """Boolean masks for SDPA (its fast kernels take them; an additive float mask is slower on CPU), additive
    masks in the compute dtype for eager attention."""
    return torch.bool if getattr(model.config, "_attn_implementation", None) == "sdpa" else dtype


def batch_to(batch: dict, dev: torch.device) -> dict:
    """The batch's tensors on ``dev`` (counts and other plain values as they are)."""
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def prefix_sharing(config: Config, model, dtype: torch.dtype) -> Sharing | None:
    """prefix_sharing: false -> None; true -> every batch (an error where the model cannot take the mask);
    auto -> the batches where it saves work, on a model that takes the mask (else None and one warning)."""
    if config.prefix_sharing is False:
        return None
    works = prefix_sharing_works(model, dtype)
    if not works and config.prefix_sharing is True:
        raise DpoLeanError(f"config key 'prefix_sharing': true, but {model.config.model_type!r} with attention "
                           f"{model.config._attn_implementation!r} cannot take a 4-D attention mask; set it to auto")
    if not works:
        warnings.warn(f"prefix sharing: {model.config.model_type!r} cannot take a 4-D attention mask; chosen and "
                      "rejected run as two sequences", stacklevel=2)
        return None
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = cfg.hidden_size
    return Sharing(shared_mask_dtype(model, dtype), hidden, getattr(cfg, "intermediate_size", None) or 4 * hidden,
                   always=config.prefix_sharing is True)


@contextmanager
def inference(model):
    """No-grad, dropout-off forward on the training numeric path (4-bit layers stay on the training kernel)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def autocast(dtype: torch.dtype, dev: torch.device):
    """The mixed-precision context the Trainer uses for ``dtype`` (none in float32 or on CPU)."""
    if dev.type == "cpu" or dtype is torch.float32:
        return torch.autocast(dev.type, enabled=False)
    return torch.autocast(dev.type, dtype=dtype)


def reference_spec(config: Config) -> dict:
    """How the reference is loaded, for the cache fingerprint: precision, quantisation, compute dtype."""
    dev = device()
    precision = config.ref_precision
    quantized = config.quantization_bit == 4 and precision == "base"
    return {"precision": precision,
            "quantization": (f"{config.quantization_type}{'-dq' if config.double_quantization else ''}"
                             if quantized else None),
            "dtype": str(compute_dtype(config, dev, precision)).removeprefix("torch.")}
