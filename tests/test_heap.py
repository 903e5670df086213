"""The heap policy of stage processes (glibc): bounded by default, reused inside collect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Run in a fresh interpreter: in a long-lived process, a large request can be served from a free
# chunk the heap already holds, whatever the thresholds.
_PROBE = r"""
import ctypes
import numpy as np
from mlpfuse.core.heap import bound_malloc_cache, reuse_heap

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

info = ctypes.CDLL("libc.so.6").mallinfo2
info.restype = Mallinfo2

def mapped_by(nbytes):  # bytes glibc served from their own mappings for one allocation
    before = info().hblkhd
    a = np.empty(nbytes, dtype=np.uint8)
    grown = info().hblkhd - before
    del a
    return grown

bound_malloc_cache()
a = mapped_by(4 << 20)
with reuse_heap():
    b, c = mapped_by(4 << 20), mapped_by(64 << 20)
d = mapped_by(4 << 20)
print(a, b, c, d)
"""


def test_bound_maps_large_buffers_and_reuse_keeps_them_on_the_heap() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("glibc >= 2.33 only")
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    bound, reused, large, restored = map(int, out.stdout.split())
    assert bound >= 4 << 20  # above the 1 MiB bound: its own mapping, unmapped on free
    assert reused == 0  # below collect's threshold: from the heap, kept for the next layer
    assert large >= 64 << 20  # above it: mapped still
    assert restored >= 4 << 20  # the bound is back for whatever the process runs next
