"""``dpo-lean export``: merge the trained adapter into an unquantised copy of the base and save it.

What is merged, in order:
- in a training config (``dataset`` set, or ``trained_adapter`` set): the adapters adapter_name_or_path merged into
  the base before training (all but the continued one; all with create_new_adapter), then the trained adapter
  (``trained_adapter``, default the one in output_dir). That is the policy training produced.
- in a config without ``dataset`` (LLaMA-Factory's export configs: model_name_or_path, adapter_name_or_path,
  export_dir): every adapter of adapter_name_or_path, in order, as LF's export merges them.

The merge goes into the base at its original precision (not the 4-bit weights the adapter was trained
on), as every QLoRA merge does; the merged model differs from 4-bit base + adapter by the 4-bit
quantisation error, and equals plain base + adapter within float rounding.

The merged model is written in the dtype asked for (infer_dtype; else bfloat16 with bf16, float16 with fp16), else
in the model's own (its config.json's dtype), as LLaMA-Factory's export: never in the float32 a machine without a
GPU computes in (a 7B model would be about 30 GB, and take as much memory to write). The base is loaded in that
dtype, so the merge needs no more memory than the model itself.

Like training, export loads weights from safetensors only unless ``use_safetensors_only: false``: a
pickle-based file (``pytorch_model.bin``, ``adapter_model.bin``) can run code when it is loaded.
"""

from __future__ import annotations

from pathlib import Path

import click

from . import adapters, modeling
from .adapters import Stack
from .config import Config, require
from .data.templates import fix_jinja_template
from .errors import DpoLeanError

_TRUST_HINT = "set use_safetensors_only: false only if you trust its pickle weights"


def load_plain_base(config: Config, dtype):
    """The base at its original precision (no quantisation), loaded as the config allows (safetensors, remote code)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(revision=config.model_revision, cache_dir=config.cache_dir, dtype=dtype,
                  trust_remote_code=config.trust_remote_code)
    if config.use_safetensors_only:
        kwargs["use_safetensors"] = True
    try:
        return AutoModelForCausalLM.from_pretrained(config.model_name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        msg = modeling._first_line(e)
        hint = f" ({_TRUST_HINT})" if "safetensors" in msg.lower() else ""
        raise DpoLeanError(f"config key 'model_name_or_path': cannot load {config.model_name_or_path!r}: {msg}{hint}") from None


def export_dtype(config: Config):
    """The dtype export loads and writes the model in: infer_dtype, else bf16/fp16 as the config asks, else "auto"
    (transformers' word for the checkpoint's own dtype)."""
    import torch

    if config.infer_dtype != "auto":
        return getattr(torch, config.infer_dtype)
    return torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else "auto"


def merge_stacks(config: Config) -> list[Stack]:
    """The adapters export merges, in order, as stacks named by their config key (see the module docstring)."""
    if config.dataset or config.trained_adapter or not config.adapter_name_or_path:
        trained = config.trained_adapter or config.output_dir
        if not (Path(trained) / "adapter_config.json").is_file():
            key = "trained_adapter" if config.trained_adapter else "output_dir"
            raise DpoLeanError(f"config key '{key}': no adapter in {trained} (adapter_config.json missing); train "
                               "first or set trained_adapter")
        start = adapters.start_stack(config)
        return [Stack(start.merged), Stack((trained,), key="trained_adapter")]
    return [Stack(tuple(adapters.split(config.adapter_name_or_path)))]


def run_export(config: Config) -> Path:
    require(config, "model_name_or_path")
    stacks = merge_stacks(config)
    export_dir = Path(config.export_dir or Path(config.output_dir) / "merged")
    merged = load_plain_base(config, export_dtype(config))
    for stack in stacks:
        merged = adapters.apply(merged, stack, config)
    merged.save_pretrained(export_dir, max_shard_size=f"{config.export_size}GB")
    tokenizer = modeling.load_tokenizer(config)
    template_line = fix_jinja_template(tokenizer, config)  # serving formats prompts as training did
    tokenizer.save_pretrained(export_dir)
    if template_line:
        click.echo(template_line)
    names = " + ".join(p for stack in stacks for p in stack.paths)
    dtype = str(merged.dtype).removeprefix("torch.")
    click.echo(f"merged model ({config.model_name_or_path} + {names}) saved to {export_dir} in {dtype} (loads with "
               "AutoModelForCausalLM.from_pretrained)")
    return export_dir
