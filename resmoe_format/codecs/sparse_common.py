"""Pieces shared by the sparse encodings: the default keep-mask and pointer checks."""
from __future__ import annotations

import numpy as np

from ..errors import RmoeFormatError
from .base import _is_int, check_values, fail
from .kquant import is_kquant


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


def packed_values_count(parts, names, shape, value_dtype: str, quant, params, encoding: str) -> tuple[int, set[str]]:
    """Check the packed ``values`` of a bitmap or rice record (at most m*n entries): (nnz, part names used).

    nnz is the length of a 1-D ``values`` tensor; k-quant codes do not give it, so it is ``params.nnz``."""
    m, n = shape
    if is_kquant(value_dtype):
        nnz = params.get("nnz")
        if not (_is_int(nnz) and 0 <= nnz <= m * n):
            raise RmoeFormatError(f"{encoding}: k-quant values need params.nnz, an integer in [0, {m * n}], "
                                  f"got {nnz!r} ({names.get('values')})")
    else:
        if "values" not in parts or len(parts["values"][1]) != 1:
            raise RmoeFormatError(f"{encoding}: 1-D values tensor missing ({names.get('values')})")
        nnz = parts["values"][1][0]
        if nnz > m * n:
            raise fail(names.get("values", "values"), f"{nnz} values for {m * n} elements")
    return nnz, check_values(parts, names, value_dtype, quant, "values", (nnz,), m)
