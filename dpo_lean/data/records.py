"""The normalised preference record every layout becomes, the record of a skipped row, and the skip reasons."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from .text import printable

Message = dict  # {"role": "system" | "user" | "assistant" | ..., "content": str}


def row_id(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> str:
    """Stable content hash of a normalised row: the same content gives the same id in every run and layout."""
    canonical = json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected},
                           ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass
class Record:
    """One preference pair after normalisation.

    ``prompt`` holds the system message (if any), the history and the last user turn, in order;
    ``chosen`` and ``rejected`` hold the assistant message(s) that complete it.
    """

    row_index: int  # position in the loaded data (all datasets concatenated), before any shuffling
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str = ""  # dataset name or file the row came from
    location: str = ""  # where the row is, e.g. "data/train.jsonl line 12", for messages about it
    id: str = field(default="")

    def __post_init__(self) -> None:
        if not self.id:
            self.id = row_id(self.prompt, self.chosen, self.rejected)


@dataclass(frozen=True)
class Skip:
    """A row that was not kept, and why. Every dropped row gets one; nothing disappears uncounted."""

    row_index: int
    source: str  # e.g. "data/train.jsonl line 12" or "dpo_en_demo row 7"
    reason: str  # a short, stable key such as "empty_completion"; see SKIP_REASONS
    detail: str = ""


SKIP_REASONS: dict[str, str] = {
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field has the wrong type (e.g. a number where text or a message list is needed)",
    "empty_completion": "chosen or rejected is empty or whitespace only",
    "identical_completions": "chosen and rejected are the same, so the pair teaches nothing",
    "bad_turns": "the prompt is empty, or its turns do not alternate user/assistant and end with a user turn",
    "not_an_object": "the row is not a JSON object (e.g. a list, string or number)",
    "empty_prompt": "the prompt renders to no tokens (the template's prompt and full renderings differ from the first "
                    "token), so nothing predicts the first completion token",
    "prompt_too_long": "the prompt alone fills cutoff_len, leaving no room for a completion",
    "identical_after_truncation": "chosen and rejected become identical once truncated to cutoff_len",
    "identical_tokens": "chosen and rejected differ as text but not as tokens (the tokenizer's Unicode normalisation or "
                        "the template's trimming makes them equal)",
    "extra_cells": "a CSV row has more cells than the header has columns (often an unquoted comma), so its cells "
                   "cannot be matched to columns",
    "bad_text": "a text holds a lone surrogate (e.g. \\ud800 from a broken JSON escape): not valid Unicode, so it cannot "
                "be tokenised",
    "tools_not_rendered": "a ShareGPT row has a tools column (a tool list LLaMA-Factory renders into the system prompt "
                          "with the template's tool format), which dpo-lean does not render",
}

# What to do about each skip reason: data-check prints it beside the reason's first example.
SKIP_FIXES: dict[str, str] = {
    "missing_field": "add the field, or map your column to it with columns in dataset_info.json",
    "wrong_type": "give the field the type named, or set formatting in dataset_info.json to the layout you use",
    "empty_completion": "drop the row or fill in the completion",
    "identical_completions": "drop the row: a pair needs two different completions",
    "bad_turns": "make the prompt's turns alternate user/assistant and end with a user turn",
    "not_an_object": "make each row a JSON object with the preference fields",
    "empty_prompt": "give the row a prompt, or use a template that renders one",
    "prompt_too_long": "raise cutoff_len or shorten the prompt",
    "identical_after_truncation": "raise cutoff_len so the completions' difference survives truncation",
    "identical_tokens": "drop the row: its completions tokenise to the same ids",
    "extra_cells": "quote the CSV cells that hold commas",
    "bad_text": "fix the text's escapes or its encoding",
    "tools_not_rendered": "write the tool list into the system prompt yourself, or drop the tools column",
}
assert SKIP_FIXES.keys() == SKIP_REASONS.keys()


class RowSkipped(Exception):
    """Raised while normalising a row that must be skipped; carries a SKIP_REASONS key and a detail."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in SKIP_REASONS, reason
        detail = printable(detail)
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class UnusableRow:
    """A row its file reader could not take apart (e.g. a CSV row with more cells than the header): a counted skip."""

    reason: str  # a SKIP_REASONS key
    detail: str
    data: dict = field(default_factory=dict)  # what could be read, for layout detection only
