"""Losses that treat the chosen and the rejected log-ratio separately (not only through their difference).

    rho_w = pi_w - ref_w,  rho_l = pi_l - ref_l      the log-ratios
    r_w = beta rho_w,      r_l = beta rho_l          the implicit rewards

Each returns per-pair losses [B]. ``kto_pair`` reads batch means, so a pair's value depends on its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nca_pair_loss(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """NCA, pairwise (Chen et al. 2024, arXiv:2402.05369):

        loss = -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l)
    """
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def bco_pair_loss(r_w: torch.Tensor, r_l: torch.Tensor, delta: float | torch.Tensor = 0.0) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024, arXiv:2404.04656), with reward baseline delta:

        loss = -log sigma(r_w - delta) - log sigma(-(r_l - delta))

    TRL 1.16's bco_pair has no baseline (delta = 0). LLaMA-Factory's pref_bco_weight term uses the running
    mean of the batch-mean rewards as delta (train.RewardBaseline keeps it).
    """
    return -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))


def sppo_hard_loss(rho_w: torch.Tensor, rho_l: torch.Tensor, beta: float) -> torch.Tensor:
    """SPPO with hard probabilities (Wu et al. 2024, arXiv:2405.00675, eq. 4.7 with P = 1 for the winner, 0 for the
    loser):   loss = (rho_w - 1 / (2 beta))^2 + (rho_l + 1 / (2 beta))^2
    """
    return (rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2


def apo_zero_loss(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7): raise chosen, lower rejected:

        loss = (1 - sigma(r_w)) + sigma(r_l)
    """
    return (1 - torch.sigmoid(r_w)) + torch.sigmoid(r_l)


def apo_down_loss(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): lower both, rejected more:

        loss = sigma(r_w) + (1 - sigma(r_w - r_l))
    """
    return torch.sigmoid(r_w) + (1 - torch.sigmoid(r_w - r_l))


def kto_pair_loss(rho_w: torch.Tensor, rho_l: torch.Tensor, beta: float) -> torch.Tensor:
    """KTO on pairs (Ethayarajh et al. 2024, arXiv:2402.01306, the HALOs eq. 7), LLaMA-Factory's kto_pair (the
    formula of TRL < 0.9, from which LF took it). The KL estimate of each side is the other side's batch mean
    log-ratio, clamped at 0 (batch-level):

        z_w = max(0, mean_batch rho_w),  z_l = max(0, mean_batch rho_l)
        loss = 1/2 [(1 - sigma(beta (rho_w - z_l))) + (1 - sigma(beta (z_w - rho_l)))]

    (the mean over the 2B chosen and rejected terms, written per pair).
    """
    z_w, z_l = rho_w.mean().clamp(min=0), rho_l.mean().clamp(min=0)
    return 0.5 * ((1 - torch.sigmoid(beta * (rho_w - z_l))) + (1 - torch.sigmoid(beta * (z_w - rho_l))))
