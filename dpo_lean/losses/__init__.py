"""Preference losses as pure functions of policy and reference log-probs; ``preference_loss`` is the entry point.

Notation, per pair: pi_w, pi_l = policy log-probs of the chosen (w) and rejected (l) completion, summed over its
tokens; ref_w, ref_l = the same under the reference; n_w, n_l = completion token counts.

    rho = pi - ref                  log-ratios;  rewards r = beta rho (reference-free losses: beta pi / n)
    s = f'(exp rho)                 f-DPO scores (rho itself for the default reverse KL)
    delta = s_w - s_l,  delta_avg = s_w / n_w - s_l / n_l

The families (one module each): ``margin`` (functions of delta), ``separate`` (of rho_w and rho_l apart),
``policy`` (no reference: orpo, simpo, sft), ``transforms`` (LD-DPO log-probs, f-DPO scores, WPO weights).
Every function returns per-pair losses [B] whose mean is the batch loss; the batch-level ones (sft, aot,
aot_unpaired, kto_pair) say how in their docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from . import margin, policy, separate
from .transforms import f_divergence_scores, ld_logps, wpo_weights

__all__ = ["preference_loss", "reward_stats", "ld_logps", "wpo_weights", "LOSSES"]


@dataclass(frozen=True)
class LossOptions:
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5


@dataclass
class _Pairs:
    """The per-pair quantities the losses read, each computed on first use (reference-free losses never touch ref)."""

    pi_w: torch.Tensor
    pi_l: torch.Tensor
    ref_w: torch.Tensor | None
    ref_l: torch.Tensor | None
    n_w: torch.Tensor
    n_l: torch.Tensor
    nll_w: torch.Tensor  # the chosen log-prob the SFT terms read
    o: LossOptions

    @cached_property
    def rho_w(self):
        return self.pi_w - self.ref_w

    @cached_property
    def rho_l(self):
        return self.pi_l - self.ref_l

    @cached_property
    def s_w(self):
        return f_divergence_scores(self.rho_w, self.o.f_divergence_type, self.o.f_alpha_divergence_coef)

    @cached_property
    def s_l(self):
        return f_divergence_scores(self.rho_l, self.o.f_divergence_type, self.o.f_alpha_divergence_coef)

    @property
    def delta(self):
        return self.s_w - self.s_l

    @property
    def delta_avg(self):
        return self.s_w / self.n_w.clamp(min=1) - self.s_l / self.n_l.clamp(min=1)

    @property
    def a_w(self):
        return self.pi_w / self.n_w

    @property
    def a_l(self):
        return self.pi_l / self.n_l


LOSSES = {
    "sigmoid": lambda p, o: margin.sigmoid_loss(p.delta, o.beta, o.label_smoothing),
    "hinge": lambda p, o: margin.hinge_loss(p.delta, o.beta),
    "ipo": lambda p, o: margin.ipo_loss(p.delta_avg, o.beta),
    "exo_pair": lambda p, o: margin.exo_pair_loss(p.delta, o.beta, o.label_smoothing),
    "nca_pair": lambda p, o: separate.nca_pair_loss(o.beta * p.rho_w, o.beta * p.rho_l),
    "robust": lambda p, o: margin.robust_loss(p.delta, o.beta, o.label_smoothing),
    "bco_pair": lambda p, o: separate.bco_pair_loss(o.beta * p.rho_w, o.beta * p.rho_l),
    "sppo_hard": lambda p, o: separate.sppo_hard_loss(p.rho_w, p.rho_l, o.beta),
    "aot": lambda p, o: margin.aot_loss(p.pi_w - p.pi_l, p.ref_w - p.ref_l, o.beta, o.label_smoothing),
    "aot_unpaired": lambda p, o: margin.aot_unpaired_loss(p.rho_w, p.rho_l, o.beta, o.label_smoothing),
    "apo_zero": lambda p, o: separate.apo_zero_loss(o.beta * p.rho_w, o.beta * p.rho_l),
    "apo_down": lambda p, o: separate.apo_down_loss(o.beta * p.rho_w, o.beta * p.rho_l),
    "discopop": lambda p, o: margin.discopop_loss(p.delta, o.beta, o.discopop_tau),
    "sft": lambda p, o: policy.sft_loss(p.nll_w, p.n_w),
    "sigmoid_norm": lambda p, o: margin.sigmoid_norm_loss(p.delta_avg, o.beta),
    "kto_pair": lambda p, o: separate.kto_pair_loss(p.rho_w, p.rho_l, o.beta),
    "orpo": lambda p, o: policy.orpo_loss(p.a_w, p.a_l, o.beta),
    "simpo": lambda p, o: policy.simpo_loss(p.a_w, p.a_l, o.beta, o.simpo_gamma),
}


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, *,
                    loss_type: str | list[str] = "sigmoid", loss_weights: list[float] | None = None,
                    beta: float = 0.1, label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
                    f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05, simpo_gamma: float = 0.5,
                    bco_weight: float = 0.0, bco_delta: float | torch.Tensor = 0.0, ftx: float = 0.0,
                    pair_weights: torch.Tensor | None = None, sft_chosen: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair losses [B]: sum_k loss_weights[k] x LOSSES[loss_type[k]], TRL's combination (MPO = sigmoid 0.8 +
    bco_pair 0.2 + sft 1.0), each term scaled by ``pair_weights`` (WPO) when given. Then, as LLaMA-Factory:

        bco_weight w > 0:  loss = (loss + w bco_pair(delta = bco_delta)) / (1 + w)
        ftx > 0:           loss = loss + ftx (-pi_w / n_w)

    ``ref_chosen``/``ref_rejected`` may be None when every loss is reference-free (orpo, simpo, sft).
    ``sft_chosen``: the chosen log-prob sft and ftx read (default ``policy_chosen``; under LD-DPO the plain sum,
    as TRL's sft reads the unweighted token log-probs).
    """
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} loss_weights for {len(names)} loss types")
    options = LossOptions(beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau, simpo_gamma)
    nll_w = policy_chosen if sft_chosen is None else sft_chosen
    pairs = _Pairs(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, nll_w,
                   options)
    loss = 0.0
    for name, weight in zip(names, weights):
        if name not in LOSSES:
            raise ValueError(f"unknown loss_type {name!r}")
        term = LOSSES[name](pairs, options)
        loss = loss + weight * (term * pair_weights if pair_weights is not None else term)
    if bco_weight:
        bco = separate.bco_pair_loss(beta * pairs.rho_w, beta * pairs.rho_l, bco_delta)
        loss = (loss + bco_weight * bco) / (1 + bco_weight)
    if ftx:
        loss = loss + ftx * policy.ftx_loss(nll_w, chosen_tokens)
    return loss


def reward_stats(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
                 chosen_tokens=None, rejected_tokens=None) -> dict[str, torch.Tensor]:
    """TRL's reward metrics per pair: r = beta (pi - ref); without a reference (orpo, simpo, as LF and TRL's
    ORPO/CPO trainers log them) r = beta pi / n. Accuracy counts a tie (equal rewards, as at step 0) as half."""
    if ref_chosen is None:
        chosen = beta * (policy_chosen / chosen_tokens).detach()
        rejected = beta * (policy_rejected / rejected_tokens).detach()
    else:
        chosen = beta * (policy_chosen - ref_chosen).detach()
        rejected = beta * (policy_rejected - ref_rejected).detach()
    accuracy = (chosen > rejected).to(chosen.dtype) + 0.5 * (chosen == rejected).to(chosen.dtype)
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/accuracies": accuracy,
            "rewards/margins": chosen - rejected}
