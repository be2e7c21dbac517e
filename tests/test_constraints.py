"""constraints.txt (the versions the suite last passed with, opt-in) and tools/refresh_constraints.py that writes it."""

from __future__ import annotations

from importlib import metadata

import pytest
import refresh_constraints as rc
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def read_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # exactly one specifier: ==version
        assert spec.operator == "==" and not req.extras and req.marker is None, line
        name = canonicalize_name(req.name)
        assert name not in pins, f"{req.name} pinned twice"
        pins[name] = spec.version
    return pins


def test_constraints_pin_every_direct_dependency_inside_pyproject_ranges():
    pins = read_pins((ROOT / "constraints.txt").read_text(encoding="utf-8"))
    direct = rc.project_requirements(ROOT / "pyproject.toml")
    assert len(direct) >= 12  # dependencies and the dev/bench extras
    for req in direct:
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt pins no {req.name}"
        # a pin outside the range would make `pip install -e ".[dev]" -c constraints.txt` unsatisfiable
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req}"
    assert "dpo-lean" not in pins and not [n for n in pins if rc.CUDA_ONLY.match(n)]
    assert not [v for v in pins.values() if "+" in v]  # no local label such as +cpu: it would not resolve on PyPI


def fake_environment():
    """A hand-made dependency graph: extras, markers, a CUDA-only companion, an optional dependency not installed."""
    requires = {
        "lib": ["helper", "extra-only; extra == 'fast'", "windows-only; sys_platform == 'nonexistent-os'"],
        "torch": ["nvidia-cublas-cu12==12.1; platform_system == 'Linux'", "triton", "sympy"],
        "helper": ["fsspec[http]"],
        "fsspec": ["aiohttp; extra == 'http'", "never-installed; extra == 'gcs'"],
        "aiohttp": [], "sympy": [], "extra-only": [], "nvidia-cublas-cu12": [], "triton": [], "windows-only": [],
    }
    versions = {"lib": "1.2", "torch": "2.13.0+cpu", "helper": "0.3", "fsspec": "2026.1.0", "aiohttp": "3.9",
                "sympy": "1.14", "extra-only": "9", "nvidia-cublas-cu12": "12.1", "triton": "3.6", "windows-only": "1"}
    names = {"fsspec": "fsspec", "aiohttp": "aiohttp", "helper": "Helper_Lib"}
    return requires, versions, names


def test_collect_pins_follows_requirements_extras_and_markers():
    requires, versions, names = fake_environment()
    pins = rc.collect_pins([Requirement("lib>=1"), Requirement("torch>=2")],
                           requires=lambda n: [Requirement(r) for r in requires[canonicalize_name(n)]],
                           version=lambda n: versions.get(canonicalize_name(n)),
                           display_name=lambda n: names.get(canonicalize_name(n), n))
    # fsspec's 'http' extra is followed (helper asks for it), its 'gcs' one is not; lib's 'fast' extra is not
    # asked for; a marker for another OS excludes; torch's CUDA companions are left out; +cpu is dropped
    assert pins == {"lib": "1.2", "torch": "2.13.0", "Helper_Lib": "0.3", "fsspec": "2026.1.0", "aiohttp": "3.9",
                    "sympy": "1.14"}


def test_collect_pins_refuses_a_venv_missing_a_direct_dependency():
    with pytest.raises(SystemExit, match="not-here is not installed"):
        rc.collect_pins([Requirement("not-here>=1")], requires=lambda n: [], version=lambda n: None)


def test_refresh_writes_this_venvs_versions(tmp_path):
    out = tmp_path / "constraints.txt"
    rc.main(["-o", str(out)])
    pins = read_pins(out.read_text(encoding="utf-8"))
    for req in rc.project_requirements(ROOT / "pyproject.toml"):
        name = canonicalize_name(req.name)
        installed = metadata.version(req.name).split("+")[0]
        assert pins[name] == installed, req.name  # what this venv has (the script's job), not a committed value
    assert "dpo-lean" not in pins
