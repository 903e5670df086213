"""The heap policy of stage processes (glibc): bounded by default, reused inside collect."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from stages.heap import bound_malloc_cache, reuse_heap


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mapped_bytes() -> int:
    """Bytes glibc currently serves from their own mappings (allocations above the threshold)."""
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("glibc >= 2.33 only")
    f.restype = _Mallinfo2
    return f().hblkhd


def _mapped_by(nbytes: int) -> int:
    before = _mapped_bytes()
    a = np.empty(nbytes, dtype=np.uint8)
    grown = _mapped_bytes() - before
    del a
    return grown


def test_bound_maps_large_buffers_and_reuse_keeps_them_on_the_heap() -> None:
    bound_malloc_cache()
    assert _mapped_by(4 << 20) >= 4 << 20  # above the 1 MiB bound: its own mapping, unmapped on free
    with reuse_heap():
        assert _mapped_by(4 << 20) == 0  # below collect's threshold: from the heap, kept for reuse
        assert _mapped_by(64 << 20) >= 64 << 20  # above it: mapped still
    assert _mapped_by(4 << 20) >= 4 << 20  # the bound is back for whatever the process runs next
