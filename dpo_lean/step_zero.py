"""The first training step against the reference cache: where the reference is the policy's starting point, both
must score every completion alike, up to float rounding, before any update.

A training forward that differs from precompute's (a dropout the family applies in training that was not turned
off, a changed template, tokenizer, dtype or adapter) would make DPO optimise a wrong objective from the first step
on, silently: its step-0 loss is not ln 2. :class:`StartCheck` stops the run instead, in one line, on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import adapters, launch, modeling
from .config import Config
from .errors import DpoLeanError
from .layout import model_tolerance

CAUSES = ("a dropout or other noise the model applies in training only (e.g. a config's router_jitter_noise), "
          "another template or tokenizer, another dtype or quantisation, or other adapters than precompute's")


@dataclass
class StartCheck:
    """Each first-step completion's |policy - reference| log-prob against the rounding bound of
    layout.sharing_tolerance (both runs do the same arithmetic, grouped in other batches and layouts)."""

    dtype: torch.dtype
    worst: tuple[float, float, float, int] | None = None  # (gap / bound, gap, bound, row) over the step so far

    @classmethod
    def for_run(cls, config: Config) -> StartCheck | None:
        """The check for a run whose reference is its starting point, else None. A continued adapter trained with
        lora_dropout starts off the reference by design (LoRA dropout is on in training): no check then."""
        if not (config.needs_reference and modeling.reference_is_start(config)):
            return None
        if config.lora_dropout and adapters.start_stack(config).top:
            launch.say(f"step 0: not checked against the cache: lora_dropout {config.lora_dropout} on the continued "
                       "adapter makes the first step's policy differ from the reference by design")
            return None
        return cls(modeling.compute_dtype(config, modeling.device()))

    def observe(self, model, scores: dict, inputs: dict, accelerator) -> None:
        """Check one first-step micro-batch (``scores`` from logprobs.batch_scores with ``rms``); a one-line
        DpoLeanError on every rank where any rank's completion is off by more than rounding."""
        reference = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        gap = (scores["logps"].detach().double() - reference.double()).abs()
        bound = model_tolerance(model, scores["logit_rms"].double(), self.dtype)
        ratio = gap / bound
        i = int(ratio.argmax())
        rows = inputs["row_index"].repeat(2)
        mine = torch.stack([ratio[i], gap[i], bound[i], rows[i].double()]).to(torch.float64)
        everyone = accelerator.gather(mine[None]).reshape(-1, 4)
        ratio, gap, bound, row = everyone[int(everyone[:, 0].argmax())].tolist()
        if self.worst is None or ratio > self.worst[0]:
            self.worst = (ratio, gap, bound, int(row))
        if not ratio <= 1:  # NaN too
            raise DpoLeanError(
                f"step 0: the policy and the reference cache disagree before any update: a completion of row "
                f"{int(row)} scores {gap:.4g} nats apart, where float rounding explains {bound:.2g} "
                f"({str(self.dtype).removeprefix('torch.')}); the reference is the policy's starting point, so they must "
                f"agree and the step-0 loss be ln 2. Likely causes: {CAUSES}; rerun precompute with this config, or "
                "report the model family if it persists")

    def summary(self) -> str:
        ratio, gap, bound, _ = self.worst
        return (f"step 0: policy and reference cache agree: {gap:.2e} nats apart at most ({ratio:.2g} of what float "
                "rounding explains)")
