"""Phase 2: train the LoRA policy against the reference cache, on transformers' Trainer.

    rows, ref = prepare_run(config)                      # prepared data, memory-mapped; the verified cache
                                                         # joined by id (none for orpo, simpo)
    policy = 4-bit (or plain) base + LoRA                # no reference model, ever
    per batch:  scores = batch_scores(policy, batch)     # the same log-prob function as precompute
                loss = objective.pair_metrics(config, scores, batch)   # preference_loss, TRL's metrics
    Trainer does accumulation, schedule, clipping, checkpoints, resume, logging, trackers.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

from . import adapters, faults, launch, lr_schedule, modeling, sharding
from .config import Config
from .data.pipeline import skip_summary, truncation_note, write_skip_report
from .data.templates import fix_jinja_template
from .errors import DpoLeanError
from .layout import describe_layout, prefix_sharing
from .logprobs import batch_scores
from .measure import memory_metrics
from .objective import RewardBaseline, pair_metrics
from .progress import TrainProgress
from .reporting import tie_note
from .sampling import LengthGroupedSampler
from .scoring import EvalSet, PairCollator, prepare_run, split_eval, to_dataset
from .step_zero import StartCheck


@dataclass
class DpoTrainingArguments(TrainingArguments):
    """TrainingArguments with LLaMA-Factory's warmup_ratio, which transformers 5 dropped (its warmup_steps reads a
    value >= 1 as a count: a ratio of 1.0 passed there is one step)."""

    warmup_ratio: float = 0.0

    def get_warmup_steps(self, num_training_steps: int) -> int:
        return lr_schedule.warmup_steps(int(self.warmup_steps), self.warmup_ratio, num_training_steps)


class DPOLeanTrainer(Trainer):
    """Trainer whose loss is the preference loss against cached reference log-probs; TRL's metric names."""

    def __init__(self, *args, dpo: Config, **kwargs):
        self.dpo = dpo  # before Trainer's __init__, which creates the accelerator (see below)
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a per-micro-batch mean: Trainer scales for accumulation
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._tokens_since_log, self._last_log_time = 0, time.perf_counter()
        self.train_tokens = 0  # non-padding tokens trained on in this process's run (all ranks summed)
        self.guard = faults.NonFiniteGuard(skip=dpo.skip_nonfinite_steps)
        self.guard.accelerator = self.accelerator
        self.add_callback(self.guard)
        for default in (ProgressCallback, PrinterCallback):  # they print the raw metrics dict: ours, a line
            self.remove_callback(default)
        self.add_callback(TrainProgress(show_bar=not self.args.disable_tqdm))
        # (policy - reference) per pair in the first step, when the reference is not the starting point
        self.step0: list[torch.Tensor] | None = None if modeling.reference_is_start(dpo) else []
        self.step0_logratios: dict[str, float] | None = None
        # when it is, the first step's policy must score as the cache does, up to rounding (step_zero.py)
        self.start_check = StartCheck.for_run(dpo)
        self.tie_said = False  # reporting.tie_note, said once

    @property
    def reward_baseline(self):
        """The RewardBaseline callback (pref_bco_weight), looked up each time: a resume may replace it."""
        return next((c for c in self.callback_handler.callbacks if isinstance(c, RewardBaseline)), None)

    def _bco_baseline(self, training: bool):
        """pref_bco_weight's delta: a training batch updates the running mean (all ranks), eval reads it."""
        baseline = self.reward_baseline
        if baseline is None:
            return None
        if training:
            return lambda reward: baseline.update(self.accelerator.gather(reward.reshape(1)))
        return lambda reward: baseline.mean

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if sharding.requested(self.dpo):  # FSDP on CPU too (accelerate turns it on for GPUs only)
            sharding.enable(self.accelerator, sharding.plugin(self.dpo, self.args.fsdp_plugin_args))
            sharding.replicate_head(self.accelerator, self.model)
            self.is_fsdp_enabled = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Under FSDP: the LoRA weights gathered whole and saved as PEFT saves them in one process (transformers
        would gather the whole 4-bit base for it, or save no adapter with a SHARDED_STATE_DICT)."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir or self.args.output_dir, state_dict=sharding.adapter_state_dict(self.model))

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        self.guard.wrap(optimizer, lambda: self.state.global_step + 1)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:  # the schedule's arguments that depend on the run's length (LF's WSD split)
            self.args.lr_scheduler_kwargs = lr_schedule.scheduler_kwargs(
                self.dpo.lr_scheduler_type, self.dpo.lr_scheduler_kwargs, num_training_steps,
                self.args.get_warmup_steps(num_training_steps))
        return super().create_scheduler(num_training_steps, optimizer)

    def _get_train_sampler(self, train_dataset=None):
        if not self.dpo.group_by_length:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return LengthGroupedSampler(dataset["length"], self.args.per_device_train_batch_size, self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        check = self.start_check is not None and model.training and self.state.global_step == 0
        scores = batch_scores(model, inputs, self.dpo.logprob_chunk_size, wpo=self.dpo.pref_use_weighting, rms=check)
        if check:
            self.start_check.observe(self.model, scores, inputs, self.accelerator)
        losses, stats = pair_metrics(self.dpo, scores, inputs, bco_baseline=self._bco_baseline(model.training))
        if model.training:
            self.guard.observe(inputs["row_index"], losses)
            if self.step0 is not None and self.state.global_step == 0:  # policy - reference, (chosen, rejected)
                gap = scores["logps"].detach().reshape(2, -1).t() - torch.stack([inputs["ref_chosen_logps"],
                                                                    inputs["ref_rejected_logps"]], dim=1)
                self.step0.append(self.accelerator.gather_for_metrics(gap).cpu())
        else:
            stats["loss"] = losses.detach()  # eval_loss: a mean over rows like the rest (see log)
        self._record(model.training, stats, inputs["num_tokens"])
        loss = losses.mean()
        return (loss, {"logps": scores["logps"].detach()}) if return_outputs else loss

    def _record(self, training, stats, num_tokens: int):
        """Keep every row's metrics (all ranks gathered, duplicates dropped); log averages over rows."""
        mode = "train" if training else "eval"
        for key, values in stats.items():
            self._metrics[mode][key].append(self.accelerator.gather_for_metrics(values).double().cpu())
        if training:
            tokens = int(self.accelerator.gather_for_metrics(torch.tensor([num_tokens], device=self.args.device)).sum())
            self._tokens_since_log += tokens
            self.train_tokens += tokens

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval"
        prefix = "" if mode == "train" else "eval_"
        accuracies = self._metrics[mode]["rewards/accuracies"]
        note = tie_note(torch.cat(accuracies)) if accuracies and not self.tie_said else ""
        if note:  # once, where it applies (at step 0, and in the first eval when eval_on_start)
            launch.say(note)
            self.tie_said = True
        for key, values in self._metrics[mode].items():
            if values:
                logs[prefix + key] = torch.cat(values).mean().item()
        self._metrics[mode].clear()
        if mode == "train" and self.start_check is not None and self.start_check.worst is not None:
            launch.say(self.start_check.summary())
            self.start_check = None
        if mode == "train" and self.step0:
            from .reporting import step0_report

            self.step0_logratios, message = step0_report(torch.cat(self.step0))
            self.step0 = None
            launch.say(message)
        if mode == "train":
            now = time.perf_counter()
            logs["tokens_per_second"] = round(self._tokens_since_log / max(now - self._last_log_time, 1e-9), 1)
            logs.update(memory_metrics(self.args.device))
            if self.dpo.skip_nonfinite_steps:
                logs["nonfinite_steps_skipped"] = self.guard.skipped
            if self.args.fp16:
                logs["grad_scaler_steps_skipped"] = self.guard.scaler_skipped
            self._tokens_since_log, self._last_log_time = 0, now
        super().log(logs, start_time)


def training_arguments(config: Config, has_eval: bool):
    from transformers.training_args import OptimizerNames

    if config.optim not in {o.value for o in OptimizerNames}:
        import difflib

        close = difflib.get_close_matches(config.optim, [o.value for o in OptimizerNames], n=1)
        raise DpoLeanError(f"config key 'optim': {config.optim!r} is not a transformers optimizer"
                           + (f"; did you mean '{close[0]}'?" if close else ""))
    cuda = modeling.device().type == "cuda"
    eval_strategy = config.eval_strategy or ("steps" if has_eval else "no")
    if eval_strategy != "no" and not has_eval:
        raise DpoLeanError(f"config key 'eval_strategy': {eval_strategy} needs held-out rows; set val_size or eval_dataset")
    report_to = [t.strip() for t in config.report_to.split(",") if t.strip() and t.strip() != "none"] or "none"
    _check_trackers(report_to)
    faults.check_deepspeed(config.deepspeed)
    args = DpoTrainingArguments(
        output_dir=config.output_dir, seed=config.seed, use_cpu=not cuda,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type,
        lr_scheduler_kwargs=dict(config.lr_scheduler_kwargs or {}),
        warmup_steps=config.warmup_steps, warmup_ratio=config.warmup_ratio, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, optim=config.optim, adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2, adam_epsilon=config.adam_epsilon,
        bf16=config.bf16 and cuda, fp16=config.fp16 and cuda,
        train_sampling_strategy="random",  # group_by_length: DPOLeanTrainer uses its own seeded sampler
        logging_steps=config.logging_steps, logging_first_step=True,
        save_strategy=config.save_strategy, save_steps=config.save_steps, save_total_limit=config.save_total_limit,
        save_only_model=config.save_only_model, disable_tqdm=bool(config.disable_tqdm),
        eval_strategy=eval_strategy, eval_steps=config.eval_steps or config.logging_steps,
        eval_on_start=config.eval_on_start and has_eval,
        report_to=report_to, run_name=config.run_name, dataloader_num_workers=_loader_workers(config),
        ddp_timeout=config.ddp_timeout, deepspeed=config.deepspeed, **sharding.trainer_arguments(config),
        remove_unused_columns=False, ddp_find_unused_parameters=False,
    )
    if sharding.requested(config):
        options = sharding.check(config, args.mixed_precision, modeling.compute_dtype(config, modeling.device()))
        for line in sharding.notices(config, options):
            launch.say(line)
    return args


def _loader_workers(config: Config) -> int:
    """dataloader_num_workers, at most the CPUs this process may run on (said once: the DataLoader would warn at
    every epoch and evaluation)."""
    cpus = launch.cpus()
    if config.dataloader_num_workers > cpus:
        launch.say(f"dataloader_num_workers {config.dataloader_num_workers}: this machine has {cpus} CPUs; loading "
                   f"batches with {cpus} worker processes")
    return min(config.dataloader_num_workers, cpus)


def _check_trackers(report_to) -> None:
    from transformers.integrations import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for tracker in [] if report_to == "none" else report_to:
        if tracker in available and not available[tracker]():
            raise DpoLeanError(f"config key 'report_to': {tracker} is not installed; `pip install {tracker}` "
                               "or set report_to: none")


# ---------------------------------------------------------------- the procedure


def _say_data(config: Config, data) -> None:
    """How the data was prepared, rows kept and skipped, how rows were cut (main process)."""
    launch.say(data.describe())
    launch.say(f"data: {skip_summary(data)}")
    if truncation_note(data):
        launch.say(truncation_note(data))
    if data.skips and launch.is_main_process():
        launch.say(f"skipped rows listed in {write_skip_report(data, config.metrics_dir)}")


def final_evaluation(trainer) -> dict:
    """The evaluation of the trained policy: the one Trainer logged at the last step (eval_steps divides the steps),
    else a new one. Evaluating again would log (and write to training_metrics.csv) the same evaluation twice."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    return trainer.evaluate()


def _reference_note(config: Config, eval_set: EvalSet) -> str:
    if not config.needs_reference:
        return f"pref_loss {config.pref_loss} is reference-free: no reference cache is read"
    return (f"reference log-probs from {config.resolved_ref_cache_dir}"
            + (f" and {config.resolved_eval_ref_cache_dir}" if eval_set.fingerprint else ""))


def run_train(config: Config) -> dict:
    """Train the policy; every process of a distributed launch runs this, the main one writes the files."""
    from .reporting import MetricsWriter

    t0 = time.perf_counter()
    args = training_arguments(config, config.has_eval)  # everything that can refuse the run, before any data work
    resume = faults.resume_target(config)
    tokenizer, data, fingerprint, ref = prepare_run(config)
    _say_data(config, data)
    train_rows, eval_set = split_eval(config, tokenizer, data, ref)
    launch.say(f"train: {len(train_rows)} pairs" + (f", eval: {len(eval_set.rows)} pairs" if eval_set.rows else "")
         + f"; {_reference_note(config, eval_set)} (data ready in {time.perf_counter() - t0:.1f} s)")
    launch.say(adapters.describe_start(config) + ("" if modeling.reference_is_start(config) else
                                            f"; {modeling.describe_reference(config)} (from the cache)"))
    if modeling.lf_reference_note(config):
        launch.say(modeling.lf_reference_note(config))
    model = modeling.prepare_policy(config)
    dtype = modeling.compute_dtype(config, modeling.device())
    sharing = prefix_sharing(config, model, dtype)
    launch.say(f"layout: {describe_layout(sharing)}")
    summary_extra = {"config": config.to_dict(), "cache_fingerprint": fingerprint,
                     "rows": {"train": len(train_rows), "eval": len(eval_set.rows), "skipped": len(data.skips)}}
    if eval_set.fingerprint:
        summary_extra["eval_cache_fingerprint"] = eval_set.fingerprint
    fix_jinja_template(tokenizer, config)  # the adapter's saved tokenizer formats prompts as training did
    writer = MetricsWriter(config.metrics_dir, plot=config.plot_loss, extra_summary=lambda: summary_extra)
    interrupt = faults.StopOnInterrupt()
    baseline = [RewardBaseline()] if config.pref_bco_weight else []
    trainer = DPOLeanTrainer(
        model=model, args=args, dpo=config,
        data_collator=PairCollator(tokenizer.pad_token_id, sharing, tails=config.ld_alpha is not None),
        train_dataset=to_dataset(train_rows, ref),
        eval_dataset=to_dataset(eval_set.rows, eval_set.ref) if eval_set.rows else None,
        processing_class=tokenizer, callbacks=[writer, interrupt, *baseline, *sharding.callbacks(config)])
    t0 = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except faults.NonFiniteStep as e:
        raise DpoLeanError(faults.nonfinite_message(e, Path(config.output_dir))) from None
    except OSError as e:
        raise faults.write_error_message(e, Path(config.output_dir)) from None
    finally:
        interrupt.stop.close()  # Ctrl-C and SIGTERM stop at once again
    seconds = time.perf_counter() - t0
    if interrupt.interrupted:
        raise interrupt.error(trainer.state.global_step, Path(config.output_dir))
    summary_extra["nonfinite_steps_skipped"] = trainer.guard.skipped
    summary_extra["grad_scaler_steps_skipped"] = trainer.guard.scaler_skipped
    if trainer.step0_logratios:
        summary_extra["step0_logratios"] = trainer.step0_logratios
    summary_extra["train_tokens_per_second"] = round(trainer.train_tokens / max(seconds, 1e-9), 1)
    summary_extra.update(memory_metrics(args.device))
    if trainer.reward_baseline is not None:
        summary_extra["reward_baseline"] = trainer.reward_baseline.state()["args"]  # `dpo-lean evaluate` reads it
    final_eval = final_evaluation(trainer) if eval_set.rows else {}
    trainer.save_model(config.output_dir)
    summary_extra["finished"] = True  # written last: `dpo-lean sweep` skips a run whose summary says so
    writer.on_train_end(args, trainer.state, trainer.control)  # again, now with the final eval and speed
    launch.say(f"adapter saved to {config.output_dir}; metrics in {config.metrics_dir}")
    return {"train": result.metrics, "eval": final_eval}
