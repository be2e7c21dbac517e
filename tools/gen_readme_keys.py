"""Rewrite README.md's configuration reference from the Config object, so it cannot drift.

    python tools/gen_readme_keys.py            # rewrite the table between the markers
    python tools/gen_readme_keys.py --check    # exit 1 if README.md differs from the generated table

The table sits between ``<!-- keys:start -->`` and ``<!-- keys:end -->``; tests/test_readme_keys.py fails when stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- keys:start -->", "<!-- keys:end -->"


def render(readme: str) -> str:
    """``readme`` with the text between the markers replaced by dpo_lean.keys.key_table(markdown=True)."""
    from dpo_lean.keys import key_table

    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise SystemExit(f"{README}: needs one {START} line followed by one {END} line")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{key_table(markdown=True)}\n{END}{tail}"


def main(argv: list[str]) -> int:
    current = README.read_text(encoding="utf-8")
    wanted = render(current)
    if "--check" in argv:
        if current != wanted:
            print(f"{README}: the configuration reference is stale; run python tools/gen_readme_keys.py")
            return 1
        return 0
    if current != wanted:
        README.write_text(wanted, encoding="utf-8")
        print(f"{README}: configuration reference rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
