"""`flora.training.memory`: the heap memory of freed tensors that small blocks allocated after them
keep from being returned goes back to the system with `release_freed_memory`."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from flora.training import memory

# After a 30 MiB tensor is freed (glibc raises its mmap threshold to that size), 64 tensors of 8 MiB
# (512 MiB), each followed by one of 256 KiB, come from the heap; the large ones are freed, the
# 256 KiB ones kept. Printed: the resident MiB still held, before and after `release_freed_memory`.
FRAGMENT = """
import torch
from flora.training import memory
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
first = torch.ones(30 << 18)
del first
before = resident_mib()
blocks = []
for _ in range(64):
    blocks += [torch.ones(2 << 20), torch.ones(64 << 10)]
small = blocks[1::2]
del blocks
held = resident_mib() - before
assert memory.release_freed_memory()
print(held, resident_mib() - before)
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


@glibc
def test_freed_tensors_pinned_in_the_heap_go_back_to_the_system():
    done = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True)
    held, released = map(int, done.stdout.split())
    assert held >= 512  # glibc alone keeps the 512 MiB
    assert released < 32


def test_off_glibc_nothing_is_done(monkeypatch):
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("", ""))
    assert memory.release_freed_memory() is False
