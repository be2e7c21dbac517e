"""Sharding the model over the processes of a launch: FSDP2 (PyTorch's ``fully_shard``) through accelerate, in
train (the 4-bit base, the LoRA weights and their optimizer state) and in precompute (the frozen reference).

A run asks for it as transformers and LLaMA-Factory users do: the config keys ``fsdp`` and ``fsdp_config``
(transformers' TrainingArguments), or ``accelerate launch --config_file F`` where F says ``distributed_type: FSDP``
(accelerate passes it on as FSDP_* environment variables). Either way accelerate builds its FSDP plugin and its
``fsdp2_prepare_model`` shards the model: one FSDP unit per decoder layer, one for the input embeddings, one for
the final norm, and the root. The frozen output head (with the embedding matrix, where it is tied) stays whole on
every process, outside FSDP (:func:`replicate_head`).

What dpo-lean adds to that engine:

- the 4-bit base is stored in the compute dtype (``bnb_4bit_quant_storage``), so FSDP shards its packed weights
  like any other tensor (accelerate keeps uint8-stored 4-bit weights whole on every rank);
- activation checkpointing stays transformers' own (each decoder layer, non-reentrant, switched by
  ``disable_gradient_checkpointing`` as in one process): FSDP2 skips its hooks in the recomputed forward, so no
  layer is gathered twice (counted: the same all-gathers a step with and without it); accelerate's
  ``fsdp_activation_checkpointing`` is refused, since its wrapper renames the layers and PEFT then saves an empty
  adapter;
- accelerate turns its FSDP plugin on for GPU launches only; on CPU (gloo) dpo-lean turns the same plugin on, so
  the CPU tests run the path a GPU run takes;
- the adapter, at the end and in every checkpoint, is the LoRA weights gathered whole: an ordinary PEFT adapter,
  file for file and key for key a one-process run's;
- precompute runs its forwards in lockstep (an FSDP forward is collective): a rank with fewer batches than another
  runs an idle forward (the shortest row, its scores discarded) for each one it lacks, and an out-of-memory batch
  is an error rather than split on one rank;
- the frozen output head is kept whole on every process rather than sharded: the chunked log-probs read it whole
  for the whole step, so a sharded head would be gathered into a whole copy beside its shard, and FSDP2's
  all-gather holds it twice for a moment (measured: ``tools/bench scale-out``);
- what cannot work is refused in one line (:func:`check`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

from . import launch
from .config import Config
from .errors import DpoLeanError

# transformers' fsdp_config keys (an "fsdp_" prefix is dropped, as transformers does) that FSDP2 reads
FSDP2_KEYS = {"version", "reshard_after_forward", "cpu_offload", "activation_checkpointing", "cpu_ram_efficient_loading",
              "state_dict_type", "auto_wrap_policy", "transformer_layer_cls_to_wrap", "min_num_params"}
FSDP1_KEYS = {"backward_prefetch", "forward_prefetch", "use_orig_params", "sync_module_states", "limit_all_gathers",
              "sharding_strategy"}
WORDS = {"full_shard", "shard_grad_op", "offload", "auto_wrap"}  # transformers' legacy `fsdp` values (FSDP2)
FSDP2_ONLY = ("dpo-lean runs FSDP2 (fsdp_version: 2); FSDP1 is deprecated in transformers 5 and not supported here")


def from_launcher() -> bool:
    """True under ``accelerate launch`` with an FSDP config file (accelerate sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1", "yes")


def requested(config: Config) -> bool:
    """Does this run ask for FSDP (config key fsdp, or an accelerate FSDP config)? train and precompute then check
    the launch (:func:`check`)."""
    return config.fsdp not in (None, False, "") or from_launcher()


def active(config: Config) -> bool:
    """Is the model loaded for FSDP in this process: asked for, under a launch of several processes (evaluate and
    export, one process, load it as usual from the same config)."""
    return requested(config) and launch.world_size() > 1


def _fsdp_config(config: Config) -> dict:
    """fsdp_config as a mapping (read from its JSON file if it names one), ``fsdp_`` prefixes dropped."""
    raw = config.fsdp_config
    if isinstance(raw, str):
        try:
            raw = json.loads(Path(raw).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DpoLeanError(f"config key 'fsdp_config': cannot read {raw!r} as a JSON file ({e})") from None
        if not isinstance(raw, dict):
            raise DpoLeanError(f"config key 'fsdp_config': {config.fsdp_config} must hold a JSON object")
    return {str(k).removeprefix("fsdp_"): v for k, v in (raw or {}).items()}


def _words(config: Config) -> list[str]:
    if config.fsdp in (None, False, True, ""):
        return []
    return [w for w in str(config.fsdp).replace(",", " ").split() if w]


def _flag(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "y", "on", "t")


def settings(config: Config) -> dict:
    """The FSDP options the run asks for, as transformers' fsdp_config names them: from the config keys, or from
    accelerate launch's FSDP_* environment (with accelerate's defaults where a variable is unset)."""
    if config.fsdp not in (None, False, ""):
        options = _fsdp_config(config)
        for word in _words(config):
            if word not in WORDS:
                raise DpoLeanError(f"config key 'fsdp': {word!r} is not an FSDP2 option; use true, or "
                                   f"{', '.join(sorted(WORDS))} (hybrid_shard and no_shard are FSDP1's)")
        words = _words(config)
        if "offload" in words:
            options.setdefault("cpu_offload", True)
        if "shard_grad_op" in words:
            options.setdefault("reshard_after_forward", False)
        return {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", **options, "source": "config"}
    env = {"version": ("VERSION", "1"), "auto_wrap_policy": ("AUTO_WRAP_POLICY", "NO_WRAP"),
           "cpu_offload": ("OFFLOAD_PARAMS", "false"), "state_dict_type": ("STATE_DICT_TYPE", "FULL_STATE_DICT"),
           "cpu_ram_efficient_loading": ("CPU_RAM_EFFICIENT_LOADING", "false"),
           "reshard_after_forward": ("RESHARD_AFTER_FORWARD", "true")}
    options = {key: os.environ.get("FSDP_" + name, default) for key, (name, default) in env.items()}
    if "FSDP_ACTIVATION_CHECKPOINTING" in os.environ:
        options["activation_checkpointing"] = os.environ["FSDP_ACTIVATION_CHECKPOINTING"]
    return {**options, "source": "accelerate"}


def check(config: Config, mixed_precision: str = "no", dtype: torch.dtype = torch.float32) -> dict:
    """Refuse, in one line each, what cannot work under FSDP; return :func:`settings`. ``mixed_precision``:
    accelerate's (train's TrainingArguments say it), ``dtype``: the dtype dpo-lean computes in."""
    options = settings(config)
    where = ("config key 'fsdp_config'" if options["source"] == "config" else "accelerate config")
    unknown = set(options) - FSDP2_KEYS - {"source"}
    if options["source"] == "config" and unknown & FSDP1_KEYS:
        raise DpoLeanError(f"{where}: {', '.join(sorted(unknown & FSDP1_KEYS))} are FSDP1 options; {FSDP2_ONLY}")
    if options["source"] == "config" and unknown:
        raise DpoLeanError(f"{where}: unknown FSDP option(s) {', '.join(sorted(unknown))}; FSDP2 takes "
                           f"{', '.join(sorted(FSDP2_KEYS))}")
    if str(options["version"]) != "2":
        hint = " (add fsdp_version: 2 to it)" if options["source"] == "accelerate" else ""
        raise DpoLeanError(f"{where}: fsdp_version is {options['version']}{hint}; {FSDP2_ONLY}")
    if launch.world_size() < 2:
        raise DpoLeanError("FSDP shards the model over the processes of a launch, and this is one process; run "
                           "under torchrun or accelerate launch with 2 or more processes, or remove fsdp")
    if config.deepspeed:
        raise DpoLeanError("config keys 'fsdp' and 'deepspeed' are both set (or FSDP comes from accelerate "
                           "launch): choose one engine")
    if str(options["auto_wrap_policy"]).upper() == "NO_WRAP":
        raise DpoLeanError(f"{where}: fsdp_auto_wrap_policy NO_WRAP puts every layer in one FSDP unit, gathered "
                           "whole for each forward (no memory saved); use TRANSFORMER_BASED_WRAP")
    if config.optim in _bitsandbytes_optimizers():
        raise DpoLeanError(f"config key 'optim': {config.optim} is a bitsandbytes optimizer, whose update kernels "
                           "cannot take FSDP's sharded (DTensor) parameters; use adamw_torch or adamw_torch_fused "
                           "(FSDP shards the optimizer state instead)")
    if _flag(options.get("cpu_offload", False)) and not torch.cuda.is_available():
        raise DpoLeanError(f"{where}: fsdp cpu_offload (fsdp_offload_params) keeps the shards in CPU memory between "
                           "uses, which needs a GPU to offload from (FSDP2 refuses it on a CPU run); remove it")
    sharded_state = "SHARDED" in str(options.get("state_dict_type", "FULL_STATE_DICT")).upper()
    if sharded_state and config.save_only_model:
        raise DpoLeanError(f"{where}: fsdp_state_dict_type SHARDED_STATE_DICT keeps no model state in a "
                           "save_only_model checkpoint (transformers refuses it); use FULL_STATE_DICT or "
                           "save_only_model: false")
    if _flag(options.get("activation_checkpointing", False)):
        raise DpoLeanError(f"{where}: fsdp_activation_checkpointing wraps each layer in a checkpoint wrapper, whose "
                           "renamed parameters PEFT cannot find when it saves (an empty adapter); dpo-lean checkpoints "
                           "the layers itself under FSDP too (disable_gradient_checkpointing): remove it")
    wanted = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if mixed_precision not in (None, "no") and wanted is not dtype:
        raise DpoLeanError(f"accelerate's mixed_precision is {mixed_precision}, but dpo-lean computes in "
                           f"{str(dtype).removeprefix('torch.')} here (config keys bf16/fp16; always float32 on "
                           "CPU): FSDP would cast the 4-bit weights' storage to another dtype; make them agree "
                           "(e.g. accelerate launch --mixed_precision no)")
    return options


def _bitsandbytes_optimizers() -> set[str]:
    """transformers' optimizer names that build a bitsandbytes optimizer (8-bit, paged, ...)."""
    from transformers import trainer_optimizer

    return {str(getattr(o, "value", o)) for o in getattr(trainer_optimizer, "_BITSANDBYTES_OPTIMIZERS", [])}


def notices(config: Config, options: dict) -> list[str]:
    """What an accepted FSDP option does not do here, said once."""
    lines = []
    if config.quantization_bit == 4 and _flag(options.get("cpu_ram_efficient_loading", False)):
        lines.append("fsdp cpu_ram_efficient_loading (accelerate launch turns it on by default): no effect on a "
                     "4-bit base (accelerate and transformers skip it for bitsandbytes weights); each process loads "
                     "the whole NF4 base into CPU memory, then keeps its shard")
    return lines


# ---------------------------------------------------------------- the engine


def trainer_arguments(config: Config) -> dict:
    """The TrainingArguments keys that carry the config's fsdp and fsdp_config (none under accelerate launch)."""
    if config.fsdp in (None, False, ""):
        return {}
    return {"fsdp": config.fsdp, "fsdp_config": _fsdp_config(config)}


def plugin(config: Config, fsdp_plugin_args: dict | None = None):
    """accelerate's FSDP plugin for this run: from the config keys, parsed by transformers' TrainingArguments
    (``fsdp_plugin_args``: a Trainer's, already parsed), or, under accelerate launch, from its environment."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    if fsdp_plugin_args is None and trainer_arguments(config):
        from transformers import TrainingArguments

        args = TrainingArguments(output_dir=config.output_dir, use_cpu=not torch.cuda.is_available(),
                                 report_to="none", **trainer_arguments(config))
        fsdp_plugin_args = args.fsdp_plugin_args
    return FullyShardedDataParallelPlugin(**(fsdp_plugin_args or {}))


def enable(accelerator, fsdp_plugin) -> None:
    """Make ``accelerator`` shard with ``fsdp_plugin``: accelerate does it on GPUs; on CPU (gloo), where accelerate
    leaves FSDP off, dpo-lean switches it on."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    # dpo-lean's output head passes the final hidden states through as a view; nothing changes them in place (the
    # log-probs gather the scored positions into a new tensor), so FSDP's warning about views does not apply
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
    state = accelerator.state
    if getattr(state, "fsdp_plugin", None) is None:
        if state.distributed_type is not DistributedType.MULTI_CPU:
            raise DpoLeanError(f"FSDP was asked for, but accelerate runs {state.distributed_type.value}; launch "
                               "with torchrun or accelerate launch")
        if accelerator.mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)
        state.fsdp_plugin = fsdp_plugin
        state.distributed_type = DistributedType.FSDP  # where accelerate sets it on GPUs: both shared states
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def replicate_head(accelerator, model) -> None:
    """Keep ``model``'s output head (and the embedding matrix, where it is tied: the same parameter) whole on every
    process, out of FSDP's units (accelerate's ``ignored_modules``). Only a frozen head: a trained one
    (``modules_to_save``) stays sharded, since FSDP reduces the gradients of what it shards."""
    head = model.get_output_embeddings()
    params = list(head.parameters()) if head is not None else []
    if params and not any(p.requires_grad for p in params):
        accelerator.state.fsdp_plugin.ignored_modules = [head]


def adapter_state_dict(model) -> dict:
    """The trainable weights (LoRA), gathered whole onto rank 0's CPU (an empty dict on the other ranks); the
    frozen 4-bit base is never gathered. Every rank must call it (it is collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def check_precompute(config: Config) -> None:
    """:func:`check` for precompute, whose processes share the rows one shard each; its notices said once."""
    for line in notices(config, check(config)):
        launch.say(line)
    if config.num_shards != 1:
        raise DpoLeanError(f"config key 'num_shards': {config.num_shards}, but under FSDP the processes of the launch "
                           "compute the reference together, one shard of the rows each; remove num_shards and "
                           "shard_index")


def inference_accelerator(config: Config, dev: torch.device):
    """An accelerator that shards the frozen reference over the launch's processes (precompute): the process group
    (ddp_timeout), the FSDP plugin, no mixed precision (the reference is loaded in its compute dtype)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    fsdp_plugin = plugin(config)
    accelerator = Accelerator(cpu=dev.type == "cpu", mixed_precision="no", fsdp_plugin=fsdp_plugin,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))])
    enable(accelerator, fsdp_plugin)
    return accelerator


def held(model) -> tuple[int, int]:
    """(bytes of the model's parameters this process holds, bytes of all of them): an FSDP (DTensor) parameter
    counts its local shard. Read it while the model is sharded (before a forward gathers a unit)."""
    from torch.distributed.tensor import DTensor

    mine = total = 0
    for p in model.parameters():
        size = p.element_size()
        mine += (p.to_local() if isinstance(p, DTensor) else p).numel() * size
        total += p.numel() * size
    return mine, total


def describe(model) -> str:
    mine, total = held(model)
    return (f"FSDP: this process holds {mine / 2**20:,.2f} MB of the model's {total / 2**20:,.2f} MB of weights "
            f"({mine / max(total, 1):.0%}: its shard of each layer, and the output head whole), gathering each layer "
            "when it runs")


class ReportSharding(TrainerCallback):
    """Says, once training has sharded the model, how much of it the main process holds."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            launch.say(describe(model))


def callbacks(config: Config) -> list[TrainerCallback]:
    return [ReportSharding()] if requested(config) else []
