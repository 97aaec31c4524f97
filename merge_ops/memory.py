"""Peak memory of this process, per job: a worker runs many jobs and each reports its own peak.

Linux keeps the peak resident set (VmHWM) in /proc/self/status, and writing 5 to
/proc/self/clear_refs resets it; elsewhere the peak is process-wide (ru_maxrss). On CUDA the
allocator's own peak is reported too.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any


def _cuda(device: Any) -> Any:
    import torch

    return torch.cuda if torch.device(device).type == "cuda" and torch.cuda.is_available() else None


def reset_peak(device: Any = "cpu") -> bool:
    """Start a new peak window; False where the RSS peak cannot be reset (then it stays process-wide)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        ok = True
    except OSError:
        ok = False
    if (cuda := _cuda(device)) is not None:
        cuda.reset_peak_memory_stats()
    return ok


def peak_rss_mib() -> float:
    """The peak RSS since the last reset (VmHWM; ru_maxrss where /proc is missing), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak(device: Any = "cpu") -> dict[str, float]:
    """{"peak_rss_mib"} and, on CUDA, {"peak_cuda_mib"}: peaks since the last reset_peak()."""
    out = {"peak_rss_mib": peak_rss_mib()}
    if (cuda := _cuda(device)) is not None:
        out["peak_cuda_mib"] = cuda.max_memory_allocated() / 2**20
    return out


def device_budget_mib(device: Any = "cpu") -> float | None:
    """Memory a job may use on its device: ALLOY_MEMORY_BUDGET (e.g. 8GB) if set, else on CUDA the
    free memory; None (not checked) on CPU without a budget."""
    import os

    if v := os.environ.get("ALLOY_MEMORY_BUDGET"):
        from merge_ops.spec import parse_size

        return parse_size(v) / 2**20
    if (cuda := _cuda(device)) is not None:
        free, _ = cuda.mem_get_info()
        return free / 2**20
    return None
