"""Preference losses as pure functions of policy and reference log-probs.

Notation, per pair: pi_w, pi_l = policy log-probs of chosen (w) and rejected (l) completions (summed
over their tokens); ref_w, ref_l = the same under the reference; n_w, n_l = completion token counts.
    h = (pi_w - ref_w) - (pi_l - ref_l)          the log-ratio margin
    rewards: r_w = beta (pi_w - ref_w),  r_l = beta (pi_l - ref_l)
Every function returns per-pair losses [B]; the trainer takes the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023); with label smoothing eps, conservative DPO (Mitchell 2023):

        loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    """
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-HF hinge (Zhao et al. 2023):  loss = max(0, 1 - beta h)."""
    return torch.relu(1 - beta * h)


def ipo_loss(h_avg: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023) on length-averaged log-ratios, as TRL computes it:

        h_avg = (pi_w - ref_w) / n_w - (pi_l - ref_l) / n_l,   loss = (h_avg - 1 / (2 beta))^2
    """
    return (h_avg - 1 / (2 * beta)) ** 2


def sft_loss(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """LLaMA-Factory's pref_ftx term: mean negative log-likelihood per chosen token, -pi_w / n_w."""
    return -policy_chosen / chosen_tokens


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, *,
                    loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                    ftx: float = 0.0) -> torch.Tensor:
    """Per-pair loss for ``loss_type`` in {sigmoid, hinge, ipo}, plus ``ftx`` x the SFT term."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        loss = sigmoid_loss(chosen_ratio - rejected_ratio, beta, label_smoothing)
    elif loss_type == "hinge":
        loss = hinge_loss(chosen_ratio - rejected_ratio, beta)
    elif loss_type == "ipo":
        loss = ipo_loss(chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens, beta)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if ftx:
        loss = loss + ftx * sft_loss(policy_chosen, chosen_tokens)
    return loss


def reward_stats(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, torch.Tensor]:
    """TRL's reward metrics per pair. Accuracy counts a tie (equal rewards, as at step 0) as half."""
    chosen = beta * (policy_chosen - ref_chosen).detach()
    rejected = beta * (policy_rejected - ref_rejected).detach()
    accuracy = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/accuracies": accuracy,
            "rewards/margins": chosen - rejected}
