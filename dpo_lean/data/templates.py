"""Named chat templates for base models without one of their own.

Each is a Jinja chat template, handed to ``tokenizer.apply_chat_template``, so named templates and
``template: auto`` (the tokenizer's own template) share one tokenisation path.
"""

from __future__ import annotations

from ..errors import DpoLeanError

_CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2.5's own template adds this system message when the conversation has none.
_QWEN = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}" + _CHATML
)

_LLAMA3 = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Text only: prompt turns joined by a blank line, each assistant turn follows directly and ends with EOS.
# For a TRL standard row (prompt, chosen strings) this is exactly TRL's tokenisation: prompt + chosen + eos.
_PLAIN = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
)

TEMPLATES: dict[str, str] = {"chatml": _CHATML, "qwen": _QWEN, "llama3": _LLAMA3, "plain": _PLAIN}


def chat_template_for(name: str, tokenizer) -> str:
    """The Jinja template that ``name`` stands for with this tokenizer."""
    if name == "auto":
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise DpoLeanError(
                "config key 'template': auto needs a tokenizer with a chat template, and this one has none; "
                f"set template to one of: {', '.join(TEMPLATES)}")
        if isinstance(template, dict):  # several named templates: the default one renders conversations
            template = template.get("default") or next(iter(template.values()))
        return template
    if name not in TEMPLATES:
        raise DpoLeanError(f"config key 'template': {name!r} is not supported; choose auto or one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
