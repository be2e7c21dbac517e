"""Losses against values computed by hand (math module, written-out formulas)."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_lean.losses import preference_loss, reward_stats

# One pair, numbers chosen so every term is easy to follow:
# policy chosen -10, rejected -14; reference chosen -11, rejected -12; 4 and 5 completion tokens.
PI_W, PI_L, REF_W, REF_L, N_W, N_L = -10.0, -14.0, -11.0, -12.0, 4.0, 5.0
H = (PI_W - REF_W) - (PI_L - REF_L)  # 1 - (-2) = 3


def loss(**kw):
    t = lambda v: torch.tensor([v])  # noqa: E731
    return preference_loss(t(PI_W), t(PI_L), t(REF_W), t(REF_L), t(N_W), t(N_L), **kw).item()


def test_sigmoid_is_minus_log_sigmoid_of_beta_margin():
    assert loss(loss_type="sigmoid", beta=0.1) == pytest.approx(math.log(1 + math.exp(-0.3)), abs=1e-6)


def test_sigmoid_at_equal_policy_and_reference_is_ln2():
    t = torch.tensor([-5.0, -7.0])
    out = preference_loss(t, t, t, t, torch.ones(2), torch.ones(2), loss_type="sigmoid", beta=0.1)
    torch.testing.assert_close(out, torch.full((2,), math.log(2)))


def test_label_smoothing_mixes_both_directions():
    eps, z = 0.1, 0.5 * H
    expected = (1 - eps) * math.log(1 + math.exp(-z)) + eps * math.log(1 + math.exp(z))
    assert loss(loss_type="sigmoid", beta=0.5, label_smoothing=eps) == pytest.approx(expected, abs=1e-6)


def test_hinge():
    assert loss(loss_type="hinge", beta=0.1) == pytest.approx(1 - 0.3, abs=1e-6)  # max(0, 1 - 0.1 * 3)
    assert loss(loss_type="hinge", beta=0.5) == 0.0  # 1 - 1.5 < 0


def test_ipo_uses_length_averaged_log_ratios():
    h_avg = (PI_W - REF_W) / N_W - (PI_L - REF_L) / N_L  # 0.25 + 0.4 = 0.65
    assert loss(loss_type="ipo", beta=0.1) == pytest.approx((h_avg - 1 / 0.2) ** 2, abs=1e-5)


def test_ftx_adds_mean_chosen_nll():
    base = math.log(1 + math.exp(-0.3))
    assert loss(loss_type="sigmoid", beta=0.1, ftx=0.5) == pytest.approx(base + 0.5 * (10.0 / 4.0), abs=1e-6)


def test_unknown_loss_type_raises():
    with pytest.raises(ValueError):
        loss(loss_type="orpo")


def test_reward_stats():
    t = lambda *v: torch.tensor(v)  # noqa: E731
    stats = reward_stats(t(PI_W, -3.0), t(PI_L, -3.0), t(REF_W, -3.0), t(REF_L, -3.0), beta=0.1)
    torch.testing.assert_close(stats["rewards/chosen"], t(0.1, 0.0))
    torch.testing.assert_close(stats["rewards/rejected"], t(-0.2, 0.0))
    torch.testing.assert_close(stats["rewards/margins"], t(0.3, 0.0))
    torch.testing.assert_close(stats["rewards/accuracies"], t(1.0, 0.5))  # a tie counts half


def test_gradient_pushes_chosen_up_and_rejected_down():
    pi_w = torch.tensor([-10.0], requires_grad=True)
    pi_l = torch.tensor([-14.0], requires_grad=True)
    preference_loss(pi_w, pi_l, torch.tensor([REF_W]), torch.tensor([REF_L]), torch.ones(1), torch.ones(1),
                    loss_type="sigmoid", beta=0.1).sum().backward()
    # d/d pi_w of -log sigma(beta h) = -beta sigma(-beta h)
    assert pi_w.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.3)), abs=1e-6)
    assert pi_l.grad.item() == pytest.approx(0.1 / (1 + math.exp(0.3)), abs=1e-6)
