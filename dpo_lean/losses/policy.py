"""Losses of the policy alone (no reference): ORPO, SimPO, and the two SFT terms.

    a_w = pi_w / n_w,  a_l = pi_l / n_l      length-averaged policy log-probs (what LLaMA-Factory feeds ORPO/SimPO)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def orpo_loss(a_w: torch.Tensor, a_l: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024, arXiv:2403.07691), as LLaMA-Factory computes it (beta = lambda, its OR weight):

        log_odds = (a_w - a_l) - (log(1 - exp(a_w)) - log(1 - exp(a_l)))
        loss = -a_w + beta (-log sigma(log_odds))
    """
    log_odds = (a_w - a_l) - (torch.log1p(-torch.exp(a_w)) - torch.log1p(-torch.exp(a_l)))
    return -a_w - beta * F.logsigmoid(log_odds)


def simpo_loss(a_w: torch.Tensor, a_l: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024, arXiv:2405.14734), gamma = the target reward margin (LF's simpo_gamma):

        loss = -log sigma(beta (a_w - a_l) - gamma)
    """
    return -F.logsigmoid(beta * ((a_w - a_l) - gamma / beta))


def sft_loss(pi_w: torch.Tensor, n_w: torch.Tensor) -> torch.Tensor:
    """TRL's sft loss type: the negative log-likelihood per chosen token over the whole batch (batch-level),

        loss = -sum_batch pi_w / sum_batch n_w

    returned as that one value for every pair (so the mean is it, and WPO weights scale it as in TRL).
    """
    return (-pi_w.sum() / n_w.sum()).expand(pi_w.shape[0])


def ftx_loss(pi_w: torch.Tensor, n_w: torch.Tensor) -> torch.Tensor:
    """LLaMA-Factory's pref_ftx term, pair by pair: the mean negative log-likelihood per chosen token, -pi_w / n_w."""
    return -pi_w / n_w
