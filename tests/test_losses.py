"""Losses against values computed by hand (math module, written-out formulas).

kto_pair, orpo and simpo (LLaMA-Factory's, not in TRL 1.16), LF's pref_bco_weight, conservative DPO and WPO on the
losses TRL 1.16 cannot weight are checked here against plain float64 computations of LF's formulas; every other
loss and option is checked against TRL's own code in test_losses_trl.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpo_lean.losses import ld_logps, preference_loss, reward_stats, wpo_weights

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
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'"):
        loss(loss_type="dpo")


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


# ---------------------------------------------------------------- LLaMA-Factory's losses on random pairs

B = 12


@pytest.fixture
def pairs():
    """float64 pairs: summed log-probs in [-400, -20], 5 to 300 tokens, policy within a few nats of the reference."""
    g = torch.Generator().manual_seed(7)
    n = torch.randint(5, 301, (2, B), generator=g).double()
    pi = -20 - 380 * torch.rand(2, B, generator=g, dtype=torch.float64)
    ref = (pi + 3 * torch.randn(2, B, generator=g, dtype=torch.float64)).clamp(-400, -20)
    return pi[0], pi[1], ref[0], ref[1], n[0], n[1]


def _lists(*tensors):
    return [t.tolist() for t in tensors]


def _sigma(x):
    return 1 / (1 + math.exp(-x))


def test_kto_pair_is_lf_halos_eq7(pairs):
    beta = 0.3
    pw, pl, rw, rl, _, _ = _lists(*pairs)
    rho_w, rho_l = [a - b for a, b in zip(pw, rw)], [a - b for a, b in zip(pl, rl)]
    kl_w, kl_l = max(0.0, sum(rho_w) / B), max(0.0, sum(rho_l) / B)
    terms = [1 - _sigma(beta * (x - kl_l)) for x in rho_w] + [1 - _sigma(beta * (kl_w - x)) for x in rho_l]
    out = preference_loss(*pairs, loss_type="kto_pair", beta=beta)
    assert out.shape == (B,) and out.mean().item() == pytest.approx(sum(terms) / (2 * B), rel=1e-12)


def test_orpo_is_lf_odds_ratio_loss_on_length_averaged_logps(pairs):
    beta = 0.25
    pw, pl, _, _, nw, nl = _lists(*pairs)
    expected = []
    for a, b in zip([x / n for x, n in zip(pw, nw)], [x / n for x, n in zip(pl, nl)]):
        log_odds = (a - b) - (math.log(1 - math.exp(a)) - math.log(1 - math.exp(b)))
        expected.append(-a + beta * -math.log(_sigma(log_odds)))
    out = preference_loss(pairs[0], pairs[1], None, None, pairs[4], pairs[5], loss_type="orpo", beta=beta)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_simpo_is_lf_formula_with_gamma(pairs):
    beta, gamma = 2.0, 0.8
    pw, pl, _, _, nw, nl = _lists(*pairs)
    expected = [-math.log(_sigma(beta * ((a / m - b / k) - gamma / beta))) for a, b, m, k in zip(pw, pl, nw, nl)]
    out = preference_loss(pairs[0], pairs[1], None, None, pairs[4], pairs[5], loss_type="simpo", beta=beta,
                          simpo_gamma=gamma)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_reference_free_rewards_are_beta_times_length_averaged_logps(pairs):
    pw, pl, _, _, nw, nl = pairs
    stats = reward_stats(pw, pl, None, None, 0.5, nw, nl)
    assert stats["rewards/chosen"].tolist() == pytest.approx([0.5 * a / n for a, n in zip(pw.tolist(), nw.tolist())])
    assert stats["rewards/margins"].tolist() == pytest.approx(
        [0.5 * (a / m - b / k) for a, b, m, k in zip(*_lists(pw, pl, nw, nl))])


def test_bco_weight_mixes_lf_bco_term_with_its_baseline(pairs):
    beta, w, delta = 0.1, 0.4, 0.35
    pw, pl, rw, rl, _, _ = _lists(*pairs)
    expected = []
    for a, b, c, d in zip(pw, pl, rw, rl):
        dpo = -math.log(_sigma(beta * ((a - c) - (b - d))))
        bco = -math.log(_sigma(beta * (a - c) - delta)) - math.log(_sigma(-(beta * (b - d) - delta)))
        expected.append((dpo + w * bco) / (1 + w))
    out = preference_loss(*pairs, loss_type="sigmoid", beta=beta, bco_weight=w, bco_delta=delta)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_reward_baseline_is_the_running_mean_of_batch_means():
    from dpo_lean.objective import RewardBaseline

    baseline, seen = RewardBaseline(), []
    for batch in ([0.5], [-1.0, 0.25], [2.0]):  # one value per rank
        seen += batch
        assert baseline.update(torch.tensor(batch)) == pytest.approx(sum(seen) / len(seen))
    restored = RewardBaseline(**baseline.state()["args"])
    assert (restored.mean, restored.count) == (baseline.mean, 4)


def test_sigmoid_label_smoothing_is_conservative_dpo(pairs):
    beta, eps = 0.2, 0.15
    pw, pl, rw, rl, _, _ = _lists(*pairs)
    h = [(a - c) - (b - d) for a, b, c, d in zip(pw, pl, rw, rl)]
    expected = [-(1 - eps) * math.log(_sigma(beta * x)) - eps * math.log(_sigma(-beta * x)) for x in h]
    out = preference_loss(*pairs, loss_type="sigmoid", beta=beta, label_smoothing=eps)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["hinge", "sft"])
def test_wpo_weights_scale_the_losses_trl_cannot_weight(pairs, name):
    """TRL 1.16 fails on use_weighting with hinge (in-place on relu's output) and sft (in-place on an expanded
    scalar); the weighting is the same as for every other loss: each pair's term times exp(m_w) exp(m_l)."""
    beta = 0.5
    pw, pl, rw, rl, nw, _ = _lists(*pairs)
    m_w, m_l = -0.1 * torch.arange(B, dtype=torch.float64), -0.05 * torch.arange(B, dtype=torch.float64)
    w = [math.exp(a) * math.exp(b) for a, b in zip(m_w.tolist(), m_l.tolist())]
    if name == "hinge":
        base = [max(0.0, 1 - beta * ((a - c) - (b - d))) for a, b, c, d in zip(pw, pl, rw, rl)]
    else:
        base = [-sum(pw) / sum(nw)] * B
    out = preference_loss(*pairs, loss_type=name, beta=beta, pair_weights=wpo_weights(m_w, m_l))
    expected = [x * y for x, y in zip(base, w)]
    assert out.mean().item() == pytest.approx(sum(expected) / B, rel=1e-12)


def test_sft_is_the_batch_mean_nll_per_token(pairs):
    pw, _, _, _, nw, _ = pairs
    out = preference_loss(*pairs, loss_type="sft")
    assert out.mean().item() == pytest.approx(-sum(pw.tolist()) / sum(nw.tolist()), rel=1e-12)
    (grad,) = torch.autograd.grad(preference_loss(pw.requires_grad_(True), *pairs[1:], loss_type="sft").mean(), pw)
    assert grad.tolist() == pytest.approx([-1 / sum(nw.tolist())] * B)  # each chosen token weighs alike


def test_ld_logps_reweights_the_tail():
    total, tail = torch.tensor([-30.0, -12.0]), torch.tensor([-10.0, 0.0])
    torch.testing.assert_close(ld_logps(total, tail, 0.25), torch.tensor([-20.0 - 2.5, -12.0]))
