"""The C allocator told to give large freed buffers back to the system at once, so a worker does not keep them.

glibc's malloc serves a large allocation (128 KiB and more, at first) with a
mapping of its own, unmapped when freed. But on each such free it raises that
threshold to the size just freed, up to 32 MiB: after one 1 MiB body the
buffers of every later one (the body, its gunzipped copy, orjson's output)
come from the heap instead, and the heap keeps what they leave behind. After a
few hostile bodies a worker held 12 MiB more than it used (tests/test_memory.py).
A fixed threshold keeps every large buffer in a mapping of its own; it costs a
mapping and an unmapping per such buffer, which only large bodies make.
"""

import ctypes

# mallopt's parameter number for the threshold (malloc.h); setting it turns the raising off.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def return_large_buffers() -> None:
    """Fix glibc's threshold for mapping allocations at MMAP_THRESHOLD_BYTES; without glibc, do nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # another C library (musl, macOS): its own allocator, its own habits
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
