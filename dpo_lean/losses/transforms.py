"""What the losses are fed: LD-DPO's reweighted log-probs, f-DPO's scores, WPO's pair weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ld_logps(total: torch.Tensor, tail: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO (Liu et al. 2024, "Length Desensitization in DPO", arXiv:2409.06411): a completion's log-prob with
    the tokens past the pair's shorter completion (its "verbose" tail) down-weighted by alpha in [0, 1]:

        logp_ld = logp(first min(n_w, n_l) tokens) + alpha logp(the rest) = total - (1 - alpha) tail
    """
    return total - (1 - alpha) * tail


def f_divergence_scores(logratios: torch.Tensor, kind: str = "reverse_kl", alpha_coef: float = 0.5) -> torch.Tensor:
    """f-DPO (Wang et al. 2023, "Beyond Reverse KL", arXiv:2309.16240): the score f'(u) of u = pi / ref that
    takes the log-ratio's place in the margin, rho = log u:

        reverse_kl        rho                          (standard DPO)
        forward_kl        1 - exp(-rho)
        js_divergence     log 2 + log sigma(rho)
        alpha_divergence  (exp((a - 1) rho) - 1) / (a - 1), a = alpha_coef; rho itself when a = 1

    As TRL, alpha_divergence clamps (a - 1) rho at 80 (exp stays finite) and treats |a - 1| < 1e-6 as a = 1.
    """
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        if abs(alpha_coef - 1.0) < 1e-6:
            return logratios
        t = torch.clamp((alpha_coef - 1.0) * logratios, max=80.0)
        return (torch.exp(t) - 1.0) / (alpha_coef - 1.0)
    raise ValueError(f"unknown f_divergence_type {kind!r}")


def wpo_weights(chosen_mean_aligned: torch.Tensor, rejected_mean_aligned: torch.Tensor) -> torch.Tensor:
    """WPO (Zhou et al. 2024, arXiv:2406.11827, eq. 2), TRL's length-normalised form: a pair's weight is

        w = exp(m_w) exp(m_l),   m = mean over the completion's tokens of (log p_t - log sum_v p_v^2)

    (log sum_v p_v^2 aligns each token's probability to the policy's own sampling distribution). The m are
    computed without gradient (logprobs.batch_scores), so w scales the loss but is not trained.
    """
    return torch.exp(chosen_mean_aligned.detach()) * torch.exp(rejected_mean_aligned.detach())
