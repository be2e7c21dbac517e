"""Every library patch the benchmark makes, in one place, and why.

The contenders are transformers Trainers (dpo-lean's, the SFT yardstick, TRL's DPOTrainer) that expose no hook for
what a benchmark needs, so:
  - ``Trainer.__init__`` gets a callback added: a timer around each optimizer step and the peak memory from the
    start of training (every contender's trainer, without touching their code);
  - ``Trainer.training_step`` counts each step's real tokens (prompt + chosen and prompt + rejected per pair);
  - ``Trainer._get_train_sampler`` (private) returns a sequential sampler, so every contender sees the rows in
    file order and runs the same batches;
  - TRL's ``DPOTrainer._precompute_ref_logps`` (private) is wrapped in a timer: its precompute pass runs inside
    the DPOTrainer constructor, with no callback;
  - for `phases`, ``Trainer.training_step`` and ``torch.optim.AdamW.step`` note the memory between a step's
    phases (a forward hook marks the end of each forward): callbacks only see a step's start and end.
"""

from __future__ import annotations

import time

from dpo_lean.measure import current_memory_gb, peak_memory_gb, peak_reserved_gb, reset_peak


def measured_device():
    """The device memory is measured on: the current CUDA device, else None (the process's RSS)."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def instrument_trainer(sequential: bool) -> dict:
    """Time every optimizer step and count its tokens in any transformers Trainer (TRL's included).

    ``sequential`` makes every contender see the rows in file order, so all run the same batches.
    """
    import torch
    import transformers

    record = {"step_seconds": [], "step_tokens": [], "peak_gb": None, "reserved_gb": None, "start_gb": None}
    tokens = [0]

    class StepTimer(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            reset_peak(measured_device())
            record["start_gb"] = current_memory_gb(measured_device())

        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0, tokens[0] = time.perf_counter(), 0

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            record["step_seconds"].append(time.perf_counter() - self.t0)
            record["step_tokens"].append(tokens[0])

        def on_train_end(self, args, state, control, **kw):
            record["peak_gb"] = peak_memory_gb(measured_device())
            record["reserved_gb"] = peak_reserved_gb(measured_device())  # None on CPU

    init, step = transformers.Trainer.__init__, transformers.Trainer.training_step

    def patched_init(self, *a, **kw):
        init(self, *a, **kw)
        self.add_callback(StepTimer())

    def patched_step(self, model, inputs, *a, **kw):
        # prompt + chosen and prompt + rejected per pair, in every contender and layout
        tokens[0] += inputs["num_tokens"] if "num_tokens" in inputs else int(inputs["attention_mask"].sum())
        return step(self, model, inputs, *a, **kw)

    transformers.Trainer.__init__, transformers.Trainer.training_step = patched_init, patched_step
    if sequential:
        transformers.Trainer._get_train_sampler = lambda self, ds=None: torch.utils.data.SequentialSampler(
            ds if ds is not None else self.train_dataset)
    return record


def time_trl_precompute() -> dict:
    """Time TRL's precompute pass: the returned dict gets its ``seconds`` once a DPOTrainer has run it."""
    from trl import DPOTrainer

    timing = {}
    original = DPOTrainer._precompute_ref_logps

    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        out = original(self, *a, **kw)
        timing["seconds"] = time.perf_counter() - t0
        return out

    DPOTrainer._precompute_ref_logps = timed
    return timing


def trace_phases() -> list[tuple[str, float, float]]:
    """Patch the Trainer's step, the model's forward and AdamW's step to note (phase, RSS now, peak) in GB."""
    import torch
    import transformers

    from dpo_lean.measure import current_memory_gb, peak_memory_gb, reset_peak

    trace = []

    def note(phase: str) -> None:
        trace.append((phase, current_memory_gb(), peak_memory_gb()))

    step = transformers.Trainer.training_step

    def traced_step(self, model, inputs, *a, **kw):
        reset_peak()
        note("step start")
        hook = model.register_forward_hook(lambda *_: note("after forward"))
        try:
            out = step(self, model, inputs, *a, **kw)
        finally:
            hook.remove()
        note("after backward")
        return out

    adam_step = torch.optim.AdamW.step

    def traced_adam(self, *a, **kw):
        out = adam_step(self, *a, **kw)
        note("after optimizer")
        return out

    transformers.Trainer.training_step, torch.optim.AdamW.step = traced_step, traced_adam
    return trace
