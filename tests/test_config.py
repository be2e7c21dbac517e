"""The typed Config: LLaMA-Factory YAML loading, key=value overrides, one-line errors, key_table, derived values."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from dpo_lean.config import Config, from_dict, load_config, parse_override
from dpo_lean.errors import DpoLeanError
from dpo_lean.keys import key_table

LF_DPO_YAML = """\
model_name_or_path: Qwen/Qwen2.5-7B
stage: dpo
do_train: true
finetuning_type: lora
pref_beta: 0.1
pref_loss: sigmoid
lora_rank: 64
lora_target: all
dataset: my_dpo_data
template: qwen
cutoff_len: 2048
per_device_train_batch_size: 1
gradient_accumulation_steps: 16
num_train_epochs: 2.0
learning_rate: 5.0e-6
bf16: true
output_dir: saves/qwen2.5-7b/lora/dpo
"""

# LLaMA-Factory's examples/train_lora/llama3_lora_dpo.yaml (current upstream, with the keys later versions added).
LF_EXAMPLE_YAML = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: dpo
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
pref_beta: 0.1
pref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]

### dataset
dataset: dpo_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/dpo
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def assert_typed(config: Config, expected: dict) -> None:
    """Each key has exactly the expected value and Python type (bool is not accepted for int, int not for float)."""
    for key, value in expected.items():
        got = getattr(config, key)
        assert type(got) is type(value), f"{key}: {got!r} is {type(got).__name__}, expected {type(value).__name__}"
        assert got == value, f"{key}: {got!r} != {value!r}"


def one_line_error(fn, *fragments: str) -> str:
    """Call fn, expect a DpoLeanError whose message is one line containing every fragment; return the message."""
    with pytest.raises(DpoLeanError) as info:
        fn()
    message = str(info.value)
    assert message.strip(), "empty error message"
    assert "\n" not in message, f"error message is not one line: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ---------------------------------------------------------------- loading LLaMA-Factory YAML


def test_llamafactory_dpo_yaml_loads_with_typed_values(tmp_path):
    config = load_config(write(tmp_path, LF_DPO_YAML))
    assert_typed(config, {
        "model_name_or_path": "Qwen/Qwen2.5-7B", "stage": "dpo", "do_train": True, "finetuning_type": "lora",
        "pref_beta": 0.1, "pref_loss": "sigmoid", "lora_rank": 64, "lora_target": "all", "dataset": "my_dpo_data",
        "template": "qwen", "cutoff_len": 2048, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 16,
        "num_train_epochs": 2.0, "learning_rate": 5e-6, "bf16": True, "output_dir": "saves/qwen2.5-7b/lora/dpo",
    })
    # keys the YAML leaves out keep their defaults
    assert config.fp16 is False
    assert config.lora_alpha is None and config.resolved_lora_alpha == 128


def test_llamafactory_example_llama3_lora_dpo_loads(tmp_path):
    config = load_config(write(tmp_path, LF_EXAMPLE_YAML))
    assert_typed(config, {
        "model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "trust_remote_code": True, "lora_rank": 8,
        "template": "llama3", "dataset": "dpo_en_demo", "max_samples": 1000, "overwrite_cache": True,
        "preprocessing_num_workers": 16, "dataloader_num_workers": 4, "logging_steps": 10, "save_steps": 500,
        "plot_loss": True, "overwrite_output_dir": True, "save_only_model": False, "report_to": "none",
        "gradient_accumulation_steps": 8, "learning_rate": 5e-6, "num_train_epochs": 3.0,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True, "ddp_timeout": 180000000,
    })
    assert config.resume_from_checkpoint is None


def test_int_for_float_key_and_integral_float_for_int_key_are_converted(tmp_path):
    config = load_config(write(tmp_path, "num_train_epochs: 2\nlora_rank: 16.0\nlearning_rate: 1\n"))
    assert_typed(config, {"num_train_epochs": 2.0, "lora_rank": 16, "learning_rate": 1.0})
    one_line_error(lambda: load_config(write(tmp_path, "lora_rank: 16.5\n")), "'lora_rank'", "16.5", "an integer")


def test_number_written_as_string_in_yaml_is_a_float(tmp_path):
    # YAML 1.1 reads 5e-6 (no dot) as a string; LLaMA-Factory users write it that way.
    config = load_config(write(tmp_path, "learning_rate: 5e-6\npref_beta: '0.25'\n"))
    assert_typed(config, {"learning_rate": 5e-6, "pref_beta": 0.25})


def test_empty_yaml_gives_defaults(tmp_path):
    config = load_config(write(tmp_path, "# nothing set\n"))
    assert config == Config()


# ---------------------------------------------------------------- overrides


def test_overrides_apply_on_top_with_types(tmp_path):
    config = load_config(write(tmp_path, LF_DPO_YAML),
                         ["pref_beta=0.2", "bf16=false", "max_samples=10", "lora_target=q_proj,v_proj",
                          "learning_rate=1e-5"])
    assert_typed(config, {"pref_beta": 0.2, "bf16": False, "max_samples": 10, "lora_target": "q_proj,v_proj",
                          "learning_rate": 1e-5})
    # untouched keys keep the YAML's values
    assert_typed(config, {"lora_rank": 64, "gradient_accumulation_steps": 16})
    assert config.lora_target_modules == ["q_proj", "v_proj"]


def test_override_can_set_null_and_later_override_wins(tmp_path):
    config = load_config(write(tmp_path, "max_samples: 5\n"), ["max_samples=null", "lora_rank=4", "lora_rank=32"])
    assert config.max_samples is None
    assert config.lora_rank == 32


@pytest.mark.parametrize("text, expected", [
    ("pref_beta=0.2", ("pref_beta", 0.2)),
    ("bf16=false", ("bf16", False)),
    ("max_samples=10", ("max_samples", 10)),
    ("lora_target=q_proj,v_proj", ("lora_target", "q_proj,v_proj")),
    ("output_dir=a=b", ("output_dir", "a=b")),
    ("run_name=", ("run_name", "")),
])
def test_parse_override(text, expected):
    key, value = parse_override(text)
    assert (key, value) == expected
    assert type(value) is type(expected[1])


def test_override_with_error_is_validated_like_yaml(tmp_path):
    cfg = write(tmp_path, LF_DPO_YAML)
    one_line_error(lambda: load_config(cfg, ["pref_betta=0.2"]), "'pref_betta'", "did you mean 'pref_beta'")
    one_line_error(lambda: load_config(cfg, ["lora_rank=abc"]), "'lora_rank'", "'abc'", "an integer")


# ---------------------------------------------------------------- one-line errors


def test_unknown_key_suggests_the_close_one(tmp_path):
    message = one_line_error(lambda: load_config(write(tmp_path, LF_DPO_YAML + "pref_betta: 0.1\n")),
                             "'pref_betta'", "did you mean 'pref_beta'")
    assert "unknown" in message


def test_unknown_key_without_close_match_points_at_keys_command(tmp_path):
    one_line_error(lambda: load_config(write(tmp_path, "zzzzqqqq: 1\n")), "'zzzzqqqq'", "dpo-lean keys")


@pytest.mark.parametrize("yaml_line, fragments", [
    ("lora_rank: abc", ["'lora_rank'", "'abc'", "an integer"]),
    ("bf16: maybe", ["'bf16'", "'maybe'", "true/false"]),
    ("pref_beta: [0.1]", ["'pref_beta'", "[0.1]", "a number"]),
    ("lora_rank: true", ["'lora_rank'", "an integer"]),
])
def test_wrong_type(tmp_path, yaml_line, fragments):
    one_line_error(lambda: load_config(write(tmp_path, yaml_line + "\n")), *fragments)


@pytest.mark.parametrize("yaml_line, fragments", [
    ("pref_beta: -0.1", ["'pref_beta'", "-0.1", "out of range", "> 0"]),
    ("pref_beta: 0", ["'pref_beta'", "0", "out of range", "> 0"]),
    ("cutoff_len: 0", ["'cutoff_len'", "0", "out of range", ">= 2"]),
    ("dpo_label_smoothing: 0.6", ["'dpo_label_smoothing'", "0.6", "0.5"]),
    ("lora_dropout: 1.5", ["'lora_dropout'", "1.5", "out of range", "<= 1"]),
    ("learning_rate: 0", ["'learning_rate'", "0", "out of range", "> 0"]),
])
def test_out_of_range(tmp_path, yaml_line, fragments):
    one_line_error(lambda: load_config(write(tmp_path, yaml_line + "\n")), *fragments)


def test_dpo_label_smoothing_bound_is_stated_consistently(tmp_path):
    # 0.5 is rejected (the loss would be constant), so the message for 0.6 must not claim "<= 0.5" is allowed.
    for value in ("0.5", "0.6"):
        path = write(tmp_path, f"dpo_label_smoothing: {value}\n")
        one_line_error(lambda p=path: load_config(p), "'dpo_label_smoothing'", value, "< 0.5")
    assert load_config(write(tmp_path, "dpo_label_smoothing: 0.49\n")).dpo_label_smoothing == 0.49


@pytest.mark.parametrize("key", ["pref_beta", "learning_rate", "num_train_epochs", "pref_f_alpha_divergence_coef"])
def test_nan_is_rejected_for_bounded_and_unbounded_numbers(tmp_path, key):
    # NaN compares False with every bound, so a plain `value < lo` check lets it through.
    one_line_error(lambda: load_config(write(tmp_path, f"{key}: .nan\n")), f"'{key}'", "nan")
    one_line_error(lambda: load_config(write(tmp_path, "", "x.yaml"), [f"{key}=nan"]), f"'{key}'", "nan")


@pytest.mark.parametrize("yaml_line, fragments", [
    ("pref_loss: foo", ["'pref_loss'", "'foo'", "sigmoid", "hinge", "ipo"]),
    ("stage: sft", ["'stage'", "'sft'", "dpo"]),
    ("finetuning_type: full", ["'finetuning_type'", "'full'", "lora"]),
    ("template: llama-3", ["'template'", "'llama-3'", "auto", "plain", "LLaMA-Factory", "did you mean 'llama3'"]),
    ("quantization_bit: 8", ["'quantization_bit'", "8", "4"]),
    ("truncation_mode: keep_middle", ["'truncation_mode'", "'keep_middle'", "keep_end", "keep_start", "llamafactory"]),
])
def test_bad_choice(tmp_path, yaml_line, fragments):
    message = one_line_error(lambda: load_config(write(tmp_path, yaml_line + "\n")), *fragments)
    assert "not supported" in message


def test_bf16_and_fp16_both_true(tmp_path):
    one_line_error(lambda: load_config(write(tmp_path, "bf16: true\nfp16: true\n")), "'bf16'", "'fp16'", "true",
                   "at most one")
    assert load_config(write(tmp_path, "bf16: false\nfp16: true\n")).fp16 is True


def test_override_without_equals(tmp_path):
    cfg = write(tmp_path, LF_DPO_YAML)
    one_line_error(lambda: load_config(cfg, ["pref_beta"]), "'pref_beta'", "key=value")


@pytest.mark.parametrize("text", ["- pref_beta: 0.1\n- lora_rank: 8\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    one_line_error(lambda: load_config(path), str(path), "mapping")


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "pref_beta: 0.1\nlora_rank: 8\n  cutoff_len: 512\nbf16: true\n")
    one_line_error(lambda: load_config(path), str(path), "line 3", "not valid YAML")
    path = write(tmp_path, "pref_beta: 0.1\nlora_target: [q_proj, v_proj\nbf16: true\n", "unclosed.yaml")
    message = one_line_error(lambda: load_config(path), str(path), "not valid YAML")
    assert re.search(r"line [34]\b", message), message


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    one_line_error(lambda: load_config(path), str(path), "not found")
    one_line_error(lambda: load_config(tmp_path), str(tmp_path), "not found")  # a directory is not a config file


def test_from_dict_rejects_unknown_keys_and_checks_cross_rules():
    one_line_error(lambda: from_dict({"lora_rnak": 8}), "'lora_rnak'", "did you mean 'lora_rank'")
    one_line_error(lambda: from_dict({"num_shards": 2, "shard_index": 2}), "'shard_index'", "2", "num_shards")
    one_line_error(lambda: from_dict({"pref_loss": "ipo", "dpo_label_smoothing": 0.1}), "'dpo_label_smoothing'",
                   "sigmoid", "ipo")
    one_line_error(lambda: from_dict({"report_to": "swanlab"}), "'report_to'", "'swanlab'", "tensorboard", "wandb")
    assert from_dict({"report_to": ["wandb", "tensorboard"]}).report_to == "wandb,tensorboard"


# ---------------------------------------------------------------- key_table


FIELD_NAMES = [f.name for f in dataclasses.fields(Config)]


def test_key_table_lists_every_field_once():
    own = key_table().split("[LLaMA-Factory keys refused]")[0]  # then LF's keys that dpo-lean has no key for
    rows = [line.split()[0] for line in own.splitlines() if line.startswith("  ")]
    assert rows == FIELD_NAMES


def _cells(row: str) -> list[str]:
    """Cells of a Markdown table row, honouring escaped pipes (\\|)."""
    assert row.startswith("|") and row.endswith("|"), row
    return [c.strip() for c in re.split(r"(?<!\\)\|", row[1:-1])]


def test_key_table_markdown_has_a_well_formed_row_per_field():
    lines = key_table(markdown=True).split("### LLaMA-Factory keys")[0].splitlines()
    headers = [i for i, line in enumerate(lines) if line == "| key | type | default | LF | meaning |"]
    assert headers, "no Markdown table header"
    for i in headers:
        assert lines[i + 1] == "| --- | --- | --- | --- | --- |"
    rows = [line for line in lines if line.startswith("| `")]
    assert [_cells(r)[0].strip("`") for r in rows] == FIELD_NAMES
    for row in rows:
        cells = _cells(row)
        # a row with more cells than the header renders as a broken table (e.g. "str | null" unescaped)
        assert len(cells) == 5, f"{len(cells)} cells, expected 5: {row}"
    by_name = {_cells(r)[0].strip("`"): _cells(r) for r in rows}
    assert by_name["lora_rank"][2] == "`8`"
    assert by_name["bf16"][2] == "`false`"
    assert "null" in by_name["max_samples"][1] and "int" in by_name["max_samples"][1]
    assert by_name["pref_beta"][4] == Config.__dataclass_fields__["pref_beta"].metadata["help"]
    assert (by_name["pref_beta"][3], by_name["do_train"][3], by_name["ref_cache_dir"][3]) == ("honoured", "no effect", "-")


# ---------------------------------------------------------------- derived values


@pytest.mark.parametrize("target, expected", [
    ("all", "all-linear"),
    (" all ", "all-linear"),
    ("q_proj, v_proj", ["q_proj", "v_proj"]),
    ("q_proj,v_proj,", ["q_proj", "v_proj"]),
    ("o_proj", ["o_proj"]),
])
def test_lora_target_modules(target, expected):
    assert from_dict({"lora_target": target}).lora_target_modules == expected


def test_resolved_lora_alpha():
    assert from_dict({"lora_rank": 8}).resolved_lora_alpha == 16
    assert from_dict({"lora_rank": 64}).resolved_lora_alpha == 128
    assert from_dict({"lora_rank": 64, "lora_alpha": 16}).resolved_lora_alpha == 16


def test_resolved_ref_cache_dir_and_metrics_dir(tmp_path):
    config = from_dict({"output_dir": str(tmp_path / "run")})
    assert config.resolved_ref_cache_dir == tmp_path / "run" / "ref_cache"
    assert config.metrics_dir == tmp_path / "run" / "dpo_metrics"
    config = from_dict({"output_dir": str(tmp_path / "run"), "ref_cache_dir": str(tmp_path / "cache")})
    assert config.resolved_ref_cache_dir == tmp_path / "cache"


def test_to_dict_round_trips():
    config = from_dict({"pref_beta": 0.3, "lora_rank": 4, "dataset": "a.json"})
    assert from_dict(config.to_dict()) == config
    assert math.isclose(config.to_dict()["pref_beta"], 0.3)


def test_unquoted_no_is_the_strategy_no():
    """YAML 1.1 reads `save_strategy: no` as false; LLaMA-Factory configs write it unquoted."""
    from dpo_lean.config import from_dict, parse_override

    assert from_dict({"save_strategy": False, "eval_strategy": False}).save_strategy == "no"
    key, value = parse_override("eval_strategy=no")
    assert from_dict({key: value}).eval_strategy == "no"
    with pytest.raises(DpoLeanError, match="lora_target"):
        from_dict({"lora_target": False})
