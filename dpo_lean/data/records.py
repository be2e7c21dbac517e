"""The normalised preference record every layout becomes, and the record of a skipped row."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

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
    reason: str  # a short, stable key such as "empty_completion"; see formats.SKIP_REASONS
    detail: str = ""
