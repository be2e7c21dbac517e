"""SFT -> DPO: starting from an SFT adapter (adapter_name_or_path), and a reference of one's own (ref_model).

Expected log-probs come from an independent float64 computation: the adapters merged into the base weights by
hand (W + B A alpha/r, read from the saved files) and a plain full-logits forward; or, for the 4-bit base, PEFT's own
forward on a bitsandbytes model that transformers loads.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lean import modeling, precompute, scoring, train
from dpo_lean.config import from_dict
from dpo_lean.data.pipeline import prepare_data
from dpo_lean.errors import DpoLeanError
from dpo_lean.layout import collate_pairs
from dpo_lean.logprobs import batch_logps
from dpo_lean.tiny import build_tokenizer, write_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # PEFT on transformers 5
TINY = FIXTURES / "tiny-model"
SHORT = dict(max_samples=24, val_size=8, per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=3,
             learning_rate=5e-3, pref_beta=0.5, logging_steps=1, save_strategy="no", eval_on_start=True,
             eval_steps=3, lr_scheduler_type="linear")


def make_adapter(path: Path, seed: int, targets=("q_proj", "v_proj", "down_proj"), r: int = 4) -> Path:
    """A LoRA adapter on the tiny model with non-zero (seeded, random) A and B, saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(path)
    return path


def merged_by_hand(model_dir: Path, adapters: list[Path]):
    """The base in float64 with each adapter's W += B @ A * alpha / r added, read from its saved files."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).double().eval()
    modules = dict(model.named_modules())
    for adapter in adapters:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        weights = load_file(adapter / "adapter_model.safetensors")
        for key, a in weights.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = weights[key.replace("lora_A", "lora_B")]
                with torch.no_grad():
                    modules[name].weight += (b.double() @ a.double()) * cfg["lora_alpha"] / cfg["r"]
    return model


def full_logits_logps(model, rows) -> torch.Tensor:
    """[chosen..., rejected...] summed completion log-probs, one unpadded sequence at a time, full logits."""
    out = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for r in rows:
            for side in out:
                completion = getattr(r, f"{side}_ids")
                ids = torch.tensor([r.prompt_ids + completion])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
                n = len(r.prompt_ids)
                out[side].append(sum(logp[n - 1 + t, tok].item() for t, tok in enumerate(completion)))
    return torch.tensor(out["chosen"] + out["rejected"], dtype=torch.float64)


def cached(config) -> dict[int, tuple[float, float]]:
    import pyarrow.dataset as ds

    table = ds.dataset(config.resolved_ref_cache_dir).to_table().to_pydict()
    return {i: (c, r) for i, c, r in zip(table["row_index"], table["ref_chosen_logps"], table["ref_rejected_logps"])}


def as_tensor(by_row: dict, rows) -> torch.Tensor:
    return torch.tensor([by_row[r.row_index][0] for r in rows] + [by_row[r.row_index][1] for r in rows],
                        dtype=torch.float64)


def rows_of(config):
    return prepare_data(config, modeling.load_tokenizer(config)).rows


def raw_config(tmp_path: Path, **overrides) -> dict:
    from make_fixtures import fixture_config

    return {**fixture_config(FIXTURES), "output_dir": str(tmp_path / "out"), "ref_cache_dir": str(tmp_path / "cache"),
            **overrides}


def record_first_training_forward(monkeypatch) -> dict:
    """Wrap train's batch_scores: keep the rows and policy log-probs of the first training forward."""
    first: dict = {}
    original = train.batch_scores

    def recording(model, inputs, *args, **kwargs):
        scores = original(model, inputs, *args, **kwargs)
        if model.training and not first:
            first["row_index"] = inputs["row_index"].tolist()
            first["logps"] = scores["logps"].detach().double().cpu()
        return scores

    monkeypatch.setattr(train, "batch_scores", recording)
    return first


# ---------------------------------------------------------------- precompute starts from the adapter


def test_precompute_with_an_adapter_scores_base_plus_adapter(tmp_path):
    sft = make_adapter(tmp_path / "sft", seed=1)
    config = from_dict(raw_config(tmp_path, quantization_bit=None, max_samples=16, adapter_name_or_path=str(sft)))
    precompute.run_precompute(config)
    rows = rows_of(config)
    got = as_tensor(cached(config), rows)
    expected = full_logits_logps(merged_by_hand(TINY, [sft]), rows)
    bare = full_logits_logps(merged_by_hand(TINY, []), rows)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert (got - bare).abs().min() > 1e-2  # every row's reference moved: the adapter is in it


# ---------------------------------------------------------------- train continues it (4-bit base, the fixture's)


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    """SFT adapter -> precompute -> 3 training steps on the 4-bit tiny base; shared by several tests."""
    tmp = tmp_path_factory.mktemp("sft_dpo")
    sft = make_adapter(tmp / "sft", seed=2)
    config = from_dict(raw_config(tmp, adapter_name_or_path=str(sft), **SHORT))
    precompute.run_precompute(config)
    mp = pytest.MonkeyPatch()
    first = record_first_training_forward(mp)
    try:
        train.run_train(config)
    finally:
        mp.undo()
    history = json.loads((config.metrics_dir / "log_history.json").read_text())
    return config, sft, first, history


def peft_4bit_oracle(adapter: Path, rows) -> torch.Tensor:
    """PEFT's own forward on the NF4 base as transformers loads it (training-mode kernel, no dropout)."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32, quantization_config=bnb)
    model = PeftModel.from_pretrained(base, adapter)
    model.train()  # bitsandbytes repacks a 4-bit layer for good after an eval-mode forward on x86 CPUs
    return full_logits_logps(model, rows)


def test_training_starts_from_the_adapter_at_loss_ln2(continued):
    config, sft, first, history = continued
    by_index = {r.row_index: r for r in rows_of(config)}
    rows = [by_index[i] for i in first["row_index"]]
    torch.testing.assert_close(first["logps"], peft_4bit_oracle(sft, rows), rtol=0, atol=1e-4)
    torch.testing.assert_close(first["logps"], as_tensor(cached(config), rows), rtol=0, atol=1e-4)
    first_train = next(h for h in history if "loss" in h)
    first_eval = next(h for h in history if "eval_loss" in h)
    assert first_train["step"] == 1 and first_train["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first_eval["step"] == 0 and first_eval["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_the_saved_adapter_is_the_trained_continuation(continued):
    from peft import PeftModel

    config, sft, _, _ = continued
    out = Path(config.output_dir)
    start, trained = load_file(sft / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert trained.keys() == start.keys()  # the adapter's own targets and rank, not lora_rank/lora_target's
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    moved = [(trained[k] - start[k]).norm() / start[k].norm() for k in start if "lora_B" in k]
    assert all(0 < m < 0.5 for m in moved)  # trained on from the SFT weights (a fresh LoRA's B starts at 0)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), str(out))
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 6  # 3 targets x 2 layers


def test_evaluate_and_export_take_the_trained_adapter_not_the_starting_one(continued, tmp_path):
    from dpo_lean.evaluate import run_evaluate
    from dpo_lean.export import run_export

    config, sft, _, history = continued
    results = run_evaluate(config)  # adapter_name_or_path is where training started; output_dir is scored
    last = [h for h in history if "eval_loss" in h][-1]
    assert results["adapter"] == config.output_dir
    assert results["eval_loss"] == pytest.approx(last["eval_loss"], abs=1e-4)
    exported = run_export(from_dict({**config.to_dict(), "export_dir": str(tmp_path / "merged")}))
    merged = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).state_dict()
    by_hand = merged_by_hand(TINY, [Path(config.output_dir)]).state_dict()  # not sft + trained: it continued sft
    assert all(torch.allclose(merged[k].double(), by_hand[k], atol=1e-5) for k in by_hand)


def test_a_cache_built_for_another_adapter_is_refused_naming_the_field(continued, tmp_path):
    config, _, _, _ = continued
    other = make_adapter(tmp_path / "other", seed=3)
    for adapter in (str(other), None):  # another adapter, and none (the bare base)
        with pytest.raises(DpoLeanError) as err:
            scoring.prepare_run(from_dict({**config.to_dict(), "adapter_name_or_path": adapter}))
        message = str(err.value)
        assert "reference.adapters.1.weights_sha256:" in message and "\n" not in message, message
        assert ("weights_sha256: " in message and " -> None" in message) == (adapter is None)


# ---------------------------------------------------------------- several adapters, create_new_adapter (plain base)


@pytest.mark.parametrize("create_new", [False, True])
def test_a_comma_list_merges_in_order_and_create_new_adapter_trains_a_new_lora(tmp_path, create_new):
    a, b = make_adapter(tmp_path / "a", seed=4), make_adapter(tmp_path / "b", seed=5, targets=("o_proj",), r=2)
    config = from_dict(raw_config(tmp_path, quantization_bit=None, max_samples=6, create_new_adapter=create_new,
                                  adapter_name_or_path=f"{a}, {b}"))
    rows = rows_of(config)
    expected = full_logits_logps(merged_by_hand(TINY, [a, b]), rows)
    batch = collate_pairs([r.prompt_ids for r in rows], [r.chosen_ids for r in rows], [r.rejected_ids for r in rows], 0)
    policy = modeling.prepare_policy(config)
    for model in (policy, modeling.prepare_reference(config)):
        with modeling.inference(model):
            torch.testing.assert_close(batch_logps(model, batch).double(), expected, rtol=0, atol=1e-4)
    lora_a = {n: p.shape for n, p in policy.named_parameters() if "lora_A" in n and p.requires_grad}
    if create_new:  # a new LoRA of lora_rank on every linear layer, on the base with both merged
        assert len(lora_a) == 14 and {s[0] for s in lora_a.values()} == {config.lora_rank}
    else:  # b continued (rank 2 on o_proj), a merged
        assert len(lora_a) == 2 and all(".o_proj." in n and s[0] == 2 for n, s in lora_a.items())
    assert modeling.reference_spec(config)["adapters_merged"] == (2 if create_new else 1)


@pytest.mark.parametrize("overrides, fragments", [
    (dict(adapter_name_or_path="{a},{a}"), ("'adapter_name_or_path'", "2 adapters on a 4-bit base", "dpo-lean export")),
    (dict(adapter_name_or_path="{a}", create_new_adapter=True), ("create_new_adapter: true on a 4-bit base",)),
    (dict(adapter_name_or_path="{tmp}/out/checkpoint-2"), ("'adapter_name_or_path'", "lies in output_dir",
                                                          "trained_adapter")),
    (dict(adapter_name_or_path="{tmp}/missing"), ("'adapter_name_or_path'", "missing", "no adapter folder is there")),
    (dict(ref_model="{tmp}/tok", quantization_bit=None), ("'ref_model'", "another tokenizer", "vocabulary")),
])
def test_start_and_reference_mistakes_are_one_line_errors(tmp_path, overrides, fragments):
    a = make_adapter(tmp_path / "a", seed=6)
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    shutil.copytree(a, tmp_path / "out" / "checkpoint-2", dirs_exist_ok=True)
    shutil.copytree(TINY, tmp_path / "tok")
    build_tokenizer(vocab_size=700).save_pretrained(tmp_path / "tok")
    values = {k: v.format(a=a, tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises(DpoLeanError) as err:
        precompute.run_precompute(from_dict(raw_config(tmp_path, **values)))
    assert "\n" not in str(err.value) and all(f in str(err.value) for f in fragments), str(err.value)


def test_reference_keys_need_ref_model():
    for key, value in (("ref_model_adapters", "x"), ("ref_model_quantization_bit", 4)):
        with pytest.raises(DpoLeanError, match=f"'{key}' needs ref_model"):
            from_dict({key: value})


# ---------------------------------------------------------------- a reference of one's own


def test_ref_model_is_used_by_precompute_and_never_loaded_by_train(tmp_path, monkeypatch, capsys):
    other = write_tiny_model(tmp_path / "ref-model", seed=1)
    config = from_dict(raw_config(tmp_path, quantization_bit=None, ref_model=str(other),
                                  **{**SHORT, "eval_on_start": False, "val_size": 0, "eval_steps": None}))
    precompute.run_precompute(config)
    rows = rows_of(config)
    ref = full_logits_logps(merged_by_hand(other, []), rows)
    torch.testing.assert_close(as_tensor(cached(config), rows), ref, rtol=0, atol=1e-4)
    gap = full_logits_logps(merged_by_hand(TINY, []), rows) - ref  # policy at step 0 = base (a new LoRA adds 0)

    loaded = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def watch(name, *args, _original=original, **kwargs):
            loaded.append(str(name))
            if Path(name) == other:
                raise AssertionError("train loaded ref_model")
            return _original(name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", watch)
    first = record_first_training_forward(monkeypatch)
    capsys.readouterr()
    train.run_train(config)
    assert loaded and str(other) not in loaded
    printed = capsys.readouterr().out
    assert "step 0: mean log-ratio policy - reference over the first step's 4 pairs" in printed

    position = {r.row_index: i for i, r in enumerate(rows)}
    step = [position[i] for i in first["row_index"]]
    chosen, rejected = gap[:len(rows)][step].mean().item(), gap[len(rows):][step].mean().item()
    summary = json.loads((config.metrics_dir / "summary.json").read_text())
    assert summary["step0_logratios"]["chosen"] == pytest.approx(chosen, abs=1e-4)
    assert summary["step0_logratios"]["rejected"] == pytest.approx(rejected, abs=1e-4)
    assert abs(chosen) > 1e-2  # another checkpoint: policy and reference start apart
    shown = re.search(r"chosen ([-+][\d.]+), rejected ([-+][\d.]+) nats", printed)
    assert [float(x) for x in shown.groups()] == pytest.approx([chosen, rejected], abs=1e-3)

    with pytest.raises(DpoLeanError, match=r"reference\.model\.config_sha256: .* -> None"):
        scoring.prepare_run(from_dict({**config.to_dict(), "ref_model": None}))


def test_an_lf_export_config_merges_its_adapters_in_order_in_shards_of_export_size(tmp_path, monkeypatch):
    import transformers

    from dpo_lean.export import run_export

    a, b = make_adapter(tmp_path / "a", seed=7), make_adapter(tmp_path / "b", seed=8, targets=("q_proj",), r=2)
    shard_sizes = []
    original = transformers.PreTrainedModel.save_pretrained

    def spy(self, *args, **kwargs):
        shard_sizes.append(kwargs.get("max_shard_size"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", spy)
    config = from_dict({"model_name_or_path": str(TINY), "adapter_name_or_path": f"{a},{b}", "export_size": 2,
                        "export_dir": str(tmp_path / "merged"), "export_device": "cpu"})
    merged = AutoModelForCausalLM.from_pretrained(run_export(config), dtype=torch.float32).state_dict()
    by_hand = merged_by_hand(TINY, [a, b]).state_dict()
    assert all(torch.allclose(merged[k].double(), by_hand[k], atol=1e-5) for k in by_hand)
    assert shard_sizes == ["2GB"]
