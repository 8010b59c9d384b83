"""Keep resident memory near what is really held while streaming layer by layer."""
from __future__ import annotations

import ctypes


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Large temporaries freed between layers otherwise stay in the process's heap, so RSS would
    track the largest temporaries ever made rather than what is held.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def large_blocks_unmapped(threshold: int = 4 << 20) -> None:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own mapping, returned to the
    OS when freed (``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc raising the threshold as large blocks
    are freed); a no-op elsewhere. Streaming one expert after another then reuses memory instead of growing
    the heap with blocks that differ in size a little."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
