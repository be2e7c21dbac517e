"""Every preference loss by name, and what each needs: the rules config.py validates and losses/ implements.

No torch here, so the config (and `dpo-lean keys`) can use it without loading torch.
"""

from __future__ import annotations

import difflib

from .errors import DpoLeanError

# TRL 1.16's DPOConfig.loss_type values, in TRL's order, then LLaMA-Factory 0.9.5's pref_loss values TRL lacks.
TRL_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
LF_ONLY_LOSSES = ("kto_pair", "orpo", "simpo")
PREF_LOSSES = TRL_LOSSES + LF_ONLY_LOSSES

# Losses of the policy alone: a run of orpo or simpo, alone or with sft, needs no reference cache. sft alone is
# TRL's sft loss type in a DPO run: it logs TRL's rewards against the reference, so it reads the cache.
REFERENCE_FREE = frozenset({"orpo", "simpo"})
POLICY_ONLY = REFERENCE_FREE | {"sft"}
# Losses that read label smoothing: conservative DPO on sigmoid (LLaMA-Factory's meaning; TRL 1.16's sigmoid
# ignores it), TRL's robust, exo_pair (which needs it > 0), aot and aot_unpaired.
LABEL_SMOOTHING = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"})
# TRL 1.16 accepts a non-default f-divergence only when every loss is one of these.
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# WPO weights are per pair; these sort pairs across the batch, so TRL refuses the weighting with them.
NO_WEIGHTING = frozenset({"aot", "aot_unpaired"})
# Defined over the whole batch rather than pair by pair (the per-pair values' mean is the batch loss).
BATCH_LEVEL = frozenset({"sft", "aot", "aot_unpaired", "kto_pair"})


def parse_losses(value: str) -> list[str]:
    """'sigmoid, bco_pair,sft' -> ['sigmoid', 'bco_pair', 'sft']."""
    return [name.strip() for name in value.split(",") if name.strip()]


def needs_reference(losses: list[str]) -> bool:
    return not (set(losses) <= POLICY_ONLY and set(losses) & REFERENCE_FREE)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_loss_keys(c) -> None:
    """pref_loss names, their weights, and the options that only some losses take (TRL's and LF's rules)."""
    names = c.pref_losses
    for name in names:
        if name not in PREF_LOSSES:
            close = difflib.get_close_matches(name, PREF_LOSSES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DpoLeanError(f"config key 'pref_loss': {_short(name)} is not supported; choose one or a comma list "
                               f"of: {', '.join(PREF_LOSSES)}{hint}")
    if not names or len(set(names)) < len(names):
        raise DpoLeanError(f"config key 'pref_loss': {_short(c.pref_loss)} must name each loss once")
    weights = c.pref_loss_weight_values
    if weights is not None and len(weights) != len(names):
        raise DpoLeanError(f"config key 'pref_loss_weights': {len(weights)} weights for {len(names)} losses "
                           f"({c.pref_loss}); give one per loss")
    if c.dpo_label_smoothing > 0 and not LABEL_SMOOTHING & set(names):
        raise DpoLeanError(f"config key 'dpo_label_smoothing' works with pref_loss {', '.join(sorted(LABEL_SMOOTHING))} "
                           f"only (got {c.pref_loss})")
    if "exo_pair" in names and c.dpo_label_smoothing == 0:
        raise DpoLeanError("pref_loss exo_pair needs dpo_label_smoothing > 0 (its label smoothing eps; the EXO paper "
                           "suggests 1e-3)")
    if c.pref_f_divergence != "reverse_kl" and not set(names) <= F_DIVERGENCE_LOSSES:
        raise DpoLeanError(f"config key 'pref_f_divergence': {c.pref_f_divergence} works with pref_loss "
                           f"{', '.join(sorted(F_DIVERGENCE_LOSSES))} only (got {c.pref_loss})")
    if c.pref_use_weighting and NO_WEIGHTING & set(names):
        raise DpoLeanError(f"config key 'pref_use_weighting' cannot weight {', '.join(sorted(NO_WEIGHTING & set(names)))}: "
                           "they sort pairs across the batch, so per-pair weights would not line up")
    if c.pref_bco_weight > 0 and not c.needs_reference:
        raise DpoLeanError(f"config key 'pref_bco_weight' needs a loss against the reference; pref_loss {c.pref_loss} "
                           f"is reference-free ({', '.join(sorted(REFERENCE_FREE))})")
