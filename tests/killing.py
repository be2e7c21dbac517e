"""Run a dpo-lean command in a fresh process that dies by a signal at a chosen point.

A point is (module, object in it or None, function name, n, before): the process sends itself the
signal on the n-th call of that function, before the call or after it returns.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass

SCRIPT = textwrap.dedent("""
    import importlib, os, signal, sys
    owner = importlib.import_module({module!r})
    if {obj!r}:
        owner = getattr(owner, {obj!r})
    original = getattr(owner, {attr!r})
    calls = 0
    def wrapped(*args, **kwargs):
        global calls
        calls += 1
        if calls == {n} and {before}:
            os.kill(os.getpid(), {signal})
        out = original(*args, **kwargs)
        if calls == {n} and not {before}:
            os.kill(os.getpid(), {signal})
        return out
    setattr(owner, {attr!r}, wrapped)
    from dpo_lean.cli import main
    sys.argv = ["dpo-lean", {command!r}, {config!r}]
    main()
""")


@dataclass(frozen=True)
class Point:
    module: str
    obj: str | None
    attr: str
    n: int
    before: bool

    def __str__(self) -> str:
        where = f"{self.module}.{self.obj + '.' if self.obj else ''}{self.attr}"
        return f"{'before' if self.before else 'after'} call {self.n} of {where}"


def run_until(point: Point, command: str, config_path, signal: str = "signal.SIGKILL",
              timeout: int = 300) -> subprocess.CompletedProcess:
    code = SCRIPT.format(module=point.module, obj=point.obj, attr=point.attr, n=point.n, before=point.before,
                         signal=signal, command=command, config=str(config_path))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- the same, forked from a warm process

_CONTEXT = None
PRELOAD = ["torch", "transformers", "peft", "bitsandbytes", "pyarrow.parquet", "dpo_lean.cli", "dpo_lean.train",
           "dpo_lean.precompute", "killing"]


def _context():
    """A forkserver that imported torch and transformers once: each killed run then starts in well under a
    second instead of paying the imports (a fork of the test process itself is not safe once torch ran)."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing

        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _child(point: Point, command: str, config_path: str) -> None:
    import importlib
    import os
    import signal
    import sys

    owner = importlib.import_module(point.module)
    if point.obj:
        owner = getattr(owner, point.obj)
    original, calls = getattr(owner, point.attr), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == point.n and point.before:
            os.kill(os.getpid(), signal.SIGKILL)
        out = original(*args, **kwargs)
        if calls[0] == point.n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, point.attr, wrapped)
    from dpo_lean.cli import main

    sys.argv = ["dpo-lean", command, str(config_path)]
    main()


def kill_at(point: Point, command: str, config_path, timeout: int = 300) -> int | None:
    """Run ``dpo-lean COMMAND CONFIG`` in a fresh forked process that SIGKILLs itself at ``point``; its exit code."""
    process = _context().Process(target=_child, args=(point, command, str(config_path)))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
    return process.exitcode
