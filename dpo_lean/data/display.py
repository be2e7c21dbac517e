"""Tokenised rows for a person to read (``data-check --show``) or a program to diff (``--dump-ids``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..storage import atomic_write_text
from .tokenize import TokenizedRow

NEWLINE = "\u21b5"  # ↵ before each line break, so "\n" and "\n\n" show


def render_ids(tokenizer, ids: list[int]) -> str:
    """The text of ``ids`` with every special or added token as ⟦token⟧ (the same text tokenised as plain
    pieces stays plain) and each newline shown as ↵."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    parts, run = [], []
    for i in ids:
        if i in special:
            parts += [tokenizer.decode(run, clean_up_tokenization_spaces=False)] if run else []
            parts.append(f"\u27e6{tokenizer.convert_ids_to_tokens(i)}\u27e7")
            run = []
        else:
            run.append(i)
    if run:
        parts.append(tokenizer.decode(run, clean_up_tokenization_spaces=False))
    text = "".join(parts).replace("\n", NEWLINE + "\n")
    return text[:-1] if text.endswith("\n") else text  # the ↵ shows it; the next line is the boundary


def render_row(tokenizer, row: TokenizedRow) -> str:
    """One row as the model sees it: the prompt, then each completion after a boundary line."""
    cut = " (truncated to cutoff_len)" if row.truncated else ""
    lines = [f"row {row.row_index}{cut}: prompt {len(row.prompt_ids)} tokens, chosen {len(row.chosen_ids)}, "
             f"rejected {len(row.rejected_ids)}", "\u250c\u2500 prompt", render_ids(tokenizer, row.prompt_ids)]
    for name, ids in (("chosen", row.chosen_ids), ("rejected", row.rejected_ids)):
        lines += [f"\u251c\u2500 {name} (the completion starts here)", render_ids(tokenizer, ids)]
    lines.append("\u2514\u2500")
    return "\n".join(lines)


def write_ids(rows: list[TokenizedRow], path: str | Path) -> Path:
    """Every row's ids as JSON lines ``{row_index, prompt_ids, chosen_ids, rejected_ids}``."""
    text = "".join(json.dumps({"row_index": r.row_index, "prompt_ids": r.prompt_ids, "chosen_ids": r.chosen_ids,
                               "rejected_ids": r.rejected_ids}) + "\n" for r in rows)
    atomic_write_text(path, text)
    return Path(path)
