"""Losses of the chosen-minus-rejected margin.

    delta = s_w - s_l                         s = the f-divergence score of each log-ratio (see transforms)
    delta_avg = s_w / n_w - s_l / n_l         the same on length-averaged scores

Each returns per-pair losses [B]; ``aot`` and ``aot_unpaired`` sort across the batch, so their i-th value
belongs to the i-th smallest margin rather than to pair i (only their mean, the batch loss, means anything).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290); with label smoothing eps, conservative DPO (Mitchell 2023,
    "A note on DPO with noisy preferences"), as LLaMA-Factory's dpo_label_smoothing:

        loss = -(1 - eps) log sigma(beta delta) - eps log sigma(-beta delta)

    TRL 1.16's sigmoid ignores label_smoothing; at eps = 0 the two agree.
    """
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-HF hinge (Zhao et al. 2023, arXiv:2305.10425):  loss = max(0, 1 - beta delta)."""
    return torch.relu(1 - beta * delta)


def ipo_loss(delta_avg: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17) on length-averaged scores, as TRL computes it:

        loss = (delta_avg - 1 / (2 beta))^2
    """
    return (delta_avg - 1 / (2 * beta)) ** 2


def robust_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), eps = the probability a label is flipped, in [0, 0.5):

        loss = [-(1 - eps) log sigma(beta delta) + eps log sigma(-beta delta)] / (1 - 2 eps)
    """
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)


def exo_pair_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024, arXiv:2402.00856, eq. 16): KL(q || p) between q = (sigma(beta delta),
    sigma(-beta delta)) and the smoothed labels p = (1 - eps, eps), eps > 0 (the paper suggests 1e-3):

        loss = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)
    """
    eps = torch.as_tensor(label_smoothing, dtype=delta.dtype, device=delta.device)
    z = beta * delta
    return (torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(eps)))


def discopop_loss(delta: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """DiscoPOP, log-ratio modulated loss (Lu et al. 2024, arXiv:2406.08414, eq. 5), z = beta delta:

        loss = (1 - sigma(z / tau)) (-log sigma(z)) + sigma(z / tau) exp(-z)
    """
    z = beta * delta
    mix = torch.sigmoid(z / tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def sigmoid_norm_loss(delta_avg: torch.Tensor, beta: float) -> torch.Tensor:
    """Length-normalised DPO (TRL's sigmoid_norm; as in Tulu 3, Lambert et al. 2024, arXiv:2411.15124):

        loss = -log sigma(beta delta_avg)
    """
    return -F.logsigmoid(beta * delta_avg)


def _smoothed_sigmoid(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def aot_loss(policy_margin: torch.Tensor, ref_margin: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): the batch's policy margins pi_w - pi_l and reference
    margins ref_w - ref_l each sorted, matched by rank (batch-level), then conservative DPO on the difference:

        d_(i) = sort(pi_w - pi_l)_i - sort(ref_w - ref_l)_i,
        loss_i = -(1 - eps) log sigma(beta d_(i)) - eps log sigma(-beta d_(i))
    """
    d = torch.sort(policy_margin, dim=0).values - torch.sort(ref_margin, dim=0).values
    return _smoothed_sigmoid(d, beta, label_smoothing)


def aot_unpaired_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024): the chosen and the rejected log-ratios each sorted over the batch:

        d_(i) = sort(rho_w)_i - sort(rho_l)_i,   loss_i as in aot_loss
    """
    d = torch.sort(chosen_logratios, dim=0).values - torch.sort(rejected_logratios, dim=0).values
    return _smoothed_sigmoid(d, beta, label_smoothing)
