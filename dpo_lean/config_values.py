"""One config value against its key's declaration: its type (with the coercions YAML and the command line need)
and its rules (choices, ranges, no NUL, finite). Knows nothing of the Config class; config.py asks it."""

from __future__ import annotations

import math
import reprlib
import types
import typing
from typing import Any

from .errors import DpoLeanError


def types_of(hint) -> tuple[type, ...]:
    """The members of a type annotation's union (or the one type)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(typing.get_args(hint))
    return (hint,)


def describe(types_: tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null",
             dict: "a mapping ({name: value}) or its JSON text"}
    return " or ".join(names[t] for t in types_)


_REPR = reprlib.Repr()  # (keyword arguments need Python 3.12)
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 80, 80, 2, 4, 4


def shown(value: Any) -> str:
    """A short repr for messages (a 200k-character string or a YAML alias bomb stays one short line)."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an integer of over 4300 digits has no repr
        return f"a {type(value).__name__} too large to show"


def coerce(name: str, value: Any, allowed: tuple[type, ...], meta: dict) -> Any:
    """Return ``value`` as the key's type, or raise a one-line error naming key, value and what is allowed."""
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):
        if bool in allowed:
            return value
        if value is False and "no" in (meta["choices"] or ()):
            return "no"  # YAML 1.1 reads an unquoted `save_strategy: no` as false
    elif isinstance(value, int):
        if int in allowed:
            return value
        if float in allowed:
            try:
                return float(value)
            except OverflowError:
                raise DpoLeanError(f"config key '{name}': {shown(value)} is too large; use a finite number") from None
    elif isinstance(value, float):
        if float in allowed:
            return value
        if int in allowed and value.is_integer():
            return int(value)
    elif isinstance(value, dict):
        if dict in allowed and all(isinstance(k, str) for k in value):
            return dict(value)
    elif isinstance(value, str):
        if dict in allowed and value.lstrip().startswith("{"):
            return _json_mapping(name, value)  # '{"min_lr_rate": 0.1}', as transformers' TrainingArguments reads it
        if bool in allowed and value.lower() in ("true", "false"):  # prefix_sharing=true on the command line
            return value.lower() == "true"
        if str in allowed:
            return value
        # YAML 1.1 reads "5e-6" as a string; LLaMA-Factory users write it, so accept numbers in strings.
        for t in (int, float):
            if t in allowed:
                try:
                    return t(value)
                except ValueError:
                    pass
    elif isinstance(value, dict) and dict in allowed:
        return value
    elif isinstance(value, list) and str in allowed and all(isinstance(v, str) for v in value):
        return ",".join(value)  # lora_target: [q_proj, v_proj], dataset: [a, b], report_to: [wandb]
    elif (isinstance(value, list) and str in allowed and meta["comma_list"]
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        return ",".join(map(str, value))  # pref_loss_weights: [0.8, 0.2, 1.0]
    raise DpoLeanError(f"config key '{name}': {shown(value)} is not allowed; expected {describe(allowed)}")


def _json_mapping(name: str, text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DpoLeanError(f"config key '{name}': {shown(text)} is not valid JSON ({str(e).splitlines()[0]}); write "
                           "a mapping such as {\"min_lr_rate\": 0.1}") from None
    if not isinstance(value, dict):
        raise DpoLeanError(f"config key '{name}': {shown(text)} is not a mapping; write one such as {{\"min_lr_rate\": 0.1}}")
    return value


def check_rules(name: str, value: Any, meta: dict) -> None:
    """Raise a one-line error if ``value`` breaks the key's choices or range (``meta``: the key's _key metadata)."""
    choices = meta["choices"]
    if choices is not None and value not in choices:
        listed = ", ".join("null" if c is None else str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
        raise DpoLeanError(f"config key '{name}': {shown(value)} is not supported; choose one of: {listed}")
    if isinstance(value, str) and "\x00" in value:
        raise DpoLeanError(f"config key '{name}': {shown(value)} contains a NUL byte; remove it")
    if isinstance(value, float) and not math.isfinite(value):
        raise DpoLeanError(f"config key '{name}': {shown(value)} is not allowed; use a finite number")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi = meta["min"], meta["max"]  # value is finite here (NaN compares False with every bound)
    if lo is not None and (value < lo or (meta["min_exclusive"] and value == lo)):
        bound = f"> {lo}" if meta["min_exclusive"] else f">= {lo}"
        raise DpoLeanError(f"config key '{name}': {shown(value)} is out of range; it must be {bound}")
    if hi is not None and (value > hi or (meta["max_exclusive"] and value == hi)):
        bound = f"< {hi}" if meta["max_exclusive"] else f"<= {hi}"
        raise DpoLeanError(f"config key '{name}': {shown(value)} is out of range; it must be {bound}")
