"""Model preparation: 4-bit base, dtypes kept, LoRA only trainable, the eval-mode kernel guard."""

from __future__ import annotations

import torch

from dpo_lean import modeling
from dpo_lean.data.collate import collate_pairs
from dpo_lean.logprobs import batch_logps


def test_policy_keeps_embeddings_and_head_in_compute_dtype_and_trains_lora_only(tiny_config):
    policy = modeling.prepare_policy(tiny_config(copy_cache=False))
    base = policy.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.float32  # the CPU compute dtype, not upcast or cast
    assert policy.get_output_embeddings().head.weight.dtype == torch.float32
    assert not base.get_input_embeddings().weight.requires_grad
    assert not policy.get_output_embeddings().head.weight.requires_grad
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    import bitsandbytes as bnb
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in policy.modules())


def test_eval_mode_forward_does_not_switch_the_4bit_kernel(tiny_config):
    """After an eval-mode no-grad forward the 4-bit policy gives the same values and still trains."""
    policy = modeling.prepare_policy(tiny_config(copy_cache=False))
    batch = collate_pairs([[1, 50, 60]], [[90, 100, 2]], [[200, 2]], pad_id=0)
    policy.train()
    before = batch_logps(policy, batch)
    with modeling.inference(policy):
        during = batch_logps(policy, batch)
    policy.eval()  # as Trainer.evaluate does, without our context manager
    with torch.no_grad():
        batch_logps(policy, batch)
    policy.train()
    after = batch_logps(policy, batch)
    after.sum().backward()  # would fail if the weights had been repacked for inference
    assert torch.equal(before, during) and torch.equal(before, after)


def test_plain_dtype_without_quantization(tiny_config):
    import bitsandbytes as bnb
    model = modeling.prepare_reference(tiny_config(copy_cache=False, quantization_bit=None))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_a_quantised_output_head_is_refused_with_one_line():
    """A 4-bit head (uint8 storage) cannot be multiplied in chunks by logprobs: a one-line error, not wrong numbers."""
    import bitsandbytes as bnb
    import pytest

    from dpo_lean.errors import DpoLeanError
    from dpo_lean.tiny import build_model

    model = build_model(vocab_size=100, hidden_size=64, num_layers=1)
    model.set_output_embeddings(bnb.nn.Linear4bit(64, 100, bias=False, quant_type="nf4").to("cpu"))
    with pytest.raises(DpoLeanError) as err:
        modeling.defer_output_head(model)
    assert "output head is quantised" in str(err.value) and "\n" not in str(err.value)
    assert not isinstance(model.get_output_embeddings(), modeling.DeferredHead)
