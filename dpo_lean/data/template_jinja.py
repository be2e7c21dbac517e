"""An LLaMA-Factory template as a Jinja chat template, so that a saved tokenizer formats a conversation as training
did: ``tokenizer.apply_chat_template(prompt, add_generation_prompt=True)`` renders the text of the prompt's ids, and
the prompt with its completion the text of prompt + completion ids.

As LF's ``Template._get_jinja_template`` (v0.9.5, data/template.py): every slot becomes Jinja string literals and the
``content`` (and ``idx``) placeholders; BOS and EOS are the tokenizer's own token text. Beyond LF's, it follows what
training does (template_model.Template.encode_pair): the llama2 kind's system text in the first user turn, a tool
turn in the observation slot, efficient_eos's EOS after the completion, and the reasoning kinds' thoughts (removed
from earlier turns unless preserve_thinking; the empty thought added to a completion without one, or, with
enable_thinking false, put in the prompt). The text is the same; the ids are the same where the slot boundaries fall
on special tokens (LF encodes slot by slot, a chat template tokenises the whole text).
"""

from __future__ import annotations

from .template_model import Template, Token


def literal(text: str) -> str:
    """``text`` as a Jinja string literal (Jinja reads its escapes as Python's unicode-escape)."""
    return "'" + text.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


def _string(text: str, values: dict[str, str]) -> str:
    """A slot string as a Jinja expression: each placeholder replaced once, in order, as fill() does (so a
    placeholder written in a message is replaced as LF replaces it too)."""
    return literal(text) + "".join(f".replace('{{{{{name}}}}}', {variable}, 1)" for name, variable in values.items())


def slots_expr(slots, tokenizer, **values: str) -> str:
    """Slots as one Jinja expression (``''`` when empty); ``values``: placeholder -> Jinja variable."""
    items: list[str] = []
    for slot in slots:
        if isinstance(slot, str):
            items.append(_string(slot, values) if values else literal(slot))
        elif isinstance(slot, Token) and slot.special:
            token = tokenizer.bos_token if slot.special == "bos" else tokenizer.eos_token
            items += [literal(token)] if token else []
        elif isinstance(slot, Token):
            items.append(literal(slot.text))
    return " + ".join(items) or "''"


def to_jinja(template: Template, tokenizer) -> str:
    """The Jinja chat template that renders conversations as ``template`` encodes them."""
    expr = lambda slots, **values: slots_expr(slots, tokenizer, **values)  # noqa: E731
    eos = literal(tokenizer.eos_token) if template.efficient_eos and tokenizer.eos_token else ""
    out = ["{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
           "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}",
           "{%- if not system -%}{%- set system = " + literal(template.default_system) + " -%}{%- endif -%}",
           "{%- for message in turns -%}{%- set content = message['content'] -%}{%- set thought = false -%}"]
    if template.reasoning:
        out.append(_thoughts(template))
    first = "{%- if loop.first -%}{{ " + expr(template.prefix) + " }}"
    if template.kind == "llama2":  # the system text goes in front of the first user message
        first += ("{%- if system and message['role'] == 'user' -%}{%- set content = ("
                  + expr(template.system[:1], content="system") + ") + content -%}{%- endif -%}")
    else:
        first += "{%- if system -%}{{ " + expr(template.system, content="system") + " }}{%- endif -%}"
    out.append(first + "{%- endif -%}")
    user = (expr(template.user, content="content") if template.kind == "llama2"
            else expr(template.user, content="content", idx="idx"))
    out.append("{%- if message['role'] == 'user' -%}{%- set idx = (loop.index0 // 2) | string -%}{{ " + user + " }}"
               "{%- elif message['role'] == 'assistant' -%}"
               + ("{%- if thought -%}{{ " + literal(_empty_thought(template)) + " }}{%- endif -%}" if template.reasoning else "")
               + "{{ " + expr(template.assistant, content="content") + " }}"
               + ("{%- if loop.last -%}{{ " + eos + " }}{%- endif -%}" if eos else "")
               + "{%- elif message['role'] == 'tool' -%}{{ " + expr(template.observation, content="content") + " }}"
               "{%- endif -%}{%- endfor -%}")
    if template.reasoning and not template.enable_thinking:  # the prompt ends in the empty thought
        out.append("{%- if add_generation_prompt and turns and turns[-1]['role'] != 'assistant' -%}{{ "
                   + literal(_empty_thought(template)) + " }}{%- endif -%}")
    return "".join(out)


def _empty_thought(template: Template) -> str:
    return template.thought_words[1] if template.kind == "glm47" else "".join(template.thought_words)


def _thoughts(template: Template) -> str:
    """Jinja for an assistant message of a reasoning template: earlier turns lose their thoughts (unless
    preserve_thinking); the completion (the last message) gets the empty thought where it has none."""
    start, end = template.thought_words
    remove = ("{%- set parts = content.split(" + literal(start) + ") -%}{%- set ns = namespace(text=parts[0]) -%}"
              "{%- for part in parts[1:] -%}{%- if " + literal(end) + " in part -%}"
              "{%- set ns.text = ns.text + part.split(" + literal(end) + ", 1)[1] -%}"
              "{%- else -%}{%- set ns.text = ns.text + " + literal(start) + " + part -%}{%- endif -%}{%- endfor -%}"
              "{%- set content = ns.text.lstrip('\\n') -%}")
    plain = ("(" + literal(start.strip()) + " not in content and " + literal(end.strip()) + " not in content)")
    history = "" if template.preserve_thinking else remove
    # A completion without a thought gets the empty one, before its slot: as the completion's start (enable_thinking),
    # or as the prompt's end, which is the same text
    last = (remove if template.enable_thinking is False else "") + "{%- set thought = " + plain + " -%}"
    return ("{%- if message['role'] == 'assistant' -%}{%- if loop.last -%}" + last + "{%- else -%}" + history
            + "{%- endif -%}{%- endif -%}")
