"""The configured objective: a batch's completion scores -> per-pair losses and TRL's metrics, by the config.

    pi, tails, wpo = logprobs.batch_scores(policy, batch)            # what the config asks the batch for
    LD-DPO (ld_alpha):  pi, ref <- total - (1 - alpha) tail           # policy and reference alike, as TRL
    WPO (pref_use_weighting):  pair weights from wpo (no gradient)
    losses = preference_loss(pi_w, pi_l, ref_w, ref_l, n_w, n_l, **the config's loss options)

Policy and reference log-probs are float64 sums (logprobs, the cache), and the losses run in their inputs' dtype,
so pi - ref (and LD-DPO's reweighting) is formed in float64 for every loss: a log-ratio of a few nats is the
difference of two sums of thousands, where float32 would keep 1e-3 nats of rounding. The per-pair losses leave in
float32, the Trainer's loss dtype; the metrics stay float64.

Training, its evaluation and `dpo-lean evaluate` all score rows with :func:`pair_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .config import Config
from .losses import ld_logps, preference_loss, reward_stats, wpo_weights


def loss_options(config: Config) -> dict:
    """preference_loss's keyword arguments (TRL's names) from the config keys (LF's names, TRL's in LF's style)."""
    return {"loss_type": config.pref_losses, "loss_weights": config.pref_loss_weight_values,
            "beta": config.pref_beta, "label_smoothing": config.dpo_label_smoothing,
            "f_divergence_type": config.pref_f_divergence,
            "f_alpha_divergence_coef": config.pref_f_alpha_divergence_coef,
            "discopop_tau": config.pref_discopop_tau, "simpo_gamma": config.simpo_gamma,
            "bco_weight": config.pref_bco_weight, "ftx": config.pref_ftx}


def _reference(config: Config, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not config.needs_reference:
        return None, None
    ref_w, ref_l = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    if config.ld_alpha is not None:
        ref_w = ld_logps(ref_w, batch["ref_chosen_tail_logps"], config.ld_alpha)
        ref_l = ld_logps(ref_l, batch["ref_rejected_tail_logps"], config.ld_alpha)
    return ref_w, ref_l


def pair_metrics(config: Config, scores: dict[str, torch.Tensor], batch: dict,
                 bco_baseline: Callable[[torch.Tensor], float | torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses, float32 [B], and TRL's per-pair metrics (float64) from the policy's ``scores``
    (logprobs.completion_scores), computed in float64 (see the module docstring).

    ``bco_baseline``: called with the batch's mean reward (pref_bco_weight), returns the BCO term's delta.
    Reference-free runs (orpo, simpo, alone or with sft) log rewards and ``logps/*`` of length-averaged log-probs, as LF.
    """
    n = batch["num_pairs"]
    pi_w, pi_l = scores["logps"][:n], scores["logps"][n:]
    plain_w = pi_w
    if config.ld_alpha is not None:
        pi_w = ld_logps(pi_w, scores["tail_logps"][:n], config.ld_alpha)
        pi_l = ld_logps(pi_l, scores["tail_logps"][n:], config.ld_alpha)
    ref_w, ref_l = _reference(config, batch)
    n_w, n_l = batch["chosen_tokens"], batch["rejected_tokens"]
    weights = wpo_weights(scores["wpo_logps"][:n], scores["wpo_logps"][n:]) if config.pref_use_weighting else None
    stats = reward_stats(pi_w, pi_l, ref_w, ref_l, config.pref_beta, n_w, n_l)
    delta = 0.0
    if config.pref_bco_weight and bco_baseline is not None:
        delta = bco_baseline(torch.cat([stats["rewards/chosen"], stats["rewards/rejected"]]).mean())
    losses = preference_loss(pi_w, pi_l, ref_w, ref_l, n_w, n_l, **loss_options(config), bco_delta=delta,
                             pair_weights=weights, sft_chosen=plain_w)
    if config.needs_reference:
        stats["logps/chosen"], stats["logps/rejected"] = pi_w.detach(), pi_l.detach()
    else:
        stats["logps/chosen"], stats["logps/rejected"] = (pi_w / n_w).detach(), (pi_l / n_l).detach()
    return losses.float(), stats


class RewardBaseline(TrainerCallback, ExportableState):
    """LLaMA-Factory's BCO baseline delta (pref_bco_weight): the running mean of every training micro-batch's mean
    reward (over chosen and rejected, all ranks), updated before the batch uses it, as TRL's RunningMoments.
    Unlike LF, evaluation reads it without updating it. Saved in each checkpoint's trainer_state.json, so a
    resumed run goes on with the same delta."""

    def __init__(self, mean: float = 0.0, count: int = 0):
        self.mean, self.count = mean, count

    def update(self, batch_means: torch.Tensor) -> float:
        total = self.count + batch_means.numel()
        self.mean += (float(batch_means.sum()) - batch_means.numel() * self.mean) / total
        self.count = total
        return self.mean

    def state(self) -> dict:
        return {"args": {"mean": self.mean, "count": self.count}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)
        if saved:  # resumed from a checkpoint: go on from its value
            self.mean, self.count = saved["args"]["mean"], saved["args"]["count"]
        else:  # resumed from a checkpoint of a run without it: make room, so saving finds its entry
            state.stateful_callbacks[type(self).__name__] = self.state()
