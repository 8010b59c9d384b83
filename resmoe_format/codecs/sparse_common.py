"""Pieces shared by the sparse encodings: the default keep-mask and pointer checks."""
from __future__ import annotations

import numpy as np

from ..errors import RmoeFormatError
from .base import check_part, fail, value_allowed


def keep_mask(x: np.ndarray) -> np.ndarray:
    """Entries to store: every entry whose bits are not +0.0 (so -0.0 survives)."""
    return (x != 0) | np.signbit(x)


def pointer_dtype(total: int) -> str:
    return "u32" if total <= np.iinfo(np.uint32).max else "u64"


def check_pointers(ptr: np.ndarray, total: int, tname: str) -> np.ndarray:
    """Row pointers start at 0, never decrease and end at ``total``; returned as int64."""
    p = np.asarray(ptr).astype(np.int64).reshape(-1)
    if p.size == 0 or p[0] != 0 or p[-1] != total:
        raise fail(tname, f"pointers must start at 0 and end at {total}")
    if (np.diff(p) < 0).any():
        raise fail(tname, "pointers decrease")
    return p


def check_sorted_within(indices: np.ndarray, counts: np.ndarray, limit: int, tname: str) -> None:
    """Indices < limit and strictly increasing inside each segment of ``counts``."""
    idx = np.asarray(indices).astype(np.int64)
    if idx.size == 0:
        return
    if idx.max() >= limit:
        raise fail(tname, f"index {int(idx.max())} out of range (< {limit} required)")
    step = np.diff(idx) > 0
    starts = np.cumsum(counts)[:-1]
    starts = starts[(starts > 0) & (starts < idx.size)]
    boundary = np.zeros(idx.size - 1, dtype=bool)
    boundary[starts - 1] = True
    if not (step | boundary).all():
        raise fail(tname, "indices are not strictly increasing within a row")


def packed_values_count(parts, names, shape, value_dtype: str, encoding: str) -> int:
    """Check the 1-D packed ``values`` part (at most m*n entries); return its length."""
    m, n = shape
    if "values" not in parts or len(parts["values"][1]) != 1:
        raise RmoeFormatError(f"{encoding}: 1-D values tensor missing ({names.get('values')})")
    nnz = parts["values"][1][0]
    if nnz > m * n:
        raise fail(names.get("values", "values"), f"{nnz} values for {m * n} elements")
    check_part(parts, names, "values", (nnz,), value_allowed(value_dtype))
    return nnz
