"""Expected values from outside the project's scoring code: a float64 copy of a (4-bit) model, plain full-logits
forwards, log_softmax, sums over a completion's tokens. Tests compare dpo-lean's numbers with these."""

from __future__ import annotations

import torch


def float64_model(quantised, path: str, adapter: str | None = None):
    """The model at ``path`` in float64, with each NF4 Linear of ``quantised`` (the same model loaded 4-bit)
    dequantised into it, and ``adapter`` (a PEFT LoRA directory) merged on top."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    # eager experts: an MoE's per-expert loop (transformers' grouped matmul takes no float64)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager")
    linears = {name: m for name, m in quantised.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(linears) >= 7, "the model is expected to be 4-bit"
    for name, module in linears.items():
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        plain.get_submodule(name.removeprefix("base_model.model.")).weight.data = weight.to(torch.float64)
    if adapter:
        from peft import PeftModel

        plain = PeftModel.from_pretrained(plain, adapter).double().merge_and_unload()
    return plain.eval()


@torch.no_grad()
def completion_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """sum_t log p(completion_t | prompt, completion_<t) from one full-logits forward of prompt + completion."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return logp.gather(1, ids[0, 1:, None])[len(prompt_ids) - 1:].sum().item()
