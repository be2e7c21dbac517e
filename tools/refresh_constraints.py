"""Write constraints.txt: the exact versions of dpo-lean's dependencies (and theirs) installed in this venv.

    .venv/bin/python -m pytest -q                          # the suite passes in this venv first
    .venv/bin/python tools/refresh_constraints.py          # then pin what it passed with

A user opts into those versions with ``pip install -e ".[dev]" -c constraints.txt``. The pins are pyproject's
dependencies and every extra's (dev, bench), followed transitively through each installed distribution's own
requirements (markers evaluated for this interpreter, requested extras included), as ``name==version`` lines in
the names pip freeze writes, sorted. Left out: dpo-lean itself; torch's CUDA-only companions (nvidia-*, triton,
cuda-*), which a CPU venv lacks and a GPU venv's torch build chooses; and a local version label such as torch's
``+cpu`` (a constraint ``torch==2.13.0`` accepts the CPU and the CUDA build alike).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CUDA_ONLY = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")
HEADER = """\
# The exact versions dpo-lean's test suite last passed with (tools/refresh_constraints.py wrote this file from
# that venv: Python {python}). Opt in with:  pip install -e ".[dev]" -c constraints.txt
# Without -c, pip resolves the newest releases inside pyproject.toml's ranges (what the README's test command uses).
"""


def project_requirements(pyproject: Path) -> list[Requirement]:
    """pyproject's dependencies and the requirements of every optional extra."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    extras = project.get("optional-dependencies", {})
    return [Requirement(r) for r in project["dependencies"] + [r for group in extras.values() for r in group]]


def _installed_requires(name: str) -> list[Requirement]:
    return [Requirement(r) for r in metadata.requires(name) or []]


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _installed_name(name: str) -> str:
    return metadata.metadata(name)["Name"]


def collect_pins(roots: list[Requirement], requires: Callable[[str], list[Requirement]] = _installed_requires,
                 version: Callable[[str], str | None] = _installed_version,
                 display_name: Callable[[str], str] = _installed_name) -> dict[str, str]:
    """{name as installed: version} for ``roots`` and everything they require, transitively.

    A requirement counts where its marker holds for this interpreter (with the extras asked of its parent);
    a root that is not installed is an error (the venv is incomplete), a transitive one absent is skipped
    (an optional dependency whose marker pip evaluated otherwise).
    """
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset]] = set()
    todo = [(r, True) for r in roots]
    while todo:
        req, is_root = todo.pop()
        key = canonicalize_name(req.name)
        if CUDA_ONLY.match(key) or (key, frozenset(req.extras)) in seen:
            continue
        if is_root and req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        seen.add((key, frozenset(req.extras)))
        installed = version(req.name)
        if installed is None:
            if is_root:
                raise SystemExit(f"{req.name} is not installed in this venv ({sys.executable}); "
                                 "install the project with its extras first: pip install -e \".[dev,bench]\"")
            continue
        pins[display_name(req.name)] = Version(installed).public
        for sub in requires(req.name):
            extras = req.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append((sub, False))
    return pins


def render(pins: dict[str, str], python: str) -> str:
    lines = [f"{name}=={version}" for name, version in sorted(pins.items(), key=lambda kv: canonicalize_name(kv[0]))]
    return HEADER.format(python=python) + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "constraints.txt")
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    args = parser.parse_args(argv)
    roots = [r for r in project_requirements(args.pyproject) if canonicalize_name(r.name) != "dpo-lean"]
    pins = collect_pins(roots)
    python = ".".join(map(str, sys.version_info[:3]))
    args.output.write_text(render(pins, python), encoding="utf-8")
    print(f"{args.output}: {len(pins)} pins from {sys.executable} (Python {python})")


if __name__ == "__main__":
    main()
