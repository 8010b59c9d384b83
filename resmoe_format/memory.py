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
