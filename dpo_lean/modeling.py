"""Loading the base model (4-bit NF4 or plain dtype), the LoRA policy, the reference, and the tokenizer.

The reference (precompute) and the policy (train) are built alike: :func:`load_base_model`, then the starting
adapters (adapters.py), so by default they are numerically the same model and the step-0 loss is ln 2. With
ref_model or ref_precision the reference is another model, which only precompute loads.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from . import adapters, launch, paths, sharding
from .config import Config
from .data.templates import prepare_tokenizer
from .errors import DpoLeanError
from .families import attention_implementation, check_quantised, disable_dropout, held_configs, model_config, no_router_loss
from .fingerprint import model_fingerprint
from .logprobs import float32_copy_notice


def device() -> torch.device:
    """This process's device: its local GPU under torchrun/accelerate, else GPU 0, else the CPU.

    A GPU is also made the current CUDA device, so what is allocated on "cuda" without an index (by
    bitsandbytes, NCCL, a library's scratch buffers) lands on this process's GPU, not on GPU 0.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank, count = launch.local_rank(), torch.cuda.device_count()
    if local_rank >= count:
        raise DpoLeanError(f"LOCAL_RANK={local_rank}, but this process sees {count} GPU(s) (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); launch at most {count} processes a machine")
    dev = torch.device("cuda", local_rank)
    torch.cuda.set_device(dev)
    return dev


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

    paths.check_local(config.model_name_or_path, "model_name_or_path", "model folder")
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
    """NF4 (or FP4) with the config's double quantisation; under FSDP the packed weights are stored in the compute
    dtype, so FSDP shards them as plain tensors (sharding.py)."""
    from transformers import BitsAndBytesConfig

    storage = {"bnb_4bit_quant_storage": dtype} if sharding.active(config) else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.quantization_type,
                              bnb_4bit_use_double_quant=config.double_quantization, bnb_4bit_compute_dtype=dtype,
                              **storage)


def base_weights(config: Config, reference: bool = False) -> tuple[str, str, bool, str]:
    """(name or path, the key naming it, 4-bit or not, precision) of the policy's base, or of the reference's:
    ref_model if set (4-bit only with ref_model_quantization_bit, as in LF), else the policy's base in ref_precision."""
    if not reference:
        return config.model_name_or_path, "model_name_or_path", config.quantization_bit == 4, "base"
    if config.ref_model:
        return config.ref_model, "ref_model", config.ref_model_quantization_bit == 4, config.ref_precision
    return (config.model_name_or_path, "model_name_or_path", config.quantization_bit == 4 and
            config.ref_precision == "base", config.ref_precision)


def load_base_model(config: Config, reference: bool = False):
    """The base model as the config describes it, frozen, dropout and router loss off, 4-bit layers pinned to the
    training kernel.

    ``reference=True``: the reference's base instead (:func:`base_weights`); with ref_precision "base" and no
    ref_model that is exactly the policy's base. Its config.json is read first (families.model_config), so a family
    dpo-lean cannot train is refused before any weights load.
    """
    from transformers import AutoModelForCausalLM

    dev = device()
    name, key, quantized, precision = base_weights(config, reference)
    dtype = compute_dtype(config, dev, precision)
    kwargs = dict(revision=config.model_revision, cache_dir=config.cache_dir, dtype=dtype,
                  trust_remote_code=config.trust_remote_code,
                  attn_implementation=attention_implementation(config, model_config(config, name, key)))
    if config.use_safetensors_only:
        kwargs["use_safetensors"] = True
    if quantized:
        kwargs["quantization_config"] = quantization_config(config, dtype)
    if dev.type == "cuda" and not sharding.active(config):  # FSDP moves each rank's shard to its GPU
        kwargs["device_map"] = {"": dev.index}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        msg = _first_line(e)
        hint = (" (set use_safetensors_only: false only if you trust its pickle weights)"
                if "safetensors" in msg.lower() else "")
        raise DpoLeanError(f"config key '{key}': cannot load {name!r}: {msg}{hint}") from None
    if quantized:
        check_quantised(model, key)
    model.requires_grad_(False)
    disable_dropout(model)
    no_router_loss(model)
    keep_4bit_on_training_kernel(model)
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


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
    """Stands in for the output head: passes hidden states through; logprobs applies ``head`` in chunks, then
    ``softcap`` (the model's final-logit softcapping, moved here from its forward; None for none)."""

    def __init__(self, head: nn.Module, softcap: float | None = None):
        super().__init__()
        self.head, self.softcap = head, softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    @property
    def weight(self) -> torch.Tensor:
        """The head's weight, so that whoever looks for a tie (accelerate's FSDP grouping, transformers'
        tie_weights) finds the embedding matrix a tied head shares."""
        return self.head.weight

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        self.head.weight = value


LOGIT_SCALES = ("logit_scale", "logits_scaling")  # Cohere's multiplier of the logits, Granite's divisor


def defer_output_head(model) -> None:
    """Make ``model(...).logits`` the final hidden states, so no [batch, seq, vocab] tensor is built.

    What the model's forward does to its logits after the head stays right: a logit scale (Cohere's logit_scale,
    Granite's logits_scaling) the forward now applies to the hidden states it returns, the same thing for a bias-free
    head; final-logit softcapping (Gemma 2/4: final_logit_softcapping c, y = c * tanh(z / c)) is taken out of the
    forward (the config's value set to None) and kept on the DeferredHead, which logprobs applies per chunk.
    """
    head = model.get_output_embeddings()
    if isinstance(head, DeferredHead):
        return
    name = model.config.model_type
    if not isinstance(head, nn.Linear):
        raise DpoLeanError(f"model {name!r}: its output head is a {type(head).__name__}, "
                           "not a linear layer; dpo-lean cannot compute its log-probs in chunks")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                                     torch.float64):
        raise DpoLeanError(f"model {name!r}: its output head is quantised ({type(head).__name__}, "
                           f"{getattr(weight, 'dtype', None)} weights); dpo-lean computes log-probs from a float head: "
                           "keep lm_head out of quantisation (as bitsandbytes does by default)")
    configs = held_configs(model)
    scale = next((f"{k}: {v}" for c in configs for k in LOGIT_SCALES if (v := getattr(c, k, None)) not in (None, 1)),
                 None)
    if scale and head.bias is not None:
        raise DpoLeanError(f"model {name!r} scales its logits ({scale}) after a biased output head, which the "
                           "deferred head cannot reproduce (the scale would miss the bias)")
    softcap = next((c.final_logit_softcapping for c in configs if getattr(c, "final_logit_softcapping", None)), None)
    for c in configs:
        if getattr(c, "final_logit_softcapping", None):
            c.final_logit_softcapping = None
    model.set_output_embeddings(DeferredHead(head, softcap))
    notice = float32_copy_notice(weight)
    if notice:
        launch.say(notice)


def prepare_reference(config: Config):
    """The reference, frozen, in eval mode, head deferred: the reference's base with its adapters."""
    model = adapters.apply(load_base_model(config, reference=True), adapters.reference_stack(config), config)
    defer_output_head(model)
    keep_4bit_on_training_kernel(model)
    model.eval()
    return model


def prepare_policy(config: Config):
    """The policy: the base (4-bit or plain) with the starting adapters merged, then the continued adapter or a new
    LoRA; gradient checkpointing, head deferred. No reference anywhere."""
    if "lm_head" in config.lora_target_modules:
        raise DpoLeanError("config key 'lora_target': lm_head cannot take LoRA in dpo-lean (its log-probs are "
                           "computed in chunks from the frozen head); remove it")
    stack = adapters.start_stack(config)
    base = load_base_model(config)
    if not config.disable_gradient_checkpointing:
        enable_checkpointing(base)
    base.config.use_cache = False
    all_linear = adapters.linear_names(base)
    model = adapters.apply(base, stack, config, trainable=True)
    if stack.top:
        notice = adapters.continuation_notice(config, stack.top, model.peft_config["default"], all_linear)
        if notice:
            launch.say(notice)
    else:
        model = _new_lora(config, model)
    defer_output_head(model)
    keep_4bit_on_training_kernel(model)
    return model


def _new_lora(config: Config, base):
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    targets = sorted(adapters.linear_names(base)) if targets == "all-linear" else targets
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.resolved_lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)  # LoRA A init
    try:
        with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(base, lora)
    except ValueError as e:
        raise DpoLeanError(f"config key 'lora_target': {config.lora_target!r} ({_first_line(e)})") from None
    return model


def enable_checkpointing(model) -> None:
    """Gradient (activation) checkpointing, non-reentrant: inputs need not require grad."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.22 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def batch_to(batch: dict, dev: torch.device) -> dict:
    """The batch's tensors on ``dev``, those in a dict too (a per-layer-type mask); counts and other plain values as
    they are."""
    def move(v):
        return v.to(dev) if isinstance(v, torch.Tensor) else batch_to(v, dev) if isinstance(v, dict) else v

    return {k: move(v) for k, v in batch.items()}


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


def _loading(config: Config, reference: bool) -> dict:
    _, _, quantized, precision = base_weights(config, reference)
    return {"quantization": (f"{config.quantization_type}{'-dq' if config.double_quantization else ''}"
                             if quantized else None),
            "dtype": str(compute_dtype(config, device(), precision)).removeprefix("torch.")}


def reference_spec(config: Config) -> dict:
    """How the reference is loaded, for the cache fingerprint: precision, quantisation, compute dtype; ref_model's
    fingerprint if set; its adapters' (the starting point's by default), when there are any."""
    spec = {"precision": config.ref_precision, **_loading(config, reference=True)}
    if config.ref_model:
        spec["model"] = model_fingerprint(config.ref_model, config.model_revision, config.cache_dir, "ref_model")
    return {**spec, **adapters.stack_fingerprint(adapters.reference_stack(config), config)}


def describe_reference(config: Config) -> str:
    """One line saying what the reference is, for precompute's output."""
    name, key, quantized, precision = base_weights(config, reference=True)
    stack = adapters.reference_stack(config)
    on = f" + {' + '.join(stack.paths)}" if stack.paths else ""
    how = f"{_loading(config, True)['dtype']}{', NF4' if quantized else ''}"
    start = " (the policy's starting point)" if reference_is_start(config) else ""
    return f"reference: {key} {name}{on}, {how}{start}"


def lf_reference_note(config: Config) -> str:
    """One line where this run's reference is not LLaMA-Factory's: when training continues an adapter of
    adapter_name_or_path and no ref_model is set, LF's reference is the policy with that adapter switched off (the
    base, with the adapters merged before it); dpo-lean's is the starting point, that adapter included."""
    stack = adapters.start_stack(config)
    if config.ref_model or stack.top is None:
        return ""
    lf = " + ".join([config.model_name_or_path, *stack.merged])
    keys = f"ref_model: {config.model_name_or_path}" + (f", ref_model_adapters: {','.join(stack.merged)}"
                                                         if stack.merged else "")
    keys += ", ref_model_quantization_bit: 4" if config.quantization_bit == 4 else ""
    return (f"reference: the starting point, {stack.top} included; LLaMA-Factory's reference here is {lf} without "
            f"it (the policy with its adapter switched off); {keys} makes it LF's")


def reference_is_start(config: Config) -> bool:
    """Is the reference the policy's starting point (same model, adapters, quantisation and dtype)?"""
    return not config.ref_model and _loading(config, True) == _loading(config, False)


def check_reference_tokenizer(config: Config, tokenizer) -> None:
    """ref_model must read token ids as the policy's tokenizer writes them: the same vocabulary, id for id."""
    from transformers import AutoTokenizer

    try:
        ref = AutoTokenizer.from_pretrained(config.ref_model, revision=config.model_revision,
                                            cache_dir=config.cache_dir, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as e:
        raise DpoLeanError(f"config key 'ref_model': cannot load a tokenizer from {config.ref_model!r} "
                           f"({_first_line(e)})") from None
    mine, theirs = tokenizer.get_vocab(), ref.get_vocab()
    if mine != theirs:
        differ = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda kv: kv[1])
        raise DpoLeanError(f"config key 'ref_model': {config.ref_model!r} has another tokenizer ({len(theirs)} tokens "
                           f"vs {len(mine)} in model_name_or_path's, first difference at id {differ[0][1]}); the "
                           "reference must share model_name_or_path's vocabulary")
