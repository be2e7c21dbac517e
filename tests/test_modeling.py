"""Model preparation: 4-bit base, dtypes kept, LoRA only trainable, the eval-mode kernel guard."""

from __future__ import annotations

import pytest
import torch

from dpo_lean import modeling
from dpo_lean.errors import DpoLeanError
from dpo_lean.layout import collate_pairs
from dpo_lean.logprobs import batch_logps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_policy_keeps_embeddings_and_head_in_compute_dtype_and_trains_lora_only(tiny_config, monkeypatch, dtype):
    """The unquantised embeddings and head stay in the compute dtype (neither upcast to float32, as PEFT's k-bit
    preparation would, nor left in the checkpoint's float32). A GPU computes in bf16; on a CPU, where the compute
    dtype is always float32, the bf16 case is forced by patching compute_dtype."""
    monkeypatch.setattr(modeling, "compute_dtype", lambda *args, **kwargs: dtype)
    policy = modeling.prepare_policy(tiny_config(copy_cache=False))
    base = policy.get_base_model()
    assert base.get_input_embeddings().weight.dtype == dtype
    assert policy.get_output_embeddings().head.weight.dtype == dtype
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

    from dpo_lean.tiny import build_model

    model = build_model(vocab_size=100, hidden_size=64, num_layers=1)
    model.set_output_embeddings(bnb.nn.Linear4bit(64, 100, bias=False, quant_type="nf4").to("cpu"))
    with pytest.raises(DpoLeanError) as err:
        modeling.defer_output_head(model)
    assert "output head is quantised" in str(err.value) and "\n" not in str(err.value)
    assert not isinstance(model.get_output_embeddings(), modeling.DeferredHead)


def test_each_rank_loads_onto_its_own_gpu_and_makes_it_current(tiny_config, monkeypatch):
    """Under torchrun (LOCAL_RANK=1) the model loads with device_map cuda:1, and cuda:1 is made the current device
    before anything loads, so allocations on plain "cuda" do not pile onto GPU 0 (CUDA functions patched)."""
    import transformers

    calls = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(("set_device", torch.device(dev))))

    def from_pretrained(name, **kwargs):
        calls.append(("load", kwargs["device_map"]))
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    assert modeling.device() == torch.device("cuda", 1)
    calls.clear()
    with pytest.raises(DpoLeanError, match="stop here"):
        modeling.load_base_model(tiny_config(copy_cache=False, quantization_bit=None))
    assert calls == [("set_device", torch.device("cuda", 1)), ("load", {"": 1})]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(DpoLeanError, match="LOCAL_RANK=2, but this process sees 2 GPU"):
        modeling.device()


@pytest.mark.cuda
def test_cuda_device_of_this_rank_is_current_and_holds_the_model(tiny_config, monkeypatch):
    """On a GPU machine: the last visible GPU as LOCAL_RANK holds the model, and plain "cuda" means that GPU."""
    rank = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    model = modeling.prepare_reference(tiny_config(copy_cache=False))
    assert torch.cuda.current_device() == rank
    assert {p.device for p in model.parameters()} == {torch.device("cuda", rank)}
    assert torch.empty(1, device="cuda").device == torch.device("cuda", rank)
