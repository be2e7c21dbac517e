"""Model families: what each needs so that dpo-lean scores it as transformers does, read from its config.

    model_config(config, name, key)   # config.json (AutoConfig, no weights): a family dpo-lean cannot train is
                                      # refused here, before any model loads
    attention_implementation(...)     # the attention kernel: eager for attention softcapping (Gemma 2)
    disable_dropout(model)            # every training-only noise off, modules and config values alike
    no_router_loss(model)             # an MoE's router loss off: it never joins the DPO loss (as in LF)

modeling.defer_output_head handles the output head's own post-processing (logit scales, final-logit softcapping).
docs/models.md lists the families and their status; tests/test_families.py checks each on a tiny model.
"""

from __future__ import annotations

import re

from torch import nn

from .config import Config
from .errors import DpoLeanError

ATTN_IMPLEMENTATIONS = {"auto": None, "sdpa": "sdpa", "eager": "eager", "disabled": "eager",
                        "fa2": "flash_attention_2"}
TRAINING_NOISE = re.compile(r"dropout|pdrop|drop_path", re.IGNORECASE)  # the names dropout rates go by


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def model_config(config: Config, name: str, key: str):
    """The config.json of model ``name`` (named by config key ``key``), read with AutoConfig (no weights), refused in
    one line where dpo-lean cannot train its family: an encoder-decoder model."""
    from transformers import AutoConfig

    try:
        loaded = AutoConfig.from_pretrained(name, revision=config.model_revision, cache_dir=config.cache_dir,
                                            trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as e:
        raise DpoLeanError(f"config key '{key}': cannot load {name!r}: {_first_line(e)}") from None
    if getattr(loaded, "is_encoder_decoder", False):
        raise DpoLeanError(f"config key '{key}': {name!r} is an encoder-decoder model ({loaded.model_type}); "
                           "dpo-lean trains decoder-only causal language models")
    return loaded


def attention_implementation(config: Config, loaded) -> str | None:
    """The attention kernel to load ``loaded`` (its config) with: flash_attn's, except for a model that softcaps its
    attention scores (Gemma 2's attn_logit_softcapping, s -> c * tanh(s / c)): auto gives it eager attention, which
    applies the cap before adding the mask (dpo-lean's shared 4-D mask included); SDPA has no softcap (transformers
    refuses it for Gemma 2 and raises where a softcap reaches it), so sdpa is refused; fa2 applies it in the kernel.
    """
    chosen = ATTN_IMPLEMENTATIONS[config.flash_attn]
    text = loaded.get_text_config() if hasattr(loaded, "get_text_config") else loaded
    cap = getattr(text, "attn_logit_softcapping", None)
    if cap and chosen == "sdpa":
        raise DpoLeanError(f"config key 'flash_attn': sdpa cannot apply {loaded.model_type}'s attention softcapping "
                           f"(attn_logit_softcapping: {cap}); use auto or eager (eager attention applies it) or fa2")
    return "eager" if cap and chosen is None else chosen


def held_configs(model: nn.Module) -> list:
    """Every config object the model's modules hold (the model's, a text config, ...), each once."""
    from transformers import PretrainedConfig

    found = {id(c): c for m in model.modules() if isinstance(c := getattr(m, "config", None), PretrainedConfig)}
    return list(found.values())


def no_router_loss(model: nn.Module) -> None:
    """A mixture-of-experts model's router logits and auxiliary loss off (output_router_logits: false in every
    config). The router loss never joins the DPO loss (as in LLaMA-Factory's DPO trainer, which reads only the
    logits), so computing it only costs time; and transformers' load-balancing loss reads the attention mask as
    [batch, seq], which the shared layout's 4-D mask is not."""
    for config in held_configs(model):
        if getattr(config, "output_router_logits", False):
            config.output_router_logits = False


def disable_dropout(model: nn.Module) -> None:
    """Every dropout off, in whatever form the family implements it, so the policy in training mode computes what the
    reference computed in eval mode (and the step-0 loss is ln 2):

    - dropout modules (p = 0), as TRL's and LLaMA-Factory's disable_dropout do;
    - rates a module keeps as a number and applies functionally (StarCoder2's and Seed-OSS's residual_dropout:
      ``F.dropout(x, p=self.residual_dropout, training=self.training)``), and the configs' own, which some modules
      read in their forward: every number in (0, 1] whose name says dropout (*dropout*, *pdrop*, *drop_path*:
      Phi's resid_pdrop) is set to 0. A dropout rate means nothing outside training, so this leaves the model's
      function (the reference's) as it is. Other names are left alone: a "jitter" is training noise in Mixtral's
      router but an epsilon of Phi-MoE's routing in eval too; training-only noise left on is what the step-0 check
      (step_zero.py) stops.

    Runs on the base model before any adapter, so LoRA's own dropout (lora_dropout) is left as configured.
    """
    holders = list(model.modules()) + held_configs(model)
    for holder in holders:
        if isinstance(holder, nn.modules.dropout._DropoutNd):
            holder.p = 0.0
        for name, value in list(vars(holder).items()):
            if (TRAINING_NOISE.search(name) and isinstance(value, (int, float)) and not isinstance(value, bool)
                    and 0 < value <= 1):
                setattr(holder, name, 0.0)


def check_quantised(model: nn.Module, key: str) -> None:
    """A 4-bit load must have quantised something: transformers' bitsandbytes integration replaces modules whose class
    is exactly nn.Linear, so a family whose linear layers subclass it (Falcon's FalconLinear) would load unquantised,
    in full precision, without a word. That is refused in one line."""
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        return
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.Linear)} - {"Linear"})
    raise DpoLeanError(f"config key 'quantization_bit': 4, but transformers quantised none of "
                       f"{model.config.model_type!r}'s layers (its linear layers are {', '.join(kinds) or 'not nn.Linear'}, "
                       f"which its bitsandbytes integration leaves as they are); set quantization_bit: null to train "
                       f"{key}'s model unquantised")
