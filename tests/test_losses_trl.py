"""Every loss, mix and option against TRL 1.16's own code, on the same random inputs.

TRL's side is a real ``trl.DPOTrainer`` (``precompute_ref_log_probs=True``, built per case from a ``DPOConfig``
so TRL's own option checks run) whose ``compute_ref_log_probs`` and ``compute_loss`` are driven with a stand-in
model: TRL calls ``model(..., labels=labels, fused_lm_head=True)`` and reads the per-token ``log_probs`` (and
``log_sum_sq_probs`` for WPO) of the returned ``FusedCausalLMOutput``, so the stand-in returns given per-token
values in TRL's layout. Everything after that (LD-DPO masks, f-divergence scores, the loss, the WPO weights, the
metrics) is TRL's code. dpo-lean's side sums the same per-token values with its own collate + logprobs score fields
and runs ``objective.pair_metrics`` from the config keys a user writes. Compared: the mean loss, its gradient with
respect to every per-token policy log-prob, and TRL's reward metrics, within 1e-6 relative.

Inputs: float64, 10 pairs, summed log-probs in [-400, -20], completions of 5 to 300 tokens. TRL's alpha-divergence
looks its clamp up in a {float16, bfloat16, float32} table, so its cases run in float32 (TRL fails on float64).
Not compared: WPO with hinge or sft, where TRL 1.16's in-place ``per_sequence_loss *= weights`` fails (on relu's
output, which autograd needs; on sft's expanded scalar); tests/test_losses.py checks those by hand.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES

from dpo_lean.config import from_dict
from dpo_lean.errors import DpoLeanError
from dpo_lean.layout import collate
from dpo_lean.logprobs import completion_scores
from dpo_lean.objective import pair_metrics

pytest.importorskip("trl")

PAIRS, SEED, RTOL = 10, 14, 1e-6
MPO = {"pref_loss": "sigmoid,bco_pair,sft", "pref_loss_weights": "0.8,0.2,1.0"}
F_LOSSES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
EXO = {"dpo_label_smoothing": 1e-3}


def _f(kind, loss, **extra):
    return {"pref_loss": loss, "pref_f_divergence": kind, **(EXO if loss == "exo_pair" else {}), **extra}


# (dpo-lean config keys); every case is also given to TRL under TRL's option names (TRL_NAMES)
CASES = [
    *[{"pref_loss": name} for name in ("sigmoid", "hinge", "ipo", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                                       "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")],
    {"pref_loss": "exo_pair", **EXO},
    *[{"pref_loss": name, "pref_beta": 0.5} for name in ("sigmoid", "hinge", "ipo", "sppo_hard", "apo_down", "nca_pair")],
    {"pref_loss": "robust", "dpo_label_smoothing": 0.1}, {"pref_loss": "exo_pair", "dpo_label_smoothing": 0.2},
    {"pref_loss": "aot", "dpo_label_smoothing": 0.2}, {"pref_loss": "aot_unpaired", "dpo_label_smoothing": 0.2},
    {"pref_loss": "discopop", "pref_discopop_tau": 0.2, "pref_beta": 0.3},
    *[_f(kind, loss) for kind in ("forward_kl", "js_divergence", "alpha_divergence") for loss in F_LOSSES],
    _f("alpha_divergence", "sigmoid", pref_f_alpha_divergence_coef=0.3),
    _f("alpha_divergence", "hinge", pref_f_alpha_divergence_coef=1.0),  # TRL's limit case: reverse KL
    MPO, {"pref_loss": "hinge,ipo"}, {"pref_loss": "aot,sft", "pref_loss_weights": "1.0,0.5"},
    {"pref_loss": "nca_pair,apo_zero,sppo_hard", "pref_loss_weights": "0.5,2.0,0.1"},
    _f("js_divergence", "sigmoid,robust,sft", pref_loss_weights="1.0,0.5,0.2"),
    *[{"pref_loss": loss, "ld_alpha": alpha} for loss, alpha in
      (("sigmoid", 0.5), ("ipo", 0.0), ("sigmoid", 1.0), ("sft", 0.5), ("aot", 0.3), ("sppo_hard", 0.7))],
    {**MPO, "ld_alpha": 0.3}, _f("forward_kl", "sigmoid", ld_alpha=0.5),
    *[{"pref_loss": loss, "pref_use_weighting": True, **(EXO if loss == "exo_pair" else {})} for loss in
      ("sigmoid", "ipo", "bco_pair", "apo_down", "sigmoid_norm", "nca_pair", "discopop", "exo_pair")],
    {"pref_loss": "sigmoid,bco_pair", "pref_loss_weights": "0.8,0.2", "pref_use_weighting": True},
    {"pref_loss": "sigmoid", "pref_use_weighting": True, "ld_alpha": 0.5},
    _f("js_divergence", "sigmoid", pref_use_weighting=True),
]
TRL_NAMES = {"pref_beta": "beta", "dpo_label_smoothing": "label_smoothing", "pref_f_divergence": "f_divergence_type",
             "pref_f_alpha_divergence_coef": "f_alpha_divergence_coef", "pref_discopop_tau": "discopop_tau",
             "ld_alpha": "ld_alpha", "pref_use_weighting": "use_weighting"}


def trl_options(keys: dict) -> dict:
    options = {TRL_NAMES[k]: v for k, v in keys.items() if k in TRL_NAMES}
    options["loss_type"] = keys["pref_loss"].split(",")
    if "pref_loss_weights" in keys:
        options["loss_weights"] = [float(w) for w in keys["pref_loss_weights"].split(",")]
    return options


def case_id(keys: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in keys.items())


# ----------------------------------------------------------------------------- inputs


def _per_token(sums: torch.Tensor, counts: list[int], gen: torch.Generator, dtype) -> list[torch.Tensor]:
    """Each completion's summed log-prob spread over its tokens (all negative, uneven), in multiples of 2^-12: every
    partial sum is then exact in float32 too, so TRL's row sums and dpo-lean's segment sums agree to the bit."""
    out = []
    for total, n in zip(sums.tolist(), counts):
        share = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
        out.append((torch.round(total * share / share.sum() * 4096) / 4096).to(dtype))
    return out


@pytest.fixture(scope="module")
def inputs():
    """Token counts, prompts, and per-token policy / reference / log-sum-sq values in TRL's [2B, T - 1] layout."""
    gen = torch.Generator().manual_seed(SEED)
    counts = torch.randint(5, 301, (2 * PAIRS,), generator=gen).tolist()
    counts[0], counts[PAIRS] = 40, 40  # one pair of equal lengths: no tail on either side
    prompts = torch.randint(2, 9, (PAIRS,), generator=gen).tolist() * 2
    policy = -20 - 380 * torch.rand(2 * PAIRS, generator=gen, dtype=torch.float64)
    ref = (policy + 4 * torch.randn(2 * PAIRS, generator=gen, dtype=torch.float64)).clamp(-400, -20)
    width = max(p + n for p, n in zip(prompts, counts))
    return {"counts": counts, "prompts": prompts, "width": width, "gen": gen,
            "policy": policy, "ref": ref}


def trl_layout(values: list[torch.Tensor], prompts, counts, width, dtype) -> torch.Tensor:
    """[2B, width - 1]: position t holds the value of the token at t + 1 (TRL's shifted per-token log-probs)."""
    out = torch.zeros(len(values), width - 1, dtype=dtype)
    for r, (v, p, n) in enumerate(zip(values, prompts, counts)):
        out[r, p - 1:p - 1 + n] = v
    return out


def tensors(inputs, dtype):
    gen = torch.Generator().manual_seed(SEED + 1)
    c, p, w = inputs["counts"], inputs["prompts"], inputs["width"]
    policy = trl_layout(_per_token(inputs["policy"], c, gen, dtype), p, c, w, dtype)
    ref = trl_layout(_per_token(inputs["ref"], c, gen, dtype), p, c, w, dtype)
    lss = policy + (1.5 * torch.rand(policy.shape, generator=gen, dtype=torch.float64)).to(dtype)  # m in [-1.5, 0]
    lss = lss * (policy != 0)
    return policy, ref, lss


# ----------------------------------------------------------------------------- TRL


class StandIn(torch.nn.Module):
    """What TRL's fused-LM-head model returns, with given per-token values (TRL zeroes non-label positions too)."""

    def __init__(self, log_probs: torch.Tensor, log_sum_sq: torch.Tensor | None = None):
        super().__init__()
        self.log_probs, self.log_sum_sq = log_probs, log_sum_sq

    def forward(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        from trl.trainer.utils import FusedCausalLMOutput

        mask = labels[:, 1:] != -100
        assert fused_lm_head and torch.equal(mask, self.log_probs.detach() != 0)  # TRL scores exactly our tokens
        zeros = torch.zeros_like(self.log_probs.detach())
        return FusedCausalLMOutput(log_probs=self.log_probs, entropy=zeros, log_sum_sq_probs=self.log_sum_sq,
                                   mean_logits=zeros, is_top1=zeros.bool(), label_mask=mask)


@pytest.fixture(scope="module")
def trl_parts(tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny-model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tiny-model")
    data = Dataset.from_dict({"prompt": ["Hi"], "chosen": [" yes"], "rejected": [" no"]})
    return model, tokenizer, data, tmp_path_factory.mktemp("trl")


def trl_trainer(trl_parts, options: dict):
    from trl import DPOConfig, DPOTrainer

    model, tokenizer, data, out = trl_parts
    args = DPOConfig(output_dir=str(out), report_to="none", use_cpu=True, bf16=False, precompute_ref_log_probs=True,
                     per_device_train_batch_size=1, dataloader_num_workers=0, disable_tqdm=True, **options)
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def trl_batch(inputs, dtype) -> dict:
    prompts, counts, width = inputs["prompts"], inputs["counts"], inputs["width"]
    completion = torch.zeros(2 * PAIRS, width, dtype=torch.long)
    attention = torch.zeros(2 * PAIRS, width, dtype=torch.long)
    for r, (p, n) in enumerate(zip(prompts, counts)):
        completion[r, p:p + n] = 1
        attention[r, :p + n] = 1
    return {"input_ids": torch.ones(2 * PAIRS, width, dtype=torch.long), "attention_mask": attention,
            "completion_mask": completion}


def run_trl(trl_parts, inputs, keys, dtype):
    trainer = trl_trainer(trl_parts, trl_options(keys))
    policy, ref, lss = tensors(inputs, dtype)
    batch = trl_batch(inputs, dtype)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = trainer.compute_ref_log_probs(StandIn(ref), batch)
    leaf = policy.clone().requires_grad_(True)
    loss = trainer.compute_loss(StandIn(leaf, lss), batch)
    loss.backward()
    mode = "train" if trainer.model.training else "eval"
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    return loss.item(), leaf.grad, metrics


# ----------------------------------------------------------------------------- dpo-lean


def lean_batch(inputs) -> dict:
    """dpo-lean's own batch for pairs of these lengths (dummy token ids), with LD-DPO's tail marks."""
    p, c = inputs["prompts"][:PAIRS], inputs["counts"]
    return collate([[5] * n for n in p], [[7] * n for n in c[:PAIRS]], [[9] * n for n in c[PAIRS:]], pad_id=0,
                   tails=True)


def token_values(layout: torch.Tensor, batch: dict) -> torch.Tensor:
    """The TRL-layout value of each token dpo-lean scores: position ``score_index`` predicts the next token."""
    width = batch["input_ids"].shape[1]
    rows, positions = batch["score_index"] // width, batch["score_index"] % width
    return layout[rows, positions]


def run_lean(inputs, keys, dtype):
    config = from_dict(keys)
    policy, ref, lss = tensors(inputs, dtype)
    batch = lean_batch(inputs)
    cached = completion_scores(token_values(ref, batch), batch)  # what precompute stores
    for name, column in (("ref_chosen_logps", "logps"), ("ref_chosen_tail_logps", "tail_logps")):
        batch[name], batch[name.replace("chosen", "rejected")] = cached[column][:PAIRS], cached[column][PAIRS:]
    batch["chosen_tokens"] = torch.tensor(inputs["counts"][:PAIRS], dtype=dtype)
    batch["rejected_tokens"] = torch.tensor(inputs["counts"][PAIRS:], dtype=dtype)
    leaf = policy.clone().requires_grad_(True)
    scores = completion_scores(token_values(leaf, batch), batch, token_values(lss, batch))
    losses, stats = pair_metrics(config, scores, batch)
    assert losses.shape == (PAIRS,) and losses.dtype == torch.float32  # computed in float64, the Trainer's dtype out
    loss = losses.mean()
    loss.backward()
    return loss.item(), leaf.grad, {k: v.mean().item() for k, v in stats.items()}


# ----------------------------------------------------------------------------- the comparison


@pytest.mark.parametrize("keys", CASES, ids=case_id)
def test_loss_gradient_and_metrics_match_trl(keys, inputs, trl_parts):
    dtype = torch.float32 if keys.get("pref_f_divergence") == "alpha_divergence" else torch.float64
    theirs, their_grad, their_metrics = run_trl(trl_parts, inputs, keys, dtype)
    ours, our_grad, our_metrics = run_lean(inputs, keys, dtype)
    assert ours == pytest.approx(theirs, rel=RTOL, abs=1e-12)
    # at the scored tokens (TRL's fused head fills the other positions with constant zeros, so the gradient TRL's
    # row sums send there reaches no parameter); ours is zero off them
    scored = tensors(inputs, dtype)[0] != 0
    their_grad = their_grad[scored]
    assert their_grad.abs().max() > 0  # the loss depends on the policy: the gradient comparison is not vacuous
    torch.testing.assert_close(our_grad[scored], their_grad, rtol=RTOL, atol=RTOL * their_grad.abs().max().item())
    assert not our_grad[~scored].any()
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert our_metrics[key] == pytest.approx(their_metrics[key], rel=RTOL, abs=1e-9), key


def test_the_cases_cover_every_trl_loss_and_option():
    from dpo_lean.loss_catalog import TRL_LOSSES

    used = {name for keys in CASES for name in keys["pref_loss"].split(",")}
    assert used == set(TRL_LOSSES)
    options = {k for keys in CASES for k in keys}
    assert options == {"pref_loss", "pref_loss_weights", *TRL_NAMES}
    for kind in ("forward_kl", "js_divergence", "alpha_divergence"):
        assert {k["pref_loss"] for k in CASES if k.get("pref_f_divergence") == kind} >= set(F_LOSSES)


def test_the_inputs_are_realistic(inputs):
    counts, sums = inputs["counts"], torch.cat([inputs["policy"], inputs["ref"]])
    assert min(counts) >= 5 and max(counts) <= 300 and len(set(counts)) > PAIRS
    assert sums.min() >= -400 and sums.max() <= -20 and PAIRS >= 8
    shorter = [min(a, b) for a, b in zip(counts[:PAIRS], counts[PAIRS:])]
    assert any(a != b for a, b in zip(counts[:PAIRS], counts[PAIRS:])) and min(shorter) >= 5  # tails exist


@pytest.mark.parametrize("keys", [
    {"pref_loss": "exo_pair"},  # no label smoothing
    {"pref_loss": "nca_pair", "pref_f_divergence": "js_divergence"},
    {"pref_loss": "sigmoid,bco_pair", "pref_f_divergence": "forward_kl"},
    {"pref_loss": "aot", "pref_use_weighting": True},
    {"pref_loss": "aot_unpaired,sigmoid", "pref_use_weighting": True},
    {"pref_loss": "sigmoid,ipo", "pref_loss_weights": "1.0"},
], ids=case_id)
def test_what_trl_refuses_is_a_one_line_config_error(keys, trl_parts):
    with pytest.raises((ValueError, NotImplementedError)):
        trl_trainer(trl_parts, trl_options(keys))
    with pytest.raises(DpoLeanError) as err:
        from_dict(keys)
    assert "\n" not in str(err.value)
