"""Lossless residuals: choose stored base values and float32 residuals so that the
restoration arithmetic (:func:`resmoe_format.restore.combine`) gives every expert back
bit for bit, for bf16, fp16 and fp32 sources (spec/FORMAT.md section 6.3)."""
from __future__ import annotations

import numpy as np

from . import dtypes
from .restore import combine


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def lossless_split(experts: list[np.ndarray], base: np.ndarray, dtype: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Return (stored base in ``dtype``, float32 residuals) that restore ``experts`` exactly.

    ``experts`` are the aligned expert matrices in source dtype ``dtype``; ``base`` any
    approximation of them. Where base + (expert - base) would not round back to some
    expert's exact bits (large magnitude gaps, signed zeros), the stored base element
    becomes -0.0 and the residual there is the expert value itself: -0.0 + x == x for
    every float x, so restoration is exact everywhere.
    """
    dt = dtypes.by_name(dtype).np
    xs = [np.asarray(x).astype(dt) for x in experts]
    if any(np.isnan(x.astype(np.float32)).any() for x in xs):
        raise ValueError("lossless mode cannot store NaN weights")
    b = np.asarray(base, dtype=np.float32).astype(dt)
    b32 = b.astype(np.float32)
    bad = np.zeros(b.shape, dtype=bool)
    for x in xs:
        x32 = x.astype(np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            d = x32 - b32
            r = combine(b32, d, dtype)
        bad |= _bits(r) != _bits(x)
    b = b.copy()
    b[bad] = -0.0
    b32 = b.astype(np.float32)
    residuals = []
    for x in xs:
        x32 = x.astype(np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.where(bad, x32, x32 - b32).astype(np.float32)
        if not np.array_equal(_bits(combine(b32, d, dtype)), _bits(x)):
            raise AssertionError("lossless split failed to restore exactly")  # cannot happen; guarded
        residuals.append(d)
    return b, residuals
