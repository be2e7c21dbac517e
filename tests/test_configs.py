"""The configs a user copies (configs/) and LLaMA-Factory 0.9.5's own DPO example run as they are."""

from __future__ import annotations

import gzip
import json
import math
import shutil

import pytest
import yaml
from conftest import FIXTURES, ROOT
from test_cli import invoke

from dpo_lean import cache

CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("accelerate_"))  # dpo-lean's
LF_EXAMPLE = FIXTURES / "lf_examples" / "qwen3_lora_dpo.yaml"
PARITY = FIXTURES / "lf_parity"
DEMO = ["dataset=demo_case", f"dataset_dir={FIXTURES / 'demo'}"]
LF_CHECKS = json.loads(gzip.decompress((PARITY / "lf_ids.json.gz").read_bytes()))
LF_CHECKS = {"configs": LF_CHECKS["configs"], "lf_keys": set(LF_CHECKS["lf_keys"])}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# each config's model family, by its template (a new config needs its family here, and in tests/tiny_families.py)
MODEL_TYPES = {"gemma2": "gemma2", "llama3": "llama", "mistral": "mistral", "qwen": "qwen2", "qwen3": "qwen3"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """model_type -> a tiny model of that family (tests/tiny_families.py) with the parity tokenizer (every template's
    special tokens) and room for the tokens a template's fix-ups add (llama3's <|eom_id|>, gemma2's <eos>, ...)."""
    from tiny_families import write_family

    built = {}

    def model(model_type: str):
        if model_type not in built:
            built[model_type] = write_family(model_type, tmp_path_factory.mktemp(f"tiny-{model_type}"),
                                             tokenizer=PARITY / "tokenizer", spare_tokens=16)
        return built[model_type]

    return model


def _model_type(path):
    return MODEL_TYPES[yaml.safe_load(path.read_text())["template"]]


def test_there_are_configs_for_each_family():
    templates = {yaml.safe_load(p.read_text())["template"] for p in CONFIGS}
    assert {"qwen", "qwen3", "llama3", "mistral", "gemma2"} <= templates and len(CONFIGS) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_runs_data_check_on_a_tiny_model_of_its_family(path, tiny_model, tmp_path):
    template = yaml.safe_load(path.read_text())["template"]
    result = invoke("data-check", path, f"model_name_or_path={tiny_model(_model_type(path))}", *DEMO,
                    f"output_dir={tmp_path}", "--show", "1")
    assert result.exit_code == 0, result.output
    assert f"\ntemplate: {template}\n" in result.stdout and "rows kept: 64\n" in result.stdout
    assert "┌─ prompt" in result.stdout


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_precomputes_and_trains_two_steps_on_a_tiny_model_of_its_family(path, tiny_model, tmp_path):
    """The config as it is (quantisation, precision, attention, optimizer, schedule, template), on a tiny model of
    its own model_type; only the model, the data, the output folder and the run's length are overridden."""
    model_type = _model_type(path)
    overrides = [f"model_name_or_path={tiny_model(model_type)}", *DEMO, "max_samples=12",
                 f"output_dir={tmp_path / 'out'}", "max_steps=2", "gradient_accumulation_steps=1"]
    for command in ("precompute", "train"):
        result = invoke(command, path, *overrides)
        assert result.exit_code == 0, (command, result.output)
    assert f"policy: trains a new LoRA on {tiny_model(model_type)}" in result.output
    summary = json.loads((tmp_path / "out" / "dpo_metrics" / "summary.json").read_text())
    assert summary["global_step"] == 2 and summary["finished"] and math.isfinite(summary["train_loss"])
    fingerprint = cache.scan(tmp_path / "out" / "ref_cache").manifest["fingerprint"]
    assert json.loads((tiny_model(model_type) / "config.json").read_text())["model_type"] == model_type
    assert fingerprint["template"] == yaml.safe_load(path.read_text())["template"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_with_only_llamafactory_keys_parses_in_llamafactory(path):
    """tools/lf_parity.py ran LF 0.9.5's own argument parser on each file (test_lf_parity checks it is current)."""
    checked = LF_CHECKS["configs"][path.name]["lf"]
    dpo_lean_only = set(yaml.safe_load(path.read_text())) - LF_CHECKS["lf_keys"]
    if dpo_lean_only:
        assert checked.startswith("ValueError") and all(k in checked for k in dpo_lean_only), checked
    else:
        assert checked == "ok"


def test_llamafactory_qwen3_dpo_example_runs_as_is(tmp_path):
    """LF 0.9.5's examples/train_lora/qwen3_lora_dpo.yaml, only model, dataset and output_dir overridden."""
    config = tmp_path / "qwen3_lora_dpo.yaml"
    shutil.copy(LF_EXAMPLE, config)
    overrides = [f"model_name_or_path={FIXTURES / 'tiny-model'}", "dataset=alpaca_demo,sharegpt_demo",
                 f"dataset_dir={FIXTURES / 'data'}", f"output_dir={tmp_path / 'out'}"]
    for command in ("data-check", "precompute", "train"):
        result = invoke(command, config, *overrides)
        assert result.exit_code == 0, (command, result.output)
    fingerprint = cache.scan(tmp_path / "out" / "ref_cache").manifest["fingerprint"]
    assert (fingerprint["template"], fingerprint["cutoff_len"]) == ("qwen3_nothink", 2048)
    summary = json.loads((tmp_path / "out" / "dpo_metrics" / "summary.json").read_text())
    assert summary["config"]["num_train_epochs"] == 3.0 and summary["config"]["gradient_accumulation_steps"] == 8
    assert summary["rows"]["train"] == 8 and summary["global_step"] == 3  # 8 rows / (1 x 8) per step, 3 epochs
    assert math.isfinite(summary["train_loss"]) and summary["finished"]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
