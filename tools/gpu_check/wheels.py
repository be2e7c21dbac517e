"""The wheels tools/gpu_kit.sh carries in .whl/: which to install over the image's packages, and what they need.

A carried wheel is installed (``pip install --no-index --no-deps --target``) where the image lacks its package, or
has a version outside pyproject.toml's range for it; else the image's own is used. Then every installed wheel's
requirements (its METADATA's Requires-Dist, markers evaluated here) are checked against what is importable, so a
missing or too old dependency is named before a step fails on it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]


def project_ranges(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, SpecifierSet]:
    """{canonical name: specifier} of pyproject's dependencies and its extras' (the tests need dev's)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from refresh_constraints import project_requirements

    return {canonicalize_name(r.name): r.specifier for r in project_requirements(pyproject)}


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def plan(wheels: list[Path], ranges: dict[str, SpecifierSet],
         have: Callable[[str], str | None] = installed_version) -> list[tuple[Path, bool, str]]:
    """(wheel, install it?, why) for each carried wheel, in name order."""
    out = []
    for wheel in sorted(wheels):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        present, spec = have(name), ranges.get(name)
        if present is None:
            out.append((wheel, True, f"{name} {version}: the image has no {name}"))
        elif spec is not None and not spec.contains(present, prereleases=True):
            out.append((wheel, True, f"{name} {version}: the image's {present} is outside pyproject's {name}{spec}"))
        else:
            out.append((wheel, False, f"{name}: the image's {present} is used" + (f" ({name}{spec})" if spec else "")))
    return out


def install(wheels: list[Path], target: Path) -> None:
    """pip install --no-index --no-deps into ``target`` (put first on PYTHONPATH by the caller)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)], check=True)


def requirements_of(wheel: Path) -> list[Requirement]:
    """The wheel's Requires-Dist that apply here (no extra asked for)."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = z.read(name).decode("utf-8")
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def unmet(wheels: list[Path], have: Callable[[str], str | None] = installed_version) -> list[str]:
    """One line per requirement of an installed wheel that nothing importable satisfies."""
    problems = []
    for wheel in wheels:
        owner = parse_wheel_filename(wheel.name)[0]
        for req in requirements_of(wheel):
            present = have(req.name)
            if present is None:
                problems.append(f"{owner} needs {req}, which is not installed")
            elif not req.specifier.contains(present, prereleases=True):
                problems.append(f"{owner} needs {req}; {present} is installed")
    return problems


def outside_ranges(ranges: dict[str, SpecifierSet], have: Callable[[str], str | None] = installed_version) -> list[str]:
    """One line per pyproject dependency that is missing, or installed outside its range (no wheel carried for it)."""
    problems = []
    for name, spec in sorted(ranges.items()):
        present = have(name)
        if present is None:
            problems.append(f"{name}{spec} is not installed")
        elif not spec.contains(present, prereleases=True):
            problems.append(f"{name} {present} is outside pyproject's {name}{spec}")
    return problems
