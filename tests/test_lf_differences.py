"""Where dpo-lean differs from LLaMA-Factory (and TRL), one line says so when the difference applies to the run:
rows cut by keep_end or keep_start, a reference that keeps the starting adapter, reward accuracy at ties."""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import FIXTURES

from dpo_lean import modeling
from dpo_lean.cli import main
from dpo_lean.config import from_dict
from dpo_lean.losses import reward_stats
from dpo_lean.reporting import tie_note


@pytest.mark.parametrize("mode", ["keep_end", "llamafactory"])
def test_data_check_says_how_its_truncation_differs_from_llamafactory(mode, tmp_path):
    from make_fixtures import fixture_config

    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({**fixture_config(FIXTURES), "output_dir": str(tmp_path / "out"),
                                      "cutoff_len": 40, "truncation_mode": mode}))
    result = CliRunner().invoke(main, ["data-check", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    truncated = int(next(line for line in result.stdout.splitlines()
                         if line.startswith("rows truncated to cutoff_len=40: ")).rsplit(" ", 1)[1])
    assert truncated > 0
    notes = [line for line in result.stdout.splitlines() if line.startswith("truncation_mode ")]
    if mode == "llamafactory":
        assert notes == []
        return
    assert notes == [f"truncation_mode {mode}: the {truncated} truncated rows lost their prompt's start or their "
                     "completions' end; LLaMA-Factory cuts otherwise "
                     "(prompt and completions keep their starts, cutoff_len shared by their lengths), so these rows "
                     "differ from LF's; truncation_mode: llamafactory cuts as LF does"]
    assert f"{truncated} truncated to cutoff_len ({mode})" in result.stdout


@pytest.mark.parametrize("extra, expected", [
    ({"adapter_name_or_path": "sft"}, "reference: the starting point, sft included; LLaMA-Factory's reference here is "
     "base without it (the policy with its adapter switched off); ref_model: base, ref_model_quantization_bit: 4 "
     "makes it LF's"),
    ({"adapter_name_or_path": "a,sft", "quantization_bit": None}, "reference: the starting point, sft included; "
     "LLaMA-Factory's reference here is base + a without it (the policy with its adapter switched off); ref_model: "
     "base, ref_model_adapters: a makes it LF's"),
    ({"adapter_name_or_path": "sft", "ref_model": "base"}, ""),  # the reference is set: nothing differs
    ({"adapter_name_or_path": "a,sft", "quantization_bit": None, "create_new_adapter": True}, ""),  # LF's too
    ({}, ""),
])
def test_a_reference_that_keeps_the_starting_adapter_is_said_to_differ_from_llamafactory(extra, expected):
    config = from_dict({"model_name_or_path": "base", "quantization_bit": 4, **extra})
    assert modeling.lf_reference_note(config) == expected


def test_reward_accuracy_at_ties_is_said_with_trl_and_llamafactory_figure():
    chosen, rejected = torch.tensor([1.0, 0.0, 0.0, -1.0]), torch.zeros(4)
    accuracies = reward_stats(chosen, rejected, torch.zeros(4), torch.zeros(4), beta=0.1)["rewards/accuracies"]
    trl = (0.1 * chosen > 0.1 * rejected).float().mean().item()  # TRL 1.16 DPOTrainer's rewards/accuracies
    assert trl == 0.25
    assert tie_note(accuracies) == ("rewards/accuracies: 2 of 4 pairs tie (equal rewards: the policy is still the "
                                    "reference); dpo-lean counts a tie as half (0.500 here), TRL and LLaMA-Factory as "
                                    "wrong (chosen > rejected only: 0.250)")
    assert tie_note(torch.tensor([1.0, 0.0])) == ""
