"""The adapters on a base model: the run's starting point (adapter_name_or_path), the reference's own
(ref_model_adapters), and the trained adapter that evaluate and export put on top.

A :class:`Stack` is what goes on a base: adapters ``merged`` into its weights in order, then ``top`` kept as a
PEFT adapter. The starting point follows LLaMA-Factory: training continues the last adapter of
adapter_name_or_path after merging those before it; ``create_new_adapter`` merges them all and trains a new LoRA.
On a 4-bit base nothing is merged, so it takes one adapter, continued: LF accepts only one adapter on a quantised
base too (it would not merge into 4-bit weights), and dpo-lean refuses create_new_adapter there rather than
continue the adapter as LF silently does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import DpoLeanError
from .fingerprint import adapter_fingerprint

_MERGE_FIRST = ("merge them first with `dpo-lean export` (model_name_or_path, adapter_name_or_path and export_dir, no "
                "dataset) and use the merged model as model_name_or_path")


@dataclass(frozen=True)
class Stack:
    """Adapters on a base: ``merged`` into its weights in order, then ``top`` as a PEFT adapter (or none)."""

    merged: tuple[str, ...] = ()
    top: str | None = None
    key: str = "adapter_name_or_path"  # the config key that names them, for errors

    @property
    def paths(self) -> tuple[str, ...]:
        return (*self.merged, self.top) if self.top else self.merged


def split(spec: str | None) -> list[str]:
    """A comma list of adapters, as LLaMA-Factory reads adapter_name_or_path."""
    return [p.strip() for p in spec.split(",") if p.strip()] if spec else []


def start_stack(config) -> Stack:
    """The starting point's adapters: the policy at step 0, and the reference unless ref_model is set."""
    paths = split(config.adapter_name_or_path)
    out = Path(config.output_dir).resolve()
    for p in paths:
        if Path(p).exists() and Path(p).resolve().is_relative_to(out):
            raise DpoLeanError(f"config key 'adapter_name_or_path': {p} lies in output_dir, which training writes; it "
                               "names where a run starts, not what it trained (evaluate and export take "
                               "trained_adapter for that): start from a copy outside output_dir")
    if config.quantization_bit == 4 and (len(paths) > 1 or config.create_new_adapter):
        what = f"{len(paths)} adapters" if len(paths) > 1 else "create_new_adapter: true"
        raise DpoLeanError(f"config key 'adapter_name_or_path': {what} on a 4-bit base would merge adapters into "
                           f"NF4 weights (LLaMA-Factory refuses that too); {_MERGE_FIRST}")
    if config.create_new_adapter:
        return Stack(tuple(paths))
    return Stack(tuple(paths[:-1]), paths[-1]) if paths else Stack()


def describe_start(config) -> str:
    """One line saying what the policy starts from, for train's output."""
    stack = start_stack(config)
    merged = f" with {', '.join(stack.merged)} merged in" if stack.merged else ""
    grows = f"continues the adapter {stack.top}" if stack.top else "trains a new LoRA"
    return f"policy: {grows} on {config.model_name_or_path}{merged}"


def reference_stack(config) -> Stack:
    """The reference's adapters: the starting point's, or ref_model_adapters (all merged, as LF loads a reference;
    a 4-bit ref_model takes one, unmerged)."""
    if not config.ref_model:
        return start_stack(config)
    paths = split(config.ref_model_adapters)
    if config.ref_model_quantization_bit != 4:
        return Stack(tuple(paths), None, "ref_model_adapters")
    if len(paths) > 1:
        raise DpoLeanError(f"config key 'ref_model_adapters': {len(paths)} adapters on a 4-bit ref_model would merge "
                           "into NF4 weights (LLaMA-Factory refuses that too); merge them into ref_model first with "
                           "`dpo-lean export` and use the merged model as ref_model")
    return Stack((), paths[0] if paths else None, "ref_model_adapters")


def trained_stack(config, trained: str) -> Stack:
    """The trained policy: the starting point's merged adapters, then the trained adapter (which continued the last
    starting adapter, or is the new LoRA) on top."""
    return Stack(start_stack(config).merged, trained, "trained_adapter")


def check_adapter_weights(config, adapter: Path) -> None:
    """Refuse an adapter whose weights are only in pickle form (adapter_model.bin) unless the config allows it."""
    if not config.use_safetensors_only or (adapter / "adapter_model.safetensors").is_file():
        return
    if (adapter / "adapter_model.bin").is_file():
        raise DpoLeanError(f"{adapter}: the adapter's weights are adapter_model.bin (pickle) and use_safetensors_only is "
                           "on; re-save the adapter as safetensors, or set use_safetensors_only: false only if you "
                           "trust its pickle weights")


def _check_folder(path: str, key: str) -> None:
    local = Path(path)
    if local.exists() and not (local / "adapter_config.json").is_file():
        raise DpoLeanError(f"config key '{key}': {path} holds no adapter (adapter_config.json)")


def apply(model, stack: Stack, config, trainable: bool = False):
    """``model`` with ``stack`` on it: each merged adapter loaded and merged in order, then ``top`` as a PEFT adapter
    (trainable: its weights train on, with the config's lora_dropout)."""
    for path in stack.merged:
        model = _load(model, path, stack.key, config).merge_and_unload()
    return _load(model, stack.top, stack.key, config, trainable) if stack.top else model


def _load(model, path: str, key: str, config, trainable: bool = False):
    from peft import PeftConfig, PeftModel

    _check_folder(path, key)
    check_adapter_weights(config, Path(path))
    hub = dict(revision=config.model_revision, cache_dir=config.cache_dir)
    try:
        peft_config = PeftConfig.from_pretrained(path, **hub)
        if trainable and hasattr(peft_config, "lora_dropout"):
            peft_config.lora_dropout = config.lora_dropout
        with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(model, path, is_trainable=trainable, config=peft_config, **hub)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        lines = str(e).strip().splitlines()
        raise DpoLeanError(f"config key '{key}': cannot load the adapter {path!r} on "
                           f"{getattr(model.config, '_name_or_path', 'the base')!r} "
                           f"({lines[0] if lines else type(e).__name__})") from None


def linear_names(model) -> set[str]:
    """Names of the linear layers LoRA's "all" targets, as LLaMA-Factory's find_all_linear_modules finds them: every
    module whose class name says Linear (nn.Linear, bitsandbytes' Linear4bit, ...) but the output head. A layer that
    subclasses nn.Linear under another name is left out: Phi-MoE's and Llama 4's MoE routers, which return a tuple
    that LoRA cannot wrap (PEFT's all-linear takes them)."""
    head = model.get_output_embeddings()
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if "Linear" in type(m).__name__ and "Embedding" not in type(m).__name__ and m is not head and name}


def continuation_notice(config, adapter: str, peft_config, all_linear: set[str]) -> str | None:
    """One line when lora_rank/lora_alpha/lora_target in the config differ from the continued adapter's own
    (which are what training continues with), else None."""
    wanted = config.lora_target_modules
    wanted = all_linear if wanted == "all-linear" else set(wanted)
    targets = peft_config.target_modules
    targets = set(targets) if not isinstance(targets, str) else all_linear if targets == "all-linear" else {targets}
    if (config.lora_rank, config.resolved_lora_alpha) == (peft_config.r, peft_config.lora_alpha) and wanted == targets:
        return None
    return (f"notice: training continues {adapter} with its own rank {peft_config.r}, alpha {peft_config.lora_alpha} "
            f"and targets {','.join(sorted(targets))}; lora_rank {config.lora_rank}, lora_alpha "
            f"{config.resolved_lora_alpha} and lora_target {config.lora_target} shape a new LoRA only "
            "(create_new_adapter: true)")


def stack_fingerprint(stack: Stack, config) -> dict:
    """For the cache fingerprint: each adapter's digest in order, how many are merged, and (recorded only) where
    they were. Empty for no adapters, so a cache without adapters keeps its fingerprint."""
    if not stack.paths:
        return {}
    return {"adapters": {str(i): adapter_fingerprint(p, config.model_revision, config.cache_dir, stack.key)
                         for i, p in enumerate(stack.paths, 1)},
            "adapters_merged": len(stack.merged), "adapter_paths": list(stack.paths)}
