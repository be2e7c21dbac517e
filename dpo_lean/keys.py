"""The key reference: every config key, and what dpo-lean does with each LLaMA-Factory key.

``dpo-lean keys`` prints it and README's configuration reference is generated from it (tools/gen_readme_keys.py),
so neither can drift from :mod:`dpo_lean.config` and :mod:`dpo_lean.lf_keys`.
"""

from __future__ import annotations

import dataclasses
import textwrap

from . import lf_keys
from .config import FIELDS, Config, allowed_types


def lf_status(name: str) -> str | None:
    """What dpo-lean does with the LLaMA-Factory key ``name``: honoured, no effect, refused; None if LF has no such
    key (a key of dpo-lean's own, or no key at all)."""
    if name in FIELDS:
        return FIELDS[name].metadata["lf"]
    if name in lf_keys.NO_EFFECT:
        return lf_keys.NO_EFFECT_STATUS
    if name in lf_keys.REFUSED:
        return lf_keys.REFUSED_STATUS
    return None


def describe_key(name: str) -> str:
    """One line: the key's status and meaning (``dpo-lean keys NAME``)."""
    status = lf_status(name)
    if name in FIELDS:
        who = {None: "dpo-lean's own key", "honoured": "LLaMA-Factory's key, honoured",
               "no effect": "LLaMA-Factory's key, no effect"}[status]
        return f"{name}: {who}; default {_shown(_default(name))}: {FIELDS[name].metadata['help']}"
    if status == lf_keys.NO_EFFECT_STATUS:
        return f"{name}: LLaMA-Factory's key, no effect here (any value): {lf_keys.NO_EFFECT[name]}"
    if status == lf_keys.REFUSED_STATUS:
        accepted = lf_keys.accepted_values(name)
        unless = "" if accepted == "never" else f" unless {accepted}"
        return f"{name}: LLaMA-Factory's key, refused{unless}: {lf_keys.REFUSED[name][1]}"
    return f"{name}: not a key of dpo-lean or of LLaMA-Factory 0.9.5's train command"


def _default(name: str):
    f = FIELDS[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _shown(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _type_name(name: str) -> str:
    return " or ".join({bool: "bool", int: "int", float: "float", str: "str", dict: "mapping",
                       type(None): "null"}[t]
                      for t in allowed_types(name))


def _markdown_cell(text: str) -> str:
    """Text safe in a Markdown table cell: no HTML tags (<output_dir> would vanish), no cell breaks."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _by_reason(table: dict) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, entry in table.items():
        groups.setdefault(entry if isinstance(entry, str) else entry[1], []).append(name)
    return groups


def key_table(markdown: bool = False) -> str:
    """Every key with its type, default, LLaMA-Factory status and meaning, grouped; then LF's keys that dpo-lean
    has no key for: refused (with the reason and the value still accepted) or of no effect."""
    lines = []
    group = None
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if meta["group"] != group:
            group = meta["group"]
            lines += ([""] if lines else []) + ([f"### {group}", "", "| key | type | default | LF | meaning |",
                                                  "| --- | --- | --- | --- | --- |"] if markdown else [f"[{group}]"])
        shown, lf = _shown(_default(f.name)), meta["lf"] or "-"
        if markdown:
            lines.append(f"| `{f.name}` | {_type_name(f.name)} | `{shown}` | {lf} | {_markdown_cell(meta['help'])} |")
        else:
            lines.append(f"  {f.name:<32} {_type_name(f.name):<16} {shown:<12} {lf:<10} {meta['help']}")
    return "\n".join(lines + [""] + _lf_only(markdown))


def _lf_only(markdown: bool) -> list[str]:
    refused = {reason: [(n, f" ({lf_keys.accepted_values(n)})") for n in names]
               for reason, names in _by_reason(lf_keys.REFUSED).items()}
    no_effect = _by_reason(lf_keys.NO_EFFECT)
    refused_intro = ("Refused: a one-line error naming the reason, unless set to the value in brackets, which asks "
                     "for what dpo-lean does anyway (never: no value is accepted).")
    no_effect_intro = "No effect: accepted with any value; they mean nothing here."
    if not markdown:
        out = ["[LLaMA-Factory keys refused]", f"  {refused_intro}"]
        for reason, names in refused.items():
            listed = ", ".join(n + accepted for n, accepted in names)
            out += [f"  {reason}:", *textwrap.wrap(listed, 116, initial_indent="    ", subsequent_indent="    ")]
        out += ["", "[LLaMA-Factory keys of no effect]", f"  {no_effect_intro}"]
        for reason, names in no_effect.items():
            out += [f"  {reason}:", *textwrap.wrap(", ".join(names), 116, initial_indent="    ", subsequent_indent="    ")]
        return out
    out = ["### LLaMA-Factory keys dpo-lean has no key for", "", refused_intro, "",
           "| refused keys (accepted value) | reason |", "| --- | --- |"]
    out += [f"| {', '.join(f'`{n}`{accepted}' for n, accepted in names)} | {_markdown_cell(reason)} |"
            for reason, names in refused.items()]
    out += ["", no_effect_intro, "", "| keys of no effect | why |", "| --- | --- |"]
    out += [f"| {', '.join(f'`{n}`' for n in names)} | {_markdown_cell(reason)} |" for reason, names in no_effect.items()]
    return out
