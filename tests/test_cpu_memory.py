"""`keep_freed_memory`: freed large buffers stay in the process instead of going back to the OS."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys, torch
from spp_hf.training.cpu_allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() is True
def rss_mb():
    import os
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = rss_mb()
x = torch.ones(64 * 2**20)  # 256 MB, above glibc's default mmap threshold
del x
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
@pytest.mark.slow
def test_a_freed_large_tensor_stays_mapped_only_with_keep_freed_memory():
    kept = {}
    for mode in ("glibc", "keep"):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        kept[mode] = float(out.stdout.split()[-1])
    assert kept["glibc"] < 64, kept  # unmapped on free: resident memory is back where it was
    assert kept["keep"] > 200, kept  # kept for the next step's allocations
