"""Chat templates by name: LLaMA-Factory 0.9.5's, token for token, plus ``auto`` and ``plain``.

``auto`` (also ``template: null``) is the tokenizer's own Jinja template and ``plain`` is TRL's
prompt + completion + EOS; both render with ``tokenizer.apply_chat_template`` and split where the prompt
and the full conversation diverge, as TRL does. Every other name is LF's template of that name
(template_table.py), encoded slot by slot as LF does (template_model.py), on a tokenizer prepared
as LF prepares it (:func:`fix_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json

import click

from ..errors import DpoLeanError
from .template_model import Template
from .template_table import LF_TEMPLATES, REPLACES_JINJA

# Text only: prompt turns joined by a blank line, each assistant turn follows directly and ends with EOS.
# For a TRL standard row (prompt, chosen strings) this is exactly TRL's tokenisation: prompt + chosen + eos.
_PLAIN = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
)
JINJA_TEMPLATES = ("auto", "plain")


def template_names() -> tuple[str, ...]:
    """Every accepted name: auto, plain and every template LF 0.9.5 registers (multimodal ones in text form)."""
    return (*JINJA_TEMPLATES, *sorted(LF_TEMPLATES))


def check_template_name(name: str) -> None:
    """A one-line error for a name dpo-lean does not accept."""
    if name not in JINJA_TEMPLATES and name not in LF_TEMPLATES:
        close = difflib.get_close_matches(name[:100], template_names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        shown = repr(name) if len(name) <= 80 else repr(name[:60]) + f"... ({len(name)} characters)"
        raise DpoLeanError(f"config key 'template': {shown} is not supported; use auto (the tokenizer's own), "
                           f"plain, or one of LLaMA-Factory 0.9.5's template names (docs/data.md, Templates){hint}")


def template_for(config, tokenizer) -> str | Template:
    """What tokenize_record takes for ``config.template``: a Jinja string (auto, plain) or an LF template
    with the config's enable_thinking, preserve_thinking and default_system applied (as LF applies them)."""
    name = config.template
    if name in JINJA_TEMPLATES:
        return chat_template_for(name, tokenizer)
    check_template_name(name)
    template = LF_TEMPLATES[name]
    if config.default_system is not None:
        template = dataclasses.replace(template, default_system=config.default_system)
    if template.reasoning:
        template = dataclasses.replace(template, enable_thinking=config.enable_thinking,
                                       preserve_thinking=config.preserve_thinking)
    return template


def chat_template_for(name: str, tokenizer) -> str:
    """The Jinja template that ``name`` (auto or plain) stands for with this tokenizer."""
    if name == "plain":
        return _PLAIN
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DpoLeanError("config key 'template': auto needs a tokenizer with a chat template, and this one has none; "
                           "set template to plain or to the LLaMA-Factory template name of the model's family")
    if isinstance(template, dict):  # several named templates: the default one renders conversations
        template = template.get("default") or next(iter(template.values()))
    return template


def fix_jinja_template(tokenizer, config) -> str:
    """Give ``tokenizer`` the chat template training used, as LF's ``fix_jinja_template``: an LF template (or plain)
    as Jinja where the tokenizer has none, or where LF's template replaces the tokenizer's own. A line saying what
    was done ('' for template auto, the tokenizer's own)."""
    from .template_jinja import to_jinja

    if config.template in ("auto", None):
        return ""
    if getattr(tokenizer, "chat_template", None) and config.template not in REPLACES_JINJA:
        return (f"chat template: the tokenizer's own is kept, as LLaMA-Factory keeps it (training used template "
                f"{config.template}); template=auto in data-check --show shows how it formats a row")
    template = template_for(config, tokenizer)
    tokenizer.chat_template = template if isinstance(template, str) else to_jinja(template, tokenizer)
    return f"chat template: template {config.template} saved with the tokenizer as Jinja (chat_template.jinja)"


def definition_text(template: str | Template) -> str:
    """The text the cache fingerprint hashes: the Jinja source, or every field of an LF template."""
    if isinstance(template, str):
        return template
    return json.dumps(dataclasses.asdict(template), sort_keys=True, ensure_ascii=False)


def fix_tokenizer(tokenizer, name: str) -> list[str]:
    """Prepare ``tokenizer`` for template ``name`` as LF's ``fix_special_tokens`` does; say what changed.

    LF templates: with ``replace_eos`` the first stop word becomes the EOS token (llama3: <|eot_id|>);
    a tokenizer without EOS gets <|endoftext|>; a missing pad token becomes EOS; the other stop words are
    added as special tokens. auto and plain: only a missing pad token becomes EOS (padding is masked).
    """
    template = LF_TEMPLATES.get(name)
    if template is None:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return []
    notes, stop_words = [], list(template.stop_words)
    if template.replace_eos:
        notes += _set_eos(tokenizer, stop_words.pop(0))
    if tokenizer.eos_token_id is None:
        notes += _set_eos(tokenizer, "<|endoftext|>")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(f"pad token {tokenizer.pad_token}")
    if stop_words:
        try:
            tokenizer.add_special_tokens({"additional_special_tokens": stop_words}, replace_additional_special_tokens=False)
        except TypeError:  # transformers 5 dropped the argument; it keeps the existing special tokens anyway
            tokenizer.add_special_tokens({"additional_special_tokens": stop_words})
        notes.append(f"stop words {', '.join(stop_words)} as special tokens")
    return notes


def _set_eos(tokenizer, token: str) -> list[str]:
    if tokenizer.eos_token == token:
        return []
    before = tokenizer.eos_token
    tokenizer.add_special_tokens({"eos_token": token})
    return [f"EOS token {token}" + (f" (was {before})" if before else "")]


_SAID: set[str] = set()


def prepare_tokenizer(tokenizer, config) -> None:
    """The template's tokenizer fix-ups (LLaMA-Factory's: EOS, pad, stop words), said once per process; a
    vocabulary grown past the model's embedding is a one-line error."""
    before = len(tokenizer)
    notes = fix_tokenizer(tokenizer, config.template)
    message = f"template {config.template}: tokenizer {'; '.join(notes)}, as LLaMA-Factory sets it"
    if notes and message not in _SAID:
        _SAID.add(message)
        click.echo(message)
    if len(tokenizer) > before:
        _check_vocab_fits(tokenizer, config, before)


def _check_vocab_fits(tokenizer, config, before: int) -> None:
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(config.model_name_or_path, revision=config.model_revision,
                                                  cache_dir=config.cache_dir, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError):
        return  # loading the model says what is wrong with it
    rows = getattr(model_config.get_text_config(), "vocab_size", None)
    if rows is not None and len(tokenizer) > rows:
        added = tokenizer.convert_ids_to_tokens(list(range(before, len(tokenizer))))
        raise DpoLeanError(f"template {config.template!r} adds {', '.join(added)} to the tokenizer ({len(tokenizer)} tokens), "
                           f"more than the {rows} rows of {config.model_name_or_path!r}'s embedding; use this model's "
                           "own template (template: auto, or its LLaMA-Factory name)")
