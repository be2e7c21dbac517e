"""Memory as the run summaries report it: peak allocated and, on CUDA, peak reserved (what runs a card out of memory);
on CPU the process's peak RSS, and no reserved figure."""

from __future__ import annotations

import pytest
import torch

from dpo_lean import measure


def test_on_cuda_both_peaks_are_reported(monkeypatch):
    """CUDA's counters patched (no GPU needed): allocated 3 GB at most, the caching allocator reserved 5 GB."""
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 3_000_000_000 if d == dev else 0)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: 5_123_456_789 if d == dev else 0)
    assert measure.memory_metrics(dev) == {"peak_memory_gb": 3.0, "peak_memory_reserved_gb": 5.123}
    assert measure.peak_reserved_gb(dev) == pytest.approx(5.123456789)


@pytest.mark.parametrize("device", [None, torch.device("cpu")])
def test_on_cpu_the_peak_is_the_rss_and_there_is_no_reserved_figure(device):
    ballast = bytearray(200 * 2**20)  # noqa: F841 (200 MB resident while measured)
    metrics = measure.memory_metrics(device)
    assert set(metrics) == {"peak_memory_gb"} and metrics["peak_memory_gb"] > 0.2
    assert measure.peak_reserved_gb(device) is None


@pytest.mark.cuda
def test_cuda_precompute_reports_peak_reserved_at_least_peak_allocated(tiny_config):
    """On a GPU: precompute's summary has both figures, reserved >= allocated (the allocator keeps what it got)."""
    from dpo_lean.precompute import run_precompute

    summary = run_precompute(tiny_config(copy_cache=False, ref_cache_dir=None))
    assert summary["peak_memory_reserved_gb"] >= summary["peak_memory_gb"] > 0
