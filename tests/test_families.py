"""Every model family LLaMA-Factory users bring, on a tiny model of its own (tests/tiny_families.py: its features on,
its logits far from uniform), precomputes and trains right:

- precompute (the command, 4-bit) equals a float64 full-logits forward of the same weights (NF4 dequantised into a
  float64 copy of the model, its own softcapping and scaling included), and so does the shared layout;
- a family whose layers a mask cannot steer (linear attention, convolutions) refuses prefix_sharing: true with its
  reason, and auto falls back to two sequences;
- the first training loss is ln 2 (the policy starts where the reference is), and two steps train.

Each family's model is written and precomputed once (a module fixture), and its float64 values computed once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch
import yaml
from conftest import FIXTURES
from float64_reference import completion_logp, float64_model
from make_fixtures import fixture_config
from test_cli import invoke
from tiny_families import FAMILIES, build_family, write_family

from dpo_lean import cache, modeling
from dpo_lean.config import from_dict
from dpo_lean.data.pipeline import prepare_data
from dpo_lean.errors import DpoLeanError
from dpo_lean.families import disable_dropout
from dpo_lean.layout import Sharing, WindowLayout, collate, prefix_sharing, shared_mask_dtype, window_layout
from dpo_lean.logprobs import batch_logps

ROWS = 8
MOE = {"mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"}
NO_SHARED_MASK = {"qwen3_5_text": "linear_attention", "lfm2": "conv"}  # layer types a mask cannot steer
RELATIVE = 2e-5  # float32 (4-bit dequantised, CPU) from float64: measured up to ~1e-6
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, raw config, the cache's values by row, the float64 values by row) for one family, precomputed."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    raw = {**fixture_config(FIXTURES), "model_name_or_path": str(write_family(name, root / "model")),
           "output_dir": str(root / "out"), "ref_cache_dir": str(root / "ref_cache"), "max_samples": ROWS,
           "cutoff_len": 64, "per_device_train_batch_size": 2, "max_steps": 2, "logging_steps": 1,
           "learning_rate": 1e-3, "save_strategy": "no", "plot_loss": False}
    if name in MOE:  # accepted, and like LLaMA-Factory's DPO no router loss joins the DPO loss (step 0 stays ln 2)
        raw["moe_aux_loss_coef"] = 0.01
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    result = invoke("precompute", root / "config.yaml")
    assert result.exit_code == 0, result.output
    table = cache.scan(root / "ref_cache").table.to_pydict()
    cached = {i: (c, r) for i, c, r in zip(table["row_index"], table["ref_chosen_logps"], table["ref_rejected_logps"])}
    config = from_dict(raw)
    model = modeling.prepare_reference(config)
    plain = float64_model(model, raw["model_name_or_path"])
    rows = prepare_data(config, modeling.load_tokenizer(config)).rows
    expected = {r.row_index: (completion_logp(plain, r.prompt_ids, r.chosen_ids),
                              completion_logp(plain, r.prompt_ids, r.rejected_ids)) for r in rows}
    return name, root, config, model, rows, cached, expected


def _assert_close(ours: dict, expected: dict):
    assert set(ours) == set(expected)
    for row, values in expected.items():
        for a, b in zip(ours[row], values):
            assert abs(a - b) <= RELATIVE * abs(b) + 1e-5, (row, a, b)


def test_precompute_equals_a_float64_forward(family):
    _, _, _, _, _, cached, expected = family
    _assert_close(cached, expected)


def test_both_layouts_equal_a_float64_forward_or_sharing_is_refused_with_its_reason(family):
    """Two sequences per pair, and the shared [prompt | chosen | rejected] row under its 4-D mask (windowed per layer
    type), score as float64 does; a family whose layers a mask cannot steer refuses prefix_sharing: true, naming
    them, and auto falls back to two sequences. (Precompute took whichever layout auto chose.)"""
    name, _, config, model, rows, _, expected = family
    ids = [r.prompt_ids for r in rows], [r.chosen_ids for r in rows], [r.rejected_ids for r in rows]
    batches = [collate(*ids, pad_id=0)]
    layout = window_layout(model)
    if name in NO_SHARED_MASK:
        assert isinstance(layout, str) and NO_SHARED_MASK[name] in layout
        with pytest.raises(DpoLeanError, match=f"cannot use the shared layout.*{NO_SHARED_MASK[name]}"):
            prefix_sharing(dataclasses.replace(config, prefix_sharing=True), model, torch.float32)
        with pytest.warns(UserWarning, match="run as two sequences"):
            assert prefix_sharing(config, model, torch.float32) is None
    else:
        assert isinstance(layout, WindowLayout)
        sharing = Sharing(shared_mask_dtype(model, torch.float32), 64, 128, always=True, window=layout.window,
                          layer_types=layout.layer_types)
        batches.append(collate(*ids, pad_id=0, sharing=sharing))
        assert "position_ids" in batches[-1]  # the shared layout
    for batch in batches:
        with modeling.inference(model):
            logps = batch_logps(model, batch).tolist()
        _assert_close({r.row_index: (logps[i], logps[len(rows) + i]) for i, r in enumerate(rows)}, expected)


def test_first_loss_is_ln2_and_two_steps_train(family):
    _, root, *_ = family
    result = invoke("train", root / "config.yaml")
    assert result.exit_code == 0, result.output
    assert "step 0: policy and reference cache agree" in result.output
    history = json.loads((root / "out" / "dpo_metrics" / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 2 and abs(losses[0] - math.log(2)) < 1e-6 and math.isfinite(losses[1])
    assert (root / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("name", "noise"), [("starcoder2", "residual_dropout"), ("seed_oss", "residual_dropout"),
                                           ("phi", "resid_pdrop"), ("gpt_neox", "hidden_dropout")])
def test_every_dropout_is_off_in_training_mode(name, noise):
    """StarCoder2 and Seed-OSS apply their config's residual_dropout with F.dropout (no nn.Dropout module), Phi its
    resid_pdrop and GPT-NeoX its hidden_dropout through modules: after disable_dropout, a training-mode forward
    equals the eval-mode one."""
    model = build_family(name, 200, **{noise: 0.1})
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        evaluated = model.eval()(input_ids=ids).logits
        assert not torch.equal(model.train()(input_ids=ids).logits, evaluated)  # the noise is on
        disable_dropout(model)
        trained = model.train()(input_ids=ids).logits
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=0)


def test_lowered_softcaps_reach_the_tanh_bend():
    """The tiny Gemma 2 and 4 softcap their logits where it matters: dropping the cap changes them by far more
    than rounding (so the float64 comparisons above would catch a cap not applied)."""
    for name in ("gemma2", "gemma4_text"):
        model = build_family(name, 200)
        ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            capped = torch.log_softmax(model(input_ids=ids).logits, -1)
            model.config.final_logit_softcapping = None
            raw = torch.log_softmax(model(input_ids=ids).logits, -1)
        assert (capped - raw).abs().max() > 1.0, name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert build_family("gemma2", 200).config.attn_logit_softcapping == 3.0


def test_a_family_dpo_lean_cannot_train_is_refused_before_any_weights_load(tiny_config, tmp_path):
    """An encoder-decoder model is refused from its config.json alone (the folder holds no weights at all)."""
    from transformers import AutoConfig

    AutoConfig.for_model("t5", d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64).save_pretrained(tmp_path)
    with pytest.raises(DpoLeanError) as err:
        modeling.load_base_model(tiny_config(copy_cache=False, model_name_or_path=str(tmp_path)))
    assert "is an encoder-decoder model (t5)" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
def test_attention_softcapping_gets_eager_attention_and_sdpa_is_refused(name, tiny_config):
    """SDPA has no softcap: auto loads a model with attn_logit_softcapping (Gemma 2's; Gemma 3's when a config sets
    it) with eager attention, which applies it; flash_attn: sdpa is refused in one line before loading."""
    from dpo_lean.families import attention_implementation

    capped = build_family(name, 64).config
    capped.attn_logit_softcapping = 3.0
    assert attention_implementation(tiny_config(copy_cache=False), capped) == "eager"
    assert attention_implementation(tiny_config(copy_cache=False, flash_attn="fa2"), capped) == "flash_attention_2"
    with pytest.raises(DpoLeanError, match="'flash_attn': sdpa cannot apply .* softcapping .*attn_logit_softcapping: 3.0"):
        attention_implementation(tiny_config(copy_cache=False, flash_attn="sdpa"), capped)
    capped.attn_logit_softcapping = None
    assert attention_implementation(tiny_config(copy_cache=False), capped) is None  # transformers' own choice


def test_a_logit_scale_after_a_biased_head_is_refused():
    """A logit scale commutes with a bias-free head only: scaling the hidden states would miss the bias."""
    model = build_family("cohere", 64)
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    model.set_output_embeddings(biased)
    with pytest.raises(DpoLeanError, match=r"scales its logits \(logit_scale: 0.0625\) after a biased output head"):
        modeling.defer_output_head(model)
    model.config.logit_scale = 1.0
    modeling.defer_output_head(model)
    assert model.get_output_embeddings().head is biased


def test_a_4bit_load_that_quantises_nothing_is_refused(tiny_config, tmp_path):
    """transformers quantises only exact nn.Linear modules: Falcon's FalconLinear layers would stay full precision
    under quantization_bit: 4, silently. A one-line error instead; unquantised it loads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_lean.tiny import build_tokenizer

    config = AutoConfig.for_model("falcon", vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  new_decoder_architecture=True, num_kv_heads=2, bias=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(DpoLeanError) as err:
        modeling.load_base_model(tiny_config(copy_cache=False, model_name_or_path=str(tmp_path)))
    assert "quantised none of 'falcon''s layers (its linear layers are FalconLinear" in str(err.value)
    assert "\n" not in str(err.value)
    modeling.load_base_model(tiny_config(copy_cache=False, model_name_or_path=str(tmp_path), quantization_bit=None))
