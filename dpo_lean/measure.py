"""Peak memory of this process, the way the benchmark and the run summaries report it."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_gb(device: torch.device | None = None) -> float:
    """CUDA peak allocated on a GPU; peak resident set size of the process on CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux
