"""The learning-rate schedule's settings, checked when the config loads: lr_scheduler_kwargs against
lr_scheduler_type, and the warmup steps training will take.

transformers' ``get_scheduler`` hands ``lr_scheduler_kwargs`` to the schedule function of ``lr_scheduler_type``; a
missing, unknown or ill-typed argument is a traceback there, after the model has loaded. :data:`SCHEDULER_KWARGS`
lists what each type takes (transformers 5.25's schedule functions and torch's ReduceLROnPlateau;
tests/test_lr_schedule.py checks the names against the installed transformers). Pure: no torch, no transformers.
"""

from __future__ import annotations

import math

from .config_values import shown
from .errors import DpoLeanError

_NUMBER = (int, float)
_WSD_SHAPES = ("linear", "cosine", "1-sqrt")

# lr_scheduler_type -> {argument: the Python types its value may have}
SCHEDULER_KWARGS: dict[str, dict[str, tuple[type, ...]]] = {
    "linear": {},
    "cosine": {"num_cycles": _NUMBER},
    "cosine_with_restarts": {"num_cycles": (int,)},
    "polynomial": {"lr_end": _NUMBER, "power": _NUMBER},
    "constant": {},
    "constant_with_warmup": {},
    "inverse_sqrt": {"timescale": (int,)},
    "reduce_lr_on_plateau": {"mode": (str,), "factor": _NUMBER, "patience": (int,), "threshold": _NUMBER,
                             "threshold_mode": (str,), "cooldown": (int,), "min_lr": _NUMBER, "eps": _NUMBER},
    "cosine_with_min_lr": {"num_cycles": _NUMBER, "min_lr": _NUMBER, "min_lr_rate": _NUMBER},
    "warmup_stable_decay": {"num_decay_steps": (int,), "num_stable_steps": (int,), "warmup_type": (str,),
                            "decay_type": (str,), "min_lr_ratio": _NUMBER, "num_cycles": _NUMBER},
}
CHOICES = {"mode": ("min", "max"), "threshold_mode": ("rel", "abs"), "warmup_type": _WSD_SHAPES,
           "decay_type": _WSD_SHAPES}
NO_WARMUP = ("constant", "reduce_lr_on_plateau")  # transformers passes these no warmup steps


def _value(kind: str, name: str, value, types: tuple[type, ...]):
    """``value`` as one of ``types`` (a number written as a string, as YAML 1.1 reads 1e-6, becomes one), or a
    one-line error."""
    if isinstance(value, str) and str not in types:
        for t in types:
            try:
                value = t(value)
                break
            except ValueError:
                continue
    ok = isinstance(value, types) and not isinstance(value, bool)
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        wanted = " or ".join({int: "an integer", float: "a number", str: "a string"}[t] for t in types)
        raise DpoLeanError(f"config key 'lr_scheduler_kwargs': {name}: {shown(value)} is not allowed with "
                           f"lr_scheduler_type {kind}; expected {wanted}")
    if name in CHOICES and value not in CHOICES[name]:
        raise DpoLeanError(f"config key 'lr_scheduler_kwargs': {name}: {shown(value)} is not supported; choose one "
                           f"of: {', '.join(CHOICES[name])}")
    return value


def check(kind: str, kwargs: dict | None, learning_rate: float) -> dict:
    """lr_scheduler_kwargs for ``kind`` with their values typed, or a one-line error naming the argument: one
    transformers does not take for ``kind``, or one it needs (cosine_with_min_lr: exactly one of min_lr and
    min_lr_rate); values as the schedule requires them (polynomial: lr_end < learning_rate; reduce_lr_on_plateau:
    factor < 1)."""
    allowed = SCHEDULER_KWARGS[kind]
    out = {}
    for name, value in (kwargs or {}).items():
        if name not in allowed:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no lr_scheduler_kwargs"
            raise DpoLeanError(f"config key 'lr_scheduler_kwargs': {shown(name)} is not an argument of "
                               f"lr_scheduler_type {kind}, which {takes}")
        out[name] = _value(kind, name, value, allowed[name])
    if kind == "cosine_with_min_lr" and ("min_lr" in out) == ("min_lr_rate" in out):
        how = "set only one of" if "min_lr" in out else "needs"
        raise DpoLeanError(f"config key 'lr_scheduler_kwargs': lr_scheduler_type cosine_with_min_lr {how} min_lr (the "
                           "final learning rate) or min_lr_rate (its ratio to learning_rate), e.g. "
                           "lr_scheduler_kwargs: {min_lr_rate: 0.1}")
    if kind == "polynomial" and out.get("lr_end", 1e-7) >= learning_rate:
        raise DpoLeanError(f"config key 'lr_scheduler_kwargs': lr_end ({out.get('lr_end', 1e-7)}) must be smaller than "
                           f"learning_rate ({learning_rate}): polynomial decays from learning_rate to lr_end")
    if kind == "reduce_lr_on_plateau" and out.get("factor", 0.1) >= 1:
        raise DpoLeanError(f"config key 'lr_scheduler_kwargs': factor {out['factor']} must be < 1 (the learning rate "
                           "is multiplied by it on a plateau)")
    for name, least in (("num_decay_steps", 0), ("num_stable_steps", 0), ("patience", 0), ("cooldown", 0),
                        ("timescale", 1)):
        if out.get(name, least) < least:
            raise DpoLeanError(f"config key 'lr_scheduler_kwargs': {name} {out[name]} must be >= {least}")
    return out


def warmup_steps(steps: int, ratio: float, num_training_steps: int) -> int:
    """Linear warmup's optimizer steps: ``steps`` when > 0, else ceil(ratio x num_training_steps) (LLaMA-Factory's
    and transformers 4's warmup_ratio; transformers 5 reads a warmup_steps >= 1 as a count, so 1.0 would be one step)."""
    return int(steps) if steps > 0 else math.ceil(num_training_steps * ratio)


def scheduler_kwargs(kind: str, kwargs: dict | None, num_training_steps: int, num_warmup: int) -> dict:
    """The arguments the schedule is built with. warmup_stable_decay without num_decay_steps decays over what
    num_stable_steps leaves of the steps after warmup, and without either splits them as LLaMA-Factory does: a
    third stable, the rest decaying (transformers gives the stable phase what the decay leaves)."""
    out = dict(kwargs or {})
    if kind != "warmup_stable_decay":
        return out
    remaining = num_training_steps - num_warmup
    if "num_decay_steps" not in out:
        out["num_decay_steps"] = remaining - out.get("num_stable_steps", remaining // 3)
    stable = out.get("num_stable_steps", remaining - out["num_decay_steps"])
    if min(stable, out["num_decay_steps"]) < 0:
        raise DpoLeanError(f"config key 'lr_scheduler_kwargs': num_stable_steps ({stable}) and num_decay_steps "
                           f"({out['num_decay_steps']}) do not fit the {remaining} steps after warmup "
                           f"({num_training_steps} optimizer steps in all, {num_warmup} warming up)")
    return out
