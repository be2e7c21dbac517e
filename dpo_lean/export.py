"""``dpo-lean export``: merge the trained adapter into an unquantised copy of the base and save it.

The merge goes into the base at its original precision (not the 4-bit weights the adapter was trained
on), as every QLoRA merge does; the merged model differs from 4-bit base + adapter by the 4-bit
quantisation error, and equals plain base + adapter within float rounding.

Like training, export loads weights from safetensors only unless ``use_safetensors_only: false``: a
pickle-based file (``pytorch_model.bin``, ``adapter_model.bin``) can run code when it is loaded.
"""

from __future__ import annotations

from pathlib import Path

import click

from . import modeling
from .config import Config, require
from .errors import DpoLeanError

_TRUST_HINT = "set use_safetensors_only: false only if you trust its pickle weights"


def check_adapter_weights(config: Config, adapter: Path) -> None:
    """Refuse an adapter whose weights are only in pickle form (adapter_model.bin) unless the config allows it."""
    if not config.use_safetensors_only or (adapter / "adapter_model.safetensors").is_file():
        return
    if (adapter / "adapter_model.bin").is_file():
        raise DpoLeanError(f"{adapter}: the adapter's weights are adapter_model.bin (pickle) and use_safetensors_only is "
                           f"on; re-save the adapter as safetensors, or {_TRUST_HINT}")


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


def run_export(config: Config) -> Path:
    from peft import PeftModel

    require(config, "model_name_or_path")
    adapter = Path(config.adapter_name_or_path or config.output_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise DpoLeanError(f"no adapter in {adapter} (adapter_config.json missing); train first or set "
                           "adapter_name_or_path")
    check_adapter_weights(config, adapter)
    export_dir = Path(config.export_dir or Path(config.output_dir) / "merged")
    base = load_plain_base(config, modeling.compute_dtype(config, modeling.device()))
    try:
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as e:
        raise DpoLeanError(f"config key 'adapter_name_or_path': cannot load the adapter {str(adapter)!r} on "
                           f"{config.model_name_or_path!r} ({modeling._first_line(e)})") from None
    merged.save_pretrained(export_dir)
    modeling.load_tokenizer(config).save_pretrained(export_dir)
    click.echo(f"merged model saved to {export_dir} (loads with AutoModelForCausalLM.from_pretrained)")
    return export_dir
