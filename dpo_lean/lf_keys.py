"""LLaMA-Factory 0.9.5 keys that dpo-lean has no config key for, and what it does with each.

Every key ``llamafactory-cli train`` takes (and every key of LF's DPO, QLoRA and merge examples) is one of:

- honoured: a key of :class:`dpo_lean.config.Config`, with LF's meaning (its ``lf`` metadata says so);
- no effect: accepted with any value and documented as meaning nothing here (``NO_EFFECT``; a few are Config keys);
- refused: a one-line error with the reason (``REFUSED``), unless its value is the one that asks for what
  dpo-lean does anyway (almost always LF's default, e.g. ``use_unsloth: false``), which is accepted.

tests/test_lf_keys.py walks the list of LF's keys (tests/fixtures/lf_keys.json, read from LF's source by
tools/lf_keys.py) and checks each against this module and the Config.
"""

from __future__ import annotations

from .errors import DpoLeanError

HONOURED, NO_EFFECT_STATUS, REFUSED_STATUS = "honoured", "no effect", "refused"
_ANY = object()  # a refused key that no value makes acceptable


def _refuse(reason: str, **accepted) -> dict[str, tuple[tuple, str]]:
    """{key: (values accepted because they ask for what dpo-lean does, reason)}; a tuple value lists several."""
    return {k: (v if isinstance(v, tuple) else (v,), reason) for k, v in accepted.items()}


_TEXT_ONLY = "dpo-lean trains text-only models; images, video and audio are not supported"
_LORA_ONLY = "dpo-lean trains LoRA adapters only (finetuning_type: lora)"
_OPTIMIZERS = "dpo-lean trains LoRA with transformers' optimizers (optim); this optimizer is not supported"
_TRACKERS = "report_to takes none, tensorboard or wandb"
_HUB = "dpo-lean does not push to the hub; upload output_dir (or export_dir) yourself"
_TOKENS = "dpo-lean reads no tokens from configs; log in with `hf auth login` or set HF_TOKEN"
_TOKENIZER = "dpo-lean uses the model's tokenizer as it is (the reference cache is built on its ids)"
_KERNELS = "dpo-lean runs plain transformers + PEFT modules; kernel patches are not supported"
_PARALLEL = "launch with torchrun or accelerate launch (one process per GPU: DDP, or FSDP with fsdp) or set deepspeed"
_ORDER = "dpo-lean orders rows by seed and group_by_length, the same way on every run and resume"
_NOT_DPO = "dpo-lean runs the DPO stage only"
_V1 = "a LLaMA-Factory v1 config key; dpo-lean reads v0 configs"

REFUSED: dict[str, tuple[tuple, str]] = {
    # --- model
    **_refuse("adapter_name_or_path names the adapter folder itself", adapter_folder=None),
    **_refuse(_TOKENIZER, add_special_tokens=None, add_tokens=None, new_special_tokens_config=None,
              init_special_tokens="noise_init", resize_vocab=False, split_special_tokens=False,
              use_fast_tokenizer=True),
    **_refuse("dpo-lean uses the model's own position embeddings", rope_scaling=None),
    **_refuse(_KERNELS, shift_attn=False, mixture_of_depths=None, use_unsloth=False, use_unsloth_gc=False,
              enable_liger_kernel=False, use_liger_kernel=False, liger_kernel_config=None, use_v1_kernels=False,
              torch_compile=False, torch_compile_backend=None, torch_compile_mode=None),
    **_refuse("DPO starts from trained weights", train_from_scratch=False),
    **_refuse("dpo-lean keeps layer norms and the head in the compute dtype (log-probs are float32 anyway)",
              upcast_layernorm=False, upcast_lmhead_output=False),
    **_refuse(_TOKENS, hf_hub_token=None, ms_hub_token=None, om_hub_token=None, hub_token=None),
    **_refuse("dpo-lean quantises with bitsandbytes on the process's device", quantization_device_map=None),
    **_refuse(_TEXT_ONLY, image_max_pixels=768 * 768, image_min_pixels=32 * 32, image_do_pan_and_scan=False,
              crop_to_patches=False, video_max_pixels=256 * 256, video_min_pixels=16 * 16, video_fps=2.0,
              video_maxlen=128, use_audio_in_video=False, audio_sampling_rate=16000, media_dir=None,
              freeze_vision_tower=True, freeze_multi_modal_projector=True, freeze_language_model=False),
    **_refuse("KTransformers is not supported", use_kt=False, kt_weight_path=None, kt_expert_checkpoint_path=None,
              kt_use_lora_experts=None, kt_lora_expert_num=None, kt_lora_expert_intermediate_size=None),
    # --- export
    **_refuse("export runs on the CPU (the merge needs no accelerator)", export_device="cpu"),
    **_refuse("export writes safetensors only", export_legacy_format=False),
    **_refuse("export saves the merged model unquantised; quantise it with a GPTQ/AWQ tool afterwards",
              export_quantization_bit=None, export_quantization_dataset=None, export_quantization_nsamples=128,
              export_quantization_maxlen=1024),
    **_refuse(_HUB, export_hub_model_id=None, push_to_hub=False, hub_model_id=None, hub_strategy="every_save",
              hub_private_repo=None, hub_always_push=False, hub_revision=None),
    # --- data
    **_refuse("DPO scores the completions only (never the prompt or earlier turns)", train_on_prompt=False,
              mask_history=False),
    **_refuse("padding never counts in a log-prob", ignore_pad_token_for_loss=True),
    **_refuse("streaming is not supported yet; dpo-lean reads the whole dataset", streaming=False,
              buffer_size=16384),
    **_refuse("several datasets are concatenated in order", mix_strategy="concat", interleave_probs=None),
    **_refuse("eval_dataset's rows are scored as one set", eval_on_each_dataset=False),
    **_refuse("dpo-lean never packs sequences (each pair is its own row; prefix_sharing shares the prompt)",
              packing=(None, False), neat_packing=False),
    **_refuse("tool calls are not formatted; put them in the message text", tool_format=None),
    **_refuse("tokenised data is not read from or saved to a path", tokenized_path=None),
    **_refuse("each process reads the data itself", data_shared_file_system=False),
    # --- method
    **_refuse("dpo-lean trains with mixed precision (bf16/fp16) on a frozen base", pure_bf16=False),
    **_refuse(_LORA_ONLY, use_llama_pro=False, freeze_trainable_layers=2, freeze_trainable_modules="all",
              freeze_extra_modules=None, additional_target=None, oft_rank=0, oft_block_size=32, oft_target="all",
              module_dropout=0.0),
    **_refuse("dpo-lean trains plain LoRA (no LoRA+, rsLoRA, DoRA or PiSSA)", loraplus_lr_ratio=None,
              loraplus_lr_embedding=1e-6, use_rslora=False, use_dora=False, pissa_init=False, pissa_iter=16,
              pissa_convert=False),
    **_refuse(_OPTIMIZERS, use_galore=False, galore_target="all", galore_rank=16, galore_update_interval=200,
              galore_scale=2.0, galore_proj_type="std", galore_layerwise=False, use_apollo=False,
              apollo_target="all", apollo_rank=16, apollo_update_interval=200, apollo_scale=32.0,
              apollo_proj="random", apollo_proj_type="std", apollo_scale_type="channel", apollo_layerwise=False,
              apollo_scale_front=False, use_badam=False, badam_mode="layer", badam_start_block=None,
              badam_switch_mode="ascending", badam_switch_interval=50, badam_update_ratio=0.05,
              badam_mask_mode="adjacent", badam_verbose=0, use_adam_mini=False, use_muon=False, optim_args=None,
              optim_target_modules=None),
    **_refuse("these are SFT losses; DPO's is pref_loss", use_dft_loss=False, use_asft_loss=False, asft_alpha=0.1,
              use_eaft_loss=False, eaft_alpha=1.0),
    **_refuse(_NOT_DPO, kto_chosen_weight=1.0, kto_rejected_weight=1.0, ppo_buffer_size=1, ppo_epochs=4,
              ppo_score_norm=False, ppo_target=6.0, ppo_whiten_rewards=False, reward_model=None,
              reward_model_adapters=None, reward_model_quantization_bit=None, reward_model_type="lora",
              do_predict=False, predict_with_generate=False),
    **_refuse(_PARALLEL, use_mca=False, use_hyper_parallel=False, hyper_parallel_args=None, ray_num_workers=1,
              ray_init_kwargs=None, master_addr=None, master_port=None,
              parallelism_config=None, accelerator_config=None, ddp_backend=None, ddp_bucket_cap_mb=None,
              ddp_broadcast_buffers=None, ddp_static_graph=None, ddp_find_unused_parameters=(None, False)),
    **_refuse(_TRACKERS, use_swanlab=False, swanlab_project="llamafactory", swanlab_workspace=None,
              swanlab_run_name=None, swanlab_mode="cloud", swanlab_api_key=None, swanlab_logdir=None,
              swanlab_lark_webhook_url=None, swanlab_lark_secret=None, project="huggingface",
              trackio_space_id=None, trackio_bucket_id=None, trackio_static_space_id=None),
    **_refuse(_ORDER, disable_shuffling=False, data_seed=None, train_sampling_strategy="random",
              dataloader_in_order=True, ignore_data_skip=False),
    **_refuse("training runs to the end; summary.json names the best eval step", early_stopping_steps=None,
              load_best_model_at_end=False, metric_for_best_model=None, greater_is_better=None),
    # --- training
    **_refuse("FP8 training is not supported", fp8=False, fp8_backend="auto", fp8_enable_fsdp_float8_all_gather=False),
    **_refuse("the torch profiler is not wired in", enable_torch_profiler=False, profiler_output_dir=None,
              profiler_wait_steps=1, profiler_warmup_steps=1, profiler_active_steps=1, profiler_repeat=1,
              profiler_record_shapes=True, profiler_profile_memory=True, profiler_with_stack=True,
              profile_modules=None),
    **_refuse("gradient checkpointing is on unless disable_gradient_checkpointing: true", gradient_checkpointing=(None, True),
              gradient_checkpointing_kwargs=None, activation_checkpointing=(None, True),
              activation_checkpointing_kwargs=None),
    **_refuse("evaluation runs in the training precision", bf16_full_eval=False, fp16_full_eval=False),
    **_refuse("dpo-lean leaves TF32 at torch's setting", tf32=None),
    **_refuse("the DPO loss has dpo_label_smoothing", label_smoothing_factor=0.0),
    **_refuse("NEFTune noise is not supported", neftune_noise_alpha=None),
    **_refuse("dpo-lean logs every logging_steps steps", logging_strategy="steps"),
    **_refuse("tokens_per_second is always logged", include_num_input_tokens_seen="no"),
    **_refuse("evaluation follows eval_strategy/eval_steps from the first step", eval_delay=0),
    **_refuse("set per_device_train_batch_size yourself", auto_find_batch_size=False),
    **_refuse("dpo-lean does not empty the CUDA cache between steps", torch_empty_cache_steps=None),
    **_refuse("the model runs without a KV cache in training", use_cache=False),
    **_refuse("set CUDA_VISIBLE_DEVICES= to run on the CPU", use_cpu=False),
    **_refuse("dpo-lean keeps every batch (a short last batch included)", dataloader_drop_last=False),
    **_refuse("the data loader runs with transformers' defaults", dataloader_pin_memory=True,
              dataloader_persistent_workers=False, dataloader_prefetch_factor=None,
              dataloader_multiprocessing_context=None),
    **_refuse("only the main process saves", save_on_each_node=False),
    **_refuse("checkpoints are saved every save_steps and on Ctrl-C", enable_jit_checkpoint=False),
    **_refuse("callback states are not restored on resume", restore_callback_states_from_checkpoint=False),
    **_refuse("determinism: same seed, same results on CPU (see docs/reliability.md)", full_determinism=False),
    **_refuse("transformers' debug modes are not wired in", debug=""),
    # --- LLaMA-Factory v1 configs (examples/v1)
    **{k: ((_ANY,), f"{_V1}: {hint}") for k, hint in {
        "model": "write model_name_or_path", "model_class": "dpo-lean loads AutoModelForCausalLM",
        "peft_config": "write lora_rank, lora_alpha, lora_dropout, lora_target",
        "quant_config": "write quantization_bit: 4", "kernel_config": "kernel patches are not supported",
        "dist_config": _PARALLEL, "train_dataset": "write dataset (and dataset_dir)",
        "micro_batch_size": "write per_device_train_batch_size", "sample_backend": "dpo-lean never generates",
    }.items()},
}

# Keys that mean nothing here, whatever their value (most mean nothing in LF's DPO training either).
NO_EFFECT: dict[str, str] = {
    **dict.fromkeys(("do_sample", "temperature", "top_p", "top_k", "num_beams", "max_length", "max_new_tokens",
                     "repetition_penalty", "length_penalty", "skip_special_tokens", "eval_num_beams",
                     "generation_max_length", "generation_num_beams", "generation_config", "infer_backend",
                     "use_kv_cache", "vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager",
                     "vllm_max_lora_rank", "vllm_config", "sglang_maxlen", "sglang_mem_fraction", "sglang_tp_size",
                     "sglang_config", "sglang_lora_backend", "sortish_sampler"),
                    "generation and inference settings: DPO training never generates"),
    **dict.fromkeys(("prediction_loss_only", "eval_accumulation_steps", "eval_do_concat_batches",
                     "eval_use_gather_object", "include_for_metrics", "batch_eval_metrics", "label_names",
                     "compute_accuracy"),
                    "evaluation keeps per-row metrics only (no predictions or token accuracy)"),
    "do_eval": "evaluation follows eval_strategy whenever there are held-out rows",
    "length_column_name": "group_by_length uses the pairs' own token counts",
    "remove_unused_columns": "dpo-lean builds its batches itself",
    "average_tokens_across_devices": "the preference loss is a mean over pairs, not tokens",
    "logging_nan_inf_filter": "a non-finite step stops training (or is skipped with skip_nonfinite_steps)",
    "use_reentrant_gc": "checkpointing is always non-reentrant (the gradients are the same)",
    "low_cpu_mem_usage": "transformers always loads weights without a second copy",
    "offload_folder": "nothing is offloaded to disk",
    "print_param_status": "a debugging printout",
    "moe_aux_loss_coef": ("LLaMA-Factory 0.9.5's DPO trainer never adds the MoE router's auxiliary loss to the DPO loss "
                          "(its concatenated_forward reads only the logits), nor does dpo-lean: training minimises "
                          "the preference loss alone (TRL's DPOTrainer adds it, router_aux_loss_coef)"),
    "include_effective_tokens_per_second": "tokens_per_second is always logged",
    "preprocessing_batch_size": "tokenisation batching does not change its result",
    "skip_memory_metrics": "peak_memory_gb is always logged",
    "log_level": "dpo-lean keeps the libraries' logs quiet", "log_level_replica": "dpo-lean keeps the libraries' logs quiet",
    "log_on_each_node": "only the main process prints",
    "local_rank": "set by torchrun/accelerate (LOCAL_RANK)",
    "logging_first_step": "the first step is always logged (its loss shows where policy and reference start)",
}


def _same(value, accepted) -> bool:
    if accepted is _ANY:
        return False
    if isinstance(accepted, bool) or isinstance(value, bool):
        return value is accepted
    if isinstance(accepted, (int, float)) and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-6 as a string
            return float(value) == accepted
        except ValueError:
            return False
    return value == accepted


def _shown(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else repr(v) if v == "" else str(v)


def check(name: str, value) -> bool:
    """True if ``name`` is an LF key dpo-lean accepts with this value and ignores; a one-line error if refused;
    False if it is not an LF key dpo-lean knows of."""
    if name in NO_EFFECT:
        return True
    if name not in REFUSED:
        return False
    accepted, reason = REFUSED[name]
    if any(_same(value, a) for a in accepted):
        return True
    if accepted == (_ANY,):
        raise DpoLeanError(f"config key '{name}' is not supported: {reason}")
    fix = " or ".join(_shown(a) for a in accepted)
    raise DpoLeanError(f"config key '{name}': {_shown(value)} is not supported ({reason}); remove it or set it to {fix}")


def accepted_values(name: str) -> str:
    """How the table shows a refused key: 'only at false', 'never'."""
    accepted = REFUSED[name][0]
    return "never" if accepted == (_ANY,) else " or ".join(_shown(a) for a in accepted)
