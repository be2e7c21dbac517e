"""Where this process sits in a distributed launch: torchrun and accelerate launch set RANK, LOCAL_RANK and
WORLD_SIZE; a plain run has none of them (rank 0 of 1). Read at each call, so a launcher or a test may set them
after import."""

from __future__ import annotations

import os

import click

from .errors import DpoLeanError


def _number(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise DpoLeanError(f"environment variable {name}={text!r} is not a whole number; a launcher sets it "
                           f"(torchrun, accelerate launch): unset it for a single process") from None


def rank() -> int:
    """The global rank (0 in a single process)."""
    return _number("RANK", 0)


def local_rank() -> int:
    """The rank on this machine: the GPU index this process uses."""
    return _number("LOCAL_RANK", 0)


def world_size() -> int:
    return _number("WORLD_SIZE", 1)


def is_main_process() -> bool:
    """True in a single process, and in the process of global rank 0 under a launcher."""
    return rank() == 0


def cpus() -> int:
    """The CPUs this process may run on (its affinity, where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def say(message: str) -> None:
    """Print on the main process only, so that N processes print a line once."""
    if is_main_process():
        click.echo(message)


def refuse_launcher(command: str, usage: str = "CONFIG.yaml") -> None:
    """A one-line error if ``command`` (which runs in one process) was started by a launcher."""
    if world_size() > 1:
        raise DpoLeanError(f"{command} runs in one process; run `dpo-lean {command} {usage}` without torchrun or "
                           "accelerate launch")


def agree_max(value: int, device) -> int:
    """The largest ``value`` over the processes of a launch (a collective on ``device``); ``value`` itself where no
    process group is running."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())
