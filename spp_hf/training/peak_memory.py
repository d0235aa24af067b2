"""Peak memory of one stretch of work: CUDA's max allocated bytes on a GPU, the process's peak RSS on a CPU."""

from __future__ import annotations

import re
from pathlib import Path

import torch

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory() -> None:
    """Start a new peak: CUDA's counters, or Linux's VmHWM (writing 5 to clear_refs resets it to the current RSS)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    elif _CLEAR_REFS.exists():
        _CLEAR_REFS.write_text("5")


def peak_memory() -> dict[str, int | str | None]:
    """{"bytes": peak since `reset_peak_memory`, "kind": what was measured} (bytes None where unknown).

    On a CPU this is the whole process's resident peak, so it includes the Python runtime, the libraries
    and whatever memory earlier stages left allocated: compare methods run the same way.
    """
    if torch.cuda.is_available():
        return {"bytes": int(torch.cuda.max_memory_allocated()), "kind": "cuda max allocated"}
    if _STATUS.exists():
        found = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
        if found:
            return {"bytes": int(found.group(1)) * 1024, "kind": "process peak RSS"}
    return {"bytes": None, "kind": "unknown"}
