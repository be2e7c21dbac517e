"""Detect each dataset's row layout (alpaca, ShareGPT, TRL) and normalise every row into a Record or a Skip.

Roles come out as ``system``, ``user``, ``assistant`` and ``tool``. ShareGPT tags map as
user_tag -> user, assistant_tag -> assistant, system_tag -> system, observation_tag -> tool and
function_tag -> assistant (a tool call is an assistant turn; its JSON stays in ``content``).
Prompt turns alternate user-side (user or tool) and assistant turns and end user-side, as in
LLaMA-Factory. Messages keep only ``role`` and ``content``; other keys are dropped.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..errors import DpoLeanError
from .format_spec import ALPACA_COLUMNS, FormatSpec, Tags
from .records import Message, Record, RowSkipped, Skip, UnusableRow
from .text import lone_surrogate, printable

LAYOUTS: dict[str, str] = {
    "alpaca": "alpaca (instruction, [input], chosen, rejected, [system], [history])",
    "sharegpt": "sharegpt (conversations or messages, chosen, rejected, [system])",
    "trl": "trl (prompt as text or messages, chosen, rejected)",
    "trl_implicit": "trl implicit prompt (chosen and rejected as full message lists, no prompt)",
}

USER_SIDE = frozenset({"user", "tool"})
ASSISTANT_SIDE = frozenset({"assistant"})
_AUTO_ORDER = ("sharegpt", "alpaca", "trl", "trl_implicit")
_JSON_CELLS = {"alpaca": {"history"}, "sharegpt": {"messages", "chosen", "rejected"},
               "trl": {"prompt", "chosen", "rejected"}, "trl_implicit": {"chosen", "rejected"}}


class _Row:
    """A raw row seen through the dataset's layout and column mapping."""

    def __init__(self, data: dict, spec: FormatSpec, layout: str) -> None:
        self.data, self.spec, self.layout = data, spec, layout

    def column(self, key: str) -> str:
        """The file column that holds the layout field ``key``."""
        if key in self.spec.columns:
            return self.spec.columns[key]
        if self.layout == "alpaca":
            return ALPACA_COLUMNS.get(key, key)
        if self.layout == "sharegpt" and key == "messages":
            return "conversations" if self.data.get("conversations") is not None else "messages"
        return key

    def get(self, key: str) -> Any:
        """The field's value, or None if absent; CSV cells holding JSON messages are decoded."""
        value = self.data.get(self.column(key))
        if self.spec.text_cells and isinstance(value, str) and key in _JSON_CELLS[self.layout]:
            if not value.strip() and key in ("history", "messages"):
                return None  # an empty CSV cell is an absent list
            return _decode_cell(value, pairs=key == "history")
        return value

    def need(self, key: str) -> Any:
        """The field's value; a missing_field skip if absent or null."""
        value = self.get(key)
        if value is None:
            raise RowSkipped("missing_field", f"'{self.column(key)}' is missing or null")
        return value


def _decode_cell(text: str, pairs: bool) -> Any:
    """A CSV cell's JSON if it looks like messages (or [user, assistant] pairs); else the text unchanged."""
    if not text.lstrip().startswith(("[", "{")):
        return text
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, an integer of over 4300 digits, or nested too deeply
        return text
    items = value if isinstance(value, list) else [value]
    if pairs:
        ok = isinstance(value, list) and all(isinstance(p, list) for p in items)
    else:
        ok = all(isinstance(m, dict) and ("role" in m or "from" in m) for m in items)
    return value if ok else text


def _type_name(value: Any) -> str:
    """'a string', 'an object', ... for messages about a wrongly typed value."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


# --- messages and turns -------------------------------------------------------------------------

def _msg(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def _message(item: Any, where: str, tags: Tags, roles: dict[str, str]) -> Message:
    """One {from, value} or {role, content} turn as an output message."""
    if not isinstance(item, dict):
        raise RowSkipped("wrong_type", f"{where} is {_type_name(item)}, expected an object with role and content")
    role_key, content_key = tags.keys_for(item)
    role, content = item.get(role_key), item.get(content_key)
    for key, value in ((role_key, role), (content_key, content)):
        if value is None:
            raise RowSkipped("missing_field", f"{where}.{key} is missing or null")
        if not isinstance(value, str):
            raise RowSkipped("wrong_type", f"{where}.{key} is {_type_name(value)}, expected a string")
    if role not in roles:
        raise RowSkipped("bad_turns", f"{where}.{role_key} {role!r} is not a known role ({', '.join(roles)}); "
                                      "set tags in dataset_info.json")
    return _msg(roles[role], content)


def _messages(value: Any, where: str, tags: Tags) -> list[Message]:
    """A list of turns as output messages."""
    if not isinstance(value, list):
        raise RowSkipped("wrong_type", f"'{where}' is {_type_name(value)}, expected a list of messages")
    roles = tags.roles()
    return [_message(item, f"{where}[{i}]", tags, roles) for i, item in enumerate(value)]


def _split_system(messages: list[Message]) -> tuple[str | None, list[Message]]:
    """(leading system content or None, the remaining turns)."""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _prompt(system: str | None, turns: list[Message], where: str) -> list[Message]:
    """System message (if non-blank) + turns, after checking the turns alternate and end user-side."""
    if not any(t["content"].strip() for t in turns if t["role"] in USER_SIDE):
        raise RowSkipped("bad_turns", f"'{where}' has no non-blank user turn (empty prompt)")
    for i, turn in enumerate(turns):
        expected, side = (USER_SIDE, "user") if i % 2 == 0 else (ASSISTANT_SIDE, "assistant")
        if turn["role"] not in expected:
            raise RowSkipped("bad_turns", f"'{where}' turn {i} is {turn['role']}, expected {side} (turns must alternate)")
    if len(turns) % 2 == 0:
        raise RowSkipped("bad_turns", f"'{where}' ends with an assistant turn; the prompt must end with a user turn")
    head = [_msg("system", system)] if system and system.strip() else []
    return head + turns


def _completion(row: _Row, key: str, tags: Tags) -> list[Message]:
    """chosen/rejected as assistant message(s): a string, one message object, or a list of messages."""
    value, where = row.need(key), row.column(key)
    if isinstance(value, str):
        messages = [_msg("assistant", value)]
    elif isinstance(value, dict):
        messages = [_message(value, where, tags, tags.roles())]
    elif isinstance(value, list):
        messages = _messages(value, where, tags)
    else:
        raise RowSkipped("wrong_type", f"'{where}' is {_type_name(value)}, expected text or assistant message(s)")
    _check_starts_assistant(messages, where)
    return messages


def _check_starts_assistant(messages: list[Message], where: str) -> None:
    if messages and messages[0]["role"] not in ASSISTANT_SIDE:
        raise RowSkipped("bad_turns", f"'{where}' starts with a {messages[0]['role']} turn, expected assistant")


def _text(row: _Row, key: str, required: bool = False) -> str | None:
    """A text field (None if optional and absent)."""
    value = row.need(key) if required else row.get(key)
    if value is not None and not isinstance(value, str):
        raise RowSkipped("wrong_type", f"'{row.column(key)}' is {_type_name(value)}, expected a string")
    return value


# --- layouts ------------------------------------------------------------------------------------

def _alpaca(row: _Row) -> tuple[list[Message], list[Message], list[Message]]:
    """instruction [+ "\\n" + input] as the user turn, after system and history."""
    instruction = _text(row, "prompt", required=True)
    query = _text(row, "query")
    system = _text(row, "system")
    turns = _history(row) + [_msg("user", "\n".join(part for part in (instruction, query) if part))]
    prompt = _prompt(system, turns, row.column("prompt"))
    tags = Tags()
    return prompt, _completion(row, "chosen", tags), _completion(row, "rejected", tags)


def _history(row: _Row) -> list[Message]:
    """alpaca history: [[user, assistant], ...] as alternating messages."""
    value, where = row.get("history"), row.column("history")
    if value is None:
        return []
    if not isinstance(value, list):
        raise RowSkipped("wrong_type", f"'{where}' is {_type_name(value)}, expected a list of [user, assistant] pairs")
    turns: list[Message] = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise RowSkipped("wrong_type", f"'{where}'[{i}] is not a [user, assistant] pair of strings")
        turns += [_msg("user", pair[0]), _msg("assistant", pair[1])]
    return turns


def _sharegpt(row: _Row) -> tuple[list[Message], list[Message], list[Message]]:
    """Turns with a leading system turn (or a system column), then one chosen and one rejected reply."""
    where = row.column("messages")
    messages = _messages(row.need("messages"), where, row.spec.tags)
    system, turns = _split_system(messages)
    if system is None:
        system = _text(row, "system")
    prompt = _prompt(system, turns, where)
    return prompt, _completion(row, "chosen", row.spec.tags), _completion(row, "rejected", row.spec.tags)


def _trl(row: _Row) -> tuple[list[Message], list[Message], list[Message]]:
    """TRL standard (prompt text) or conversational (prompt messages)."""
    value, where = row.need("prompt"), row.column("prompt")
    if isinstance(value, str):
        system, turns = None, [_msg("user", value)]
    elif isinstance(value, list):
        system, turns = _split_system(_messages(value, where, Tags()))
    else:
        raise RowSkipped("wrong_type", f"'{where}' is {_type_name(value)}, expected text or a list of messages")
    prompt = _prompt(system, turns, where)
    return prompt, _completion(row, "chosen", Tags()), _completion(row, "rejected", Tags())


def _trl_implicit(row: _Row) -> tuple[list[Message], list[Message], list[Message]]:
    """Full conversations in chosen/rejected: their longest common prefix is the prompt (TRL extract_prompt)."""
    sides = []
    for key in ("chosen", "rejected"):
        value = row.need(key)
        if not isinstance(value, list):
            raise RowSkipped("wrong_type", f"'{row.column(key)}' is {_type_name(value)}, "
                                           "expected a list of messages (there is no prompt column)")
        sides.append(_messages(value, row.column(key), Tags()))
    chosen, rejected = sides
    if chosen == rejected:
        raise RowSkipped("identical_completions", "chosen and rejected are the same conversation")
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    system, turns = _split_system(chosen[:common])
    prompt = _prompt(system, turns, "common prefix of chosen and rejected")
    _check_starts_assistant(chosen[common:], row.column("chosen"))
    _check_starts_assistant(rejected[common:], row.column("rejected"))
    return prompt, chosen[common:], rejected[common:]


_PARSERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "trl": _trl, "trl_implicit": _trl_implicit}


# --- detection and the dataset-level entry points -----------------------------------------------

def _matches(data: dict, layout: str, spec: FormatSpec) -> bool:
    """Whether a row carries the layout's signature field(s)."""
    row = _Row(data, spec, layout)
    if layout == "sharegpt":
        return row.get("messages") is not None
    if layout == "alpaca":
        return row.get("prompt") is not None and not isinstance(row.get("prompt"), list)
    if layout == "trl":
        return row.get("prompt") is not None
    return isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list)


def detect_layout(rows: Sequence[Any], spec: FormatSpec) -> str | None:
    """The layout most rows match (ties go to the earlier of sharegpt, alpaca, trl, trl_implicit); None if none."""
    order = (spec.formatting,) if spec.formatting else _AUTO_ORDER
    counts: Counter[str] = Counter()
    for data in rows:
        data = data.data if isinstance(data, UnusableRow) else data
        if isinstance(data, dict):
            layout = next((name for name in order if _matches(data, name, spec)), None)
            if layout:
                counts[layout] += 1
    if not counts:
        return None
    return max(order, key=lambda name: (counts[name], -order.index(name)))


def normalise_row(data: Any, layout: str, spec: FormatSpec) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen, rejected) for one raw row; raises RowSkipped with a SKIP_REASONS key."""
    if isinstance(data, UnusableRow):
        raise RowSkipped(data.reason, data.detail)
    if not isinstance(data, dict):
        raise RowSkipped("not_an_object", f"row is {_type_name(data)}, expected an object")
    row = _Row(data, spec, layout)
    prompt, chosen, rejected = _PARSERS[layout](row)
    tools = row.get("tools") if layout == "sharegpt" else None
    if tools not in (None, [], {}) and (not isinstance(tools, str) or tools.strip() not in ("", "[]", "{}")):
        # LF puts the tool list in the system prompt; training without it would not match the SFT run's prompts
        raise RowSkipped("tools_not_rendered", f"'{row.column('tools')}' holds a tool list")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["content"].strip() for m in messages):
            raise RowSkipped("empty_completion", f"'{row.column(key)}' is empty")
    if chosen == rejected:
        raise RowSkipped("identical_completions", "chosen and rejected are the same")
    for part, messages in (("prompt", prompt), (row.column("chosen"), chosen), (row.column("rejected"), rejected)):
        for i, message in enumerate(messages):
            problem = lone_surrogate(message["content"])
            if problem:
                where = f"'{part}'" + (f" message {i} ({message['role']})" if part == "prompt" or len(messages) > 1 else "")
                raise RowSkipped("bad_text", f"{where} {problem}; fix the text (its escapes or its encoding)")
    return prompt, chosen, rejected


def normalise_rows(rows: Sequence[tuple[str, Any]], *, name: str, label: str, spec: FormatSpec,
                   start_index: int = 0, layout: str | None = None) -> tuple[list[Record], list[Skip], str]:
    """Records and skips for one dataset's ``(where, raw row)`` pairs, and the layout detected (or given: the one
    detected from all of a dataset's rows, when they come chunk by chunk).

    ``name`` becomes each Record's source; ``label`` names the dataset in errors; row indices
    start at ``start_index``. Raises DpoLeanError if no row matches any layout.
    """
    layout = layout or detect_layout([data for _, data in rows], spec)
    if layout is None:
        raise DpoLeanError(_no_layout_message(label, [data for _, data in rows], spec))
    records: list[Record] = []
    skips: list[Skip] = []
    for offset, (where, data) in enumerate(rows):
        index = start_index + offset
        try:
            prompt, chosen, rejected = normalise_row(data, layout, spec)
        except RowSkipped as skipped:
            skips.append(Skip(index, where, skipped.reason, skipped.detail))
            continue
        records.append(Record(row_index=index, prompt=prompt, chosen=chosen, rejected=rejected, source=name,
                              location=where))
    return records, skips, layout


def _no_layout_message(label: str, rows: Sequence[Any], spec: FormatSpec) -> str:
    """One line: the file, the columns found and the layouts expected."""
    rows = [data.data if isinstance(data, UnusableRow) else data for data in rows]
    columns = sorted({printable(str(key)) for data in rows if isinstance(data, dict) for key in data})
    found = ", ".join(columns[:20]) + (", ..." if len(columns) > 20 else "") if columns else "none (no row is an object)"
    expected = [LAYOUTS[spec.formatting]] if spec.formatting else list(LAYOUTS.values())
    mapping = f" with columns mapping {spec.columns}" if spec.columns else ""
    return (f"{label}: no row matches a preference layout{mapping}; columns found: {found}; expected "
            f"{' or '.join(expected)}; point at a preference dataset or set formatting/columns in dataset_info.json")
