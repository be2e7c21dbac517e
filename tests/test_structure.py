"""The package's shape, read from its source (tools/structure.py): no import cycle; modules and functions short."""

from __future__ import annotations

import textwrap

import structure

# Over the limits, each capped at its size so it can only shrink (none today).
STILL_OVER: dict[str, int] = {}


def test_the_package_has_no_import_cycle():
    assert structure.cycles(structure.import_graph(structure.modules())) == []


def test_no_module_or_function_grows_past_the_limits():
    mods = structure.modules()
    over = {f"module {k}": v for k, v in structure.long_modules(mods).items()}
    over |= {f"function {k}": v for k, v in structure.long_functions(mods).items()}
    for name, lines in over.items():
        assert name in STILL_OVER, f"{name}: {lines} lines, over the limit; split it"
        assert lines <= STILL_OVER[name], f"{name} grew from {STILL_OVER[name]} to {lines} lines"


def test_the_checker_finds_a_cycle_through_a_deferred_import_and_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text(textwrap.dedent("""
        def f():
            from .. import a  # deferred, still a dependency
        def g():
        """) + "    x = 1\n" * 61)
    (pkg / "c.py").write_text("from . import a\n")  # depends on the cycle, is not in it
    mods = structure.modules(pkg)
    assert structure.cycles(structure.import_graph(mods)) == [["pkg.a", "pkg.sub.b"]]
    assert structure.long_functions(mods) == {"pkg.sub.b:g": 62}
    assert structure.long_modules(mods, limit=60) == {"pkg.sub.b": 65}


def test_the_benchmark_package_has_the_same_shape():
    """tools/bench: one job a module, no cycle, nothing over the limits."""
    mods = structure.modules(structure.PACKAGE.parent / "tools" / "bench")
    assert {"bench.cli", "bench.contenders", "bench.patches", "bench.worker", "bench.tables"} <= set(mods)
    assert structure.cycles(structure.import_graph(mods)) == []
    assert structure.long_modules(mods) == {} and structure.long_functions(mods) == {}
