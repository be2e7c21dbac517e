"""``dpo-lean export``: merge the trained adapter into an unquantised copy of the base and save it.

The merge goes into the base at its original precision (not the 4-bit weights the adapter was trained
on), as every QLoRA merge does; the merged model differs from 4-bit base + adapter by the 4-bit
quantisation error, and equals plain base + adapter within float rounding.
"""

from __future__ import annotations

from pathlib import Path

import click

from . import modeling
from .config import Config, require
from .errors import DpoLeanError


def run_export(config: Config) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    require(config, "model_name_or_path")
    adapter = Path(config.adapter_name_or_path or config.output_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise DpoLeanError(f"no adapter in {adapter} (adapter_config.json missing); train first or set "
                           "adapter_name_or_path")
    export_dir = Path(config.export_dir or Path(config.output_dir) / "merged")
    dtype = modeling.compute_dtype(config, modeling.device())
    base = AutoModelForCausalLM.from_pretrained(
        config.model_name_or_path, revision=config.model_revision, cache_dir=config.cache_dir, dtype=dtype,
        trust_remote_code=config.trust_remote_code, use_safetensors=config.use_safetensors_only or None)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(export_dir)
    modeling.load_tokenizer(config).save_pretrained(export_dir)
    click.echo(f"merged model saved to {export_dir} (loads with AutoModelForCausalLM.from_pretrained)")
    return export_dir
