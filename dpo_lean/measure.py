"""Memory of this process, the way the run summaries and the benchmark report it.

On a GPU: CUDA allocated memory (now, and its peak), and the peak the caching allocator reserved from the device
(what runs a card out of memory: allocated plus the allocator's cached, fragmented blocks). On CPU: the resident set
size, now (VmRSS) and its peak (VmHWM), which :func:`reset_peak` restarts (Linux ``clear_refs``), so a peak can be
taken over one phase; there the RSS already counts everything the process holds, so there is no reserved figure.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch


def _proc_status_gb(field: str) -> float | None:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak) in GB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def _on_gpu(device: torch.device | None) -> bool:
    """CUDA memory only for a CUDA ``device``; None means the process's RSS, in all three functions alike."""
    return device is not None and device.type == "cuda"


def peak_memory_gb(device: torch.device | None = None) -> float:
    """CUDA peak allocated on a GPU; peak resident set size of the process on CPU (since the last reset_peak)."""
    if _on_gpu(device):
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = _proc_status_gb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux


def peak_reserved_gb(device: torch.device | None = None) -> float | None:
    """CUDA peak reserved by the caching allocator (since the last reset_peak); None off CUDA (no such figure)."""
    if _on_gpu(device):
        return torch.cuda.max_memory_reserved(device) / 1e9
    return None


def memory_metrics(device: torch.device | None = None) -> dict[str, float]:
    """The peak memory figures a log line or summary reports: peak_memory_gb, and on CUDA peak_memory_reserved_gb."""
    out = {"peak_memory_gb": round(peak_memory_gb(device), 3)}
    reserved = peak_reserved_gb(device)
    if reserved is not None:
        out["peak_memory_reserved_gb"] = round(reserved, 3)
    return out


def current_memory_gb(device: torch.device | None = None) -> float | None:
    """Memory in use now: CUDA allocated on a GPU, else the process's RSS (None where the OS does not say)."""
    if _on_gpu(device):
        return torch.cuda.memory_allocated(device) / 1e9
    return _proc_status_gb("VmRSS")


def reset_peak(device: torch.device | None = None) -> None:
    """Start peak measurement afresh: CUDA's peak stats, or the kernel's VmHWM (Linux clear_refs; elsewhere the
    peak keeps covering the whole process)."""
    if _on_gpu(device):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
