"""Every LLaMA-Factory 0.9.5 key is honoured, refused with a reason, or documented as having no effect.

The list of keys is tests/fixtures/lf_keys.json, read from LF's own source and examples by tools/lf_keys.py
(every field of the argument classes `llamafactory-cli train` parses, with LF's default, and every key of its
DPO, QLoRA and merge examples), not from dpo-lean.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dpo_lean import lf_keys
from dpo_lean.cli import main
from dpo_lean.config import FIELDS, from_dict
from dpo_lean.errors import DpoLeanError
from dpo_lean.keys import describe_key, key_table, lf_status

LF = json.loads((Path(__file__).parent / "fixtures" / "lf_keys.json").read_text())
ARGUMENTS: dict = LF["arguments"]
EXAMPLES: dict[str, dict] = LF["examples"]
EVERY_KEY = sorted(set(ARGUMENTS) | {k for example in EXAMPLES.values() for k in example})
# The LF v1 config keys (examples/v1) and warmup_ratio (in LF's DPO example; transformers 5.24 dropped the field)
# are the example keys that are not fields of the argument classes.
NOT_ARGUMENTS = {"dist_config", "kernel_config", "micro_batch_size", "model", "model_class", "peft_config",
                 "quant_config", "sample_backend", "train_dataset", "warmup_ratio"}


def test_the_key_list_covers_the_dpo_and_qlora_examples():
    assert LF["llamafactory"] == "v0.9.5" and len(ARGUMENTS) > 300
    assert {"examples/train_lora/qwen3_lora_dpo.yaml", "examples/train_qlora/qwen3_lora_sft_otfq.yaml",
            "examples/merge_lora/qwen3_lora_sft.yaml"} <= set(EXAMPLES)
    assert {k for e in EXAMPLES.values() for k in e} - set(ARGUMENTS) == NOT_ARGUMENTS


@pytest.mark.parametrize("key", EVERY_KEY)
def test_every_lf_key_is_honoured_refused_or_of_no_effect(key):
    status = lf_status(key)
    assert status in ("honoured", "no effect", "refused"), f"{key}: {status}"
    assert (key in FIELDS) == (status == "honoured" or key in ("do_train", "overwrite_output_dir"))
    assert describe_key(key).startswith(f"{key}: LLaMA-Factory's key") and "\n" not in describe_key(key)


def test_dpo_lean_own_keys_are_not_lf_keys_and_lf_keys_claimed_are():
    own = {name for name, f in FIELDS.items() if f.metadata["lf"] is None}
    assert own and not own & set(EVERY_KEY)
    assert {name for name in FIELDS if name not in own} <= set(EVERY_KEY)
    assert not set(FIELDS) & (set(lf_keys.REFUSED) | set(lf_keys.NO_EFFECT))  # one home per key
    assert set(lf_keys.REFUSED) | set(lf_keys.NO_EFFECT) <= set(EVERY_KEY)  # no invented LF keys


REFUSED_ARGUMENTS = [k for k in EVERY_KEY if lf_status(k) == "refused" and k in ARGUMENTS]


@pytest.mark.parametrize("key", REFUSED_ARGUMENTS)
def test_a_refused_key_is_accepted_at_lf_default_and_refused_otherwise_with_its_reason(key):
    from_dict({key: ARGUMENTS[key]})  # LF's default asks for what dpo-lean does anyway
    other = {bool: lambda v: not v, int: lambda v: v + 3, float: lambda v: v + 0.5, str: lambda v: v + "_x",
             type(None): lambda v: "something", list: lambda v: ["x"]}[type(ARGUMENTS[key])](ARGUMENTS[key])
    if any(lf_keys._same(other, a) for a in lf_keys.REFUSED[key][0]):  # e.g. packing: null or false
        other = "something"
    with pytest.raises(DpoLeanError) as err:
        from_dict({key: other})
    message = str(err.value)
    assert message.startswith(f"config key '{key}'") and lf_keys.REFUSED[key][1] in message and "\n" not in message


@pytest.mark.parametrize("key", [k for k in EVERY_KEY if k in NOT_ARGUMENTS and lf_status(k) == "refused"])
def test_lf_v1_keys_are_refused_naming_the_v0_key(key):
    with pytest.raises(DpoLeanError, match=f"config key '{key}' is not supported: a LLaMA-Factory v1 config key"):
        from_dict({key: {"name": "x"}})


@pytest.mark.parametrize("key", sorted(lf_keys.NO_EFFECT))
def test_a_key_of_no_effect_is_accepted_with_any_value_and_changes_nothing(key):
    assert from_dict({key: ARGUMENTS.get(key, 1)}) == from_dict({})
    assert from_dict({key: "anything"}) == from_dict({})


def test_no_effect_config_keys_say_so_in_their_help():
    for name, f in FIELDS.items():
        if f.metadata["lf"] == "no effect":
            assert f.metadata["help"].lower().startswith("no effect"), name


def test_every_example_key_is_classified_and_its_value_checked(tmp_path):
    """Each (key, value) of LF's examples loads, or is refused in one line naming that key."""
    outcomes = {}
    for example in EXAMPLES.values():
        for key, value in example.items():
            try:
                from_dict({key: value})
                outcomes[key, json.dumps(value)] = "accepted"
            except DpoLeanError as e:
                assert str(e).startswith(f"config key '{key}'") and "\n" not in str(e), str(e)
                outcomes[key, json.dumps(value)] = "refused"
    refused = {k for (k, _), o in outcomes.items() if o == "refused"}
    # values dpo-lean does not support: other stages and quantisers, LF v1 keys, and a multimodal example's
    # image/video pixel budgets (every example's template is accepted).
    assert outcomes["template", json.dumps("qwen3_nothink")] == "accepted"
    assert refused == {"stage", "image_max_pixels", "video_max_pixels", "export_quantization_bit",
                       "export_quantization_dataset", "model", "model_class", "peft_config", "kernel_config",
                       "dist_config", "quant_config", "train_dataset", "micro_batch_size", "sample_backend"}


def test_lf_dpo_example_loads_as_it_is():
    config = from_dict(dict(EXAMPLES["examples/train_lora/qwen3_lora_dpo.yaml"]))
    assert config.template == "qwen3_nothink"
    assert (config.pref_beta, config.lora_rank, config.warmup_ratio, config.ddp_timeout) == (0.1, 8, 0.1, 180000000)


def test_an_honoured_key_with_fewer_choices_refuses_the_others():
    assert from_dict({"quantization_method": "bnb"}).quantization_method == "bnb"
    with pytest.raises(DpoLeanError, match="'quantization_method': 'gptq' is not supported; choose one of: bnb"):
        from_dict({"quantization_method": "gptq"})
    with pytest.raises(DpoLeanError, match="'ref_model_quantization_bit': 8 is not supported; choose one of: null, 4"):
        from_dict({"ref_model": "m", "ref_model_quantization_bit": 8})


def test_lf_merge_example_keeps_its_meaning():
    config = from_dict(EXAMPLES["examples/merge_lora/qwen3_lora_sft.yaml"])
    assert config.adapter_name_or_path == "saves/qwen3-4b/lora/sft" and config.export_size == 5
    assert config.dataset is None  # an export config: export merges adapter_name_or_path, as LF's does


def test_keys_command_shows_each_lf_key_status_and_the_table_lists_them():
    result = CliRunner().invoke(main, ["keys", "use_unsloth", "do_train", "max_new_tokens", "pref_beta", "nope"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].startswith("use_unsloth: LLaMA-Factory's key, refused unless false: ")
    assert lines[1].startswith("do_train: LLaMA-Factory's key, no effect")
    assert lines[2].startswith("max_new_tokens: LLaMA-Factory's key, no effect here (any value)")
    assert lines[3].startswith("pref_beta: LLaMA-Factory's key, honoured")
    assert lines[4].startswith("nope: not a key")
    table = key_table(markdown=True)
    for key in lf_keys.REFUSED:
        assert f"`{key}` (" in table, key
    for key in lf_keys.NO_EFFECT:
        assert f"`{key}`" in table, key
