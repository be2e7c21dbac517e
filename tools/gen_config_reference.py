"""Rewrite docs/configuration.md's key reference from the Config object, so it cannot drift.

    python tools/gen_config_reference.py            # rewrite the table between the markers
    python tools/gen_config_reference.py --check    # exit 1 if docs/configuration.md differs from the generated table

The table sits between ``<!-- keys:start -->`` and ``<!-- keys:end -->``; tests/test_config_reference.py fails when stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"
START, END = "<!-- keys:start -->", "<!-- keys:end -->"


def render(page: str) -> str:
    """``page`` with the text between the markers replaced by dpo_lean.keys.key_table(markdown=True)."""
    from dpo_lean.keys import key_table

    if page.count(START) != 1 or page.count(END) != 1 or page.index(START) > page.index(END):
        raise SystemExit(f"{PAGE}: needs one {START} line followed by one {END} line")
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{key_table(markdown=True)}\n{END}{tail}"


def main(argv: list[str]) -> int:
    current = PAGE.read_text(encoding="utf-8")
    wanted = render(current)
    if "--check" in argv:
        if current != wanted:
            print(f"{PAGE}: the configuration reference is stale; run python tools/gen_config_reference.py")
            return 1
        return 0
    if current != wanted:
        PAGE.write_text(wanted, encoding="utf-8")
        print(f"{PAGE}: configuration reference rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
