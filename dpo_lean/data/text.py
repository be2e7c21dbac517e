"""Checks and escapes for text from users' files: lone surrogates (not valid Unicode) and unprintable characters."""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, any surrogate code point is a lone (unpaired) one


def printable(text: str) -> str:
    """``text`` with line breaks, control and format characters and lone surrogates as escapes: one safe line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def lone_surrogate(text: str) -> str | None:
    """'has a lone surrogate \\ud800 at character N' if ``text`` has one (it cannot be encoded or tokenised), else None."""
    match = _SURROGATE.search(text)
    return f"has a lone surrogate \\u{ord(match.group()):04x} at character {match.start()}" if match else None


def escape_surrogates(text: str) -> str:
    """``text`` with each lone surrogate as a JSON/Python escape (\\ud800), so that it can be written as UTF-8."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
