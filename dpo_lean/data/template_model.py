"""What a LLaMA-Factory chat template is, and how it turns a conversation into token ids.

A template is slots: strings with a ``{{content}}`` placeholder, and :class:`Token` elements that are
one token id each. LLaMA-Factory (0.9.5, ``data/template.py``) encodes a conversation slot by slot:
every string element is tokenised on its own (``add_special_tokens=False``) and the ids are joined, so
ids never merge across a slot boundary. Turn 0 is prefix + system + user; every later message is its
own slot list. The prompt is every message before the completion; the completion is the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import DpoLeanError

THINK = ("<think>\n", "\n</think>\n\n")


@dataclass(frozen=True)
class Token:
    """A slot element that is one token id: ``Token("<sep>")`` by its text; BOS/EOS the tokenizer's own."""

    text: str = ""
    special: str = ""  # "bos" or "eos": the tokenizer's bos/eos token, left out if it has none


BOS, EOS = Token(special="bos"), Token(special="eos")
Slots = tuple  # of str | Token


@dataclass(frozen=True)
class Template:
    """One LLaMA-Factory template. ``kind``: "default"; "llama2" (the system text is put in front of the
    first user message); "reasoning" (an empty thought is added to a completion that has none, thoughts
    are dropped from the history); "glm47" (reasoning whose empty thought is only the closing tag).
    ``processor`` names the image/audio plugin LF ties the template to ("" for a text template).
    """

    name: str
    user: Slots
    assistant: Slots
    system: Slots
    observation: Slots
    prefix: Slots = ()
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    thought_words: tuple[str, str] = THINK
    efficient_eos: bool = False
    replace_eos: bool = False
    kind: str = "default"
    processor: str = ""
    enable_thinking: bool | None = True
    preserve_thinking: bool = False

    @property
    def reasoning(self) -> bool:
        return self.kind in ("reasoning", "glm47")

    def encode_pair(self, tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict]):
        """(prompt_ids, chosen_ids, rejected_ids) as LF's pairwise processor builds them, before truncation.

        ``prompt`` may start with a system message; ``chosen``/``rejected`` are the completion message(s).
        """
        system, turns = _split_system(prompt)
        if self.reasoning and not self.preserve_thinking:
            turns = [_with(m, self.remove_thought(m["content"])) if m["role"] == "assistant" else m for m in turns]
        prompt_ids = _join(self.encode_messages(tokenizer, turns, system))
        chosen_ids, chosen_plain = self._completion(tokenizer, turns, chosen, system)
        rejected_ids, _ = self._completion(tokenizer, turns, rejected, system)
        if self.reasoning and chosen_plain and not self.enable_thinking:
            prompt_ids = prompt_ids + self.thought_ids(tokenizer)  # LF takes the prompt from the chosen pass
        if self.efficient_eos:
            chosen_ids, rejected_ids = chosen_ids + [tokenizer.eos_token_id], rejected_ids + [tokenizer.eos_token_id]
        return prompt_ids, chosen_ids, rejected_ids

    def _completion(self, tokenizer, turns, messages, system) -> tuple[list[int], bool]:
        """Ids of the completion, and whether it had no thought of its own (LF's reasoning rule)."""
        if self.reasoning and self.enable_thinking is False:
            messages = [_with(m, self.remove_thought(m["content"])) if m["role"] == "assistant" else m
                        for m in messages]
        ids = _join(self.encode_messages(tokenizer, messages, system, start=len(turns)))
        first = messages[0]["content"] if messages else ""
        plain = self.thought_words[0].strip() not in first and self.thought_words[1].strip() not in first
        if self.reasoning and plain and self.enable_thinking:
            ids = self.thought_ids(tokenizer) + ids
        return ids, plain

    def encode_messages(self, tokenizer, messages: list[dict], system: str | None, start: int = 0) -> list[list[int]]:
        """Ids of each message; message ``start + i`` is the i-th one (message 0 carries prefix and system)."""
        system = system or self.default_system
        out = []
        for i, message in enumerate(messages, start):
            elements, system_text = [], ""
            if i == 0:
                elements += self.prefix
                if system and self.kind == "llama2":
                    system_text = fill(self.system, content=system)[0]
                elif system:
                    elements += fill(self.system, content=system)
            role, content = message["role"], message["content"]
            if role == "user" and self.kind == "llama2":
                elements += fill(self.user, content=system_text + content)
            elif role == "user":
                elements += fill(self.user, content=content, idx=str(i // 2))
            elif role == "assistant":
                elements += fill(self.assistant, content=content)
            elif role == "tool":
                elements += fill(self.observation, content=content)
            else:
                raise DpoLeanError(f"template {self.name!r}: a {role!r} message has no slot; roles are user, assistant, tool")
            out.append(self.element_ids(tokenizer, elements))
        return out

    def element_ids(self, tokenizer, elements) -> list[int]:
        ids = []
        for e in elements:
            if isinstance(e, str):
                if e:
                    ids += tokenizer.encode(e, add_special_tokens=False)
            elif e.special == "bos":
                ids += [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
            elif e.special == "eos":
                ids += [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
            else:
                token_id = tokenizer.convert_tokens_to_ids(e.text)
                if token_id is None or (token_id == tokenizer.unk_token_id and e.text != tokenizer.unk_token):
                    raise DpoLeanError(f"template {self.name!r} needs the token {e.text!r}, which this tokenizer "
                                       "does not have; use the model this template is for, or template: auto")
                ids.append(token_id)
        return ids

    def remove_thought(self, content: str) -> str:
        """``content`` without its thought(s), leading newlines stripped (LF's remove_thought)."""
        start, end = (re.escape(w) for w in self.thought_words)
        return re.sub(f"{start}(.*?){end}", "", content, flags=re.DOTALL).lstrip("\n")

    def thought_ids(self, tokenizer) -> list[int]:
        """The empty thought, tokenised as one string."""
        empty = self.thought_words[1] if self.kind == "glm47" else "".join(self.thought_words)
        return tokenizer.encode(empty, add_special_tokens=False)


def fill(slots: Slots, **values: str) -> list:
    """Slots with each ``{{name}}`` replaced once, in the order given (as LF's StringFormatter)."""
    out = []
    for slot in slots:
        if isinstance(slot, str):
            for name, value in values.items():
                slot = slot.replace("{{" + name + "}}", value, 1)
        out.append(slot)
    return out


def make_template(name: str, *, user: Slots = ("{{content}}",), assistant: Slots | None = None,
                  system: Slots = ("{{content}}",), observation: Slots | None = None, efficient_eos: bool = False,
                  **rest) -> Template:
    """A template with LF's defaults (``register_template``): the assistant slot is content + EOS (content
    alone with ``efficient_eos``, where the EOS id is appended after the completion instead), and an
    observation (tool) turn is formatted as a user turn."""
    if assistant is None:
        assistant = ("{{content}}",) if efficient_eos else ("{{content}}", EOS)
    return Template(name, user, assistant, system, observation or user, efficient_eos=efficient_eos, **rest)


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _with(message: dict, content: str) -> dict:
    return {**message, "content": content}


def _join(parts: list[list[int]]) -> list[int]:
    return [i for part in parts for i in part]
