"""`dpo-lean export` writes the merged model in the dtype asked for (infer_dtype, bf16, fp16), else the model's own,
never in the float32 a CPU computes in; its weights are base + B @ A x alpha / r within that dtype's rounding."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES
from safetensors import safe_open
from test_sft_to_dpo import make_adapter, merged_by_hand

from dpo_lean.config import from_dict
from dpo_lean.export import run_export

TINY = FIXTURES / "tiny-model"
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("adapter") / "a", seed=3)


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """The tiny model saved in bfloat16 (config.json's dtype too), as most hub models are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("bf16-model")
    AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(path)
    return path


def abs_products(adapter) -> dict[str, torch.Tensor]:
    """|B| @ |A| x alpha / r per adapted weight, in float64: what bounds the rounding of B @ A."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    lora = load_file(adapter / "adapter_model.safetensors")
    return {key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight"):
            (lora[key.replace("lora_A", "lora_B")].double().abs() @ a.double().abs()) * cfg["lora_alpha"] / cfg["r"]
            for key, a in lora.items() if key.endswith(".lora_A.weight")}


def saved_dtypes(folder) -> set[torch.dtype]:
    dtypes = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            dtypes |= {f.get_tensor(name).dtype for name in f.keys()}
    return dtypes


def saved_weights(folder) -> dict[str, torch.Tensor]:
    weights = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            weights |= {name: f.get_tensor(name) for name in f.keys()}
    return weights


@pytest.mark.parametrize("settings, model, dtype", [
    ({"bf16": True}, "tiny", torch.bfloat16),
    ({"fp16": True}, "tiny", torch.float16),
    ({"infer_dtype": "bfloat16"}, "tiny", torch.bfloat16),
    ({"infer_dtype": "float32", "bf16": True}, "tiny", torch.float32),
    ({}, "bf16", torch.bfloat16),  # the model's own dtype, not the CPU's float32
    ({}, "tiny", torch.float32),
], ids=["bf16", "fp16", "infer_dtype", "infer_dtype_wins", "own_bf16", "own_float32"])
def test_export_writes_the_dtype_asked_for_and_the_merged_weights(adapter, bf16_model, tmp_path, settings, model, dtype):
    base = TINY if model == "tiny" else bf16_model
    config = from_dict({"model_name_or_path": str(base), "adapter_name_or_path": str(adapter),
                        "export_dir": str(tmp_path / "merged"), **settings})
    out = run_export(config)
    assert saved_dtypes(out) == {dtype}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    # base + B @ A x alpha / r in float64, from the files; the base as it is stored (bf16 for the bf16 model)
    expected = merged_by_hand(base, [adapter]).state_dict()
    stored = merged_by_hand(base, []).state_dict()
    weights, products = saved_weights(out), abs_products(adapter)
    u = UNIT_ROUNDOFF[dtype]
    for name, want in expected.items():
        if name not in weights:
            continue  # a tied head is saved once
        got = weights[name].double()
        delta = (want - stored[name]).abs()
        # the base loaded in the dtype (one rounding, none if it was stored so), B @ A in float32 (r products: at
        # most r u32 |B| @ |A|), the delta and the sum rounded to the dtype; plus the spacing of float16's subnormals
        matmul = 8 * UNIT_ROUNDOFF[torch.float32] * products.get(name, torch.zeros_like(want))
        bound = (2 * u * (stored[name].abs() + delta) + u * want.abs() + matmul
                 + 2 * u * torch.finfo(dtype).smallest_normal)
        assert ((got - want).abs() <= bound).all(), (name, (got - want).abs().max().item())
    assert any((expected[k] != stored[k]).any() for k in expected)  # the adapter changed something
