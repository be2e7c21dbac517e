"""How to read one dataset's rows, as LLaMA-Factory's dataset_info.json says it: formatting, columns, tags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import DpoLeanError

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
                  "system": "system", "history": "history"}
SHAREGPT_COLUMNS = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                    "system": "system", "tools": "tools"}


@dataclass(frozen=True)
class Tags:
    """ShareGPT role/content keys and role values (LLaMA-Factory's ``tags``).

    ``role_tag``/``content_tag`` None means per turn: ``from``/``value`` if the turn has ``from``,
    else ``role``/``content``. The OpenAI role names user/assistant/system/tool are always accepted
    unless a configured tag reuses one.
    """

    role_tag: str | None = None
    content_tag: str | None = None
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str = "system"

    def keys_for(self, turn: dict) -> tuple[str, str]:
        """The (role key, content key) to read from one turn."""
        if self.role_tag or self.content_tag:
            return self.role_tag or "from", self.content_tag or "value"
        return ("from", "value") if turn.get("from") is not None else ("role", "content")

    def roles(self) -> dict[str, str]:
        """Tag value -> output role."""
        mapping = {"user": "user", "assistant": "assistant", "system": "system", "tool": "tool"}
        mapping.update({self.user_tag: "user", self.assistant_tag: "assistant", self.observation_tag: "tool",
                        self.function_tag: "assistant", self.system_tag: "system"})
        return mapping


@dataclass(frozen=True)
class FormatSpec:
    """How to read a dataset's rows: forced formatting (or None to detect), column and tag remapping."""

    formatting: str | None = None  # "alpaca" | "sharegpt" | None = detect per dataset
    columns: dict[str, str] = field(default_factory=dict)  # LLaMA-Factory column key -> column in the file
    tags: Tags = Tags()
    text_cells: bool = False  # CSV: decode JSON message lists/objects held in string cells

    @classmethod
    def from_entry(cls, name: str, entry: dict, where: str) -> FormatSpec:
        """Validate a dataset_info.json entry's formatting/columns/tags; ``where`` names the registry file."""
        formatting = entry.get("formatting")
        if formatting not in (None, "alpaca", "sharegpt"):
            raise DpoLeanError(f"{where}: entry '{name}': formatting {formatting!r} is not 'alpaca' or 'sharegpt'; fix it")
        columns = _string_map(entry.get("columns"), f"{where}: entry '{name}': columns")
        allowed = {"alpaca": ALPACA_COLUMNS, "sharegpt": SHAREGPT_COLUMNS}.get(formatting, ALPACA_COLUMNS | SHAREGPT_COLUMNS)
        for key in columns:
            if key not in allowed:
                raise DpoLeanError(f"{where}: entry '{name}': columns key '{key}' is not supported for "
                                   f"{formatting or 'this'} formatting; use one of {', '.join(allowed)}")
        tags = _string_map(entry.get("tags"), f"{where}: entry '{name}': tags")
        known = Tags.__dataclass_fields__
        for key in tags:
            if key not in known:
                raise DpoLeanError(f"{where}: entry '{name}': tags key '{key}' is unknown; use one of {', '.join(known)}")
        return cls(formatting=formatting, columns=columns, tags=Tags(**tags))


def _string_map(value: Any, where: str) -> dict[str, str]:
    """A {str: str} dict from the registry, or a DpoLeanError naming ``where``."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise DpoLeanError(f"{where} must map names to column/tag strings, got {value!r}; fix dataset_info.json")
    return dict(value)
