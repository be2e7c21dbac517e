"""Markdown tables, ratios and the machine line every table is printed under."""

from __future__ import annotations

import os
from pathlib import Path


def machine() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name}, {os.cpu_count()} cores, torch {torch.__version__}"


def print_table(title: str, rows: list[tuple], header: tuple) -> None:
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def reserved_column(results: dict):
    """(header, cells of one result) of the "reserved GB" column (CUDA's caching allocator peak): there when some
    result has the figure (on a GPU), left out on CPU, where peak GB is the resident set size and already counts
    everything the process holds."""
    if not any(r.get("reserved_gb") is not None for r in results.values()):
        return (), lambda r: ()
    return ("reserved GB",), lambda r: (f"{r['reserved_gb']:.2f}" if r.get("reserved_gb") is not None else "",)


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else ""

