"""Storing a values array in its value dtype, quantized to int8 when asked.

Codecs describe *which row* each value belongs to (for per_row scales) by a
``RowLayout``; this module turns float values into stored parts and back.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .base import (Quant, block_scale_per_value, dequantize_with, group_absmax_contiguous, n_block_groups,
                   quantize_flat_blocks, quantize_with, scales_from_absmax, to_value_dtype)

#: (absvals) -> per-row absmax, and (per-row scales) -> per-value scale, both flat.
RowAbsmax = Callable[[np.ndarray], np.ndarray]
RowExpand = Callable[[np.ndarray], np.ndarray]


def store_values(values: np.ndarray, value_dtype: str, quant: Quant | None,
                 row_absmax: RowAbsmax, row_expand: RowExpand,
                 part: str = "values") -> dict[str, np.ndarray]:
    """Parts holding ``values`` (any shape, float) in ``value_dtype``."""
    if value_dtype != "int8":
        return {part: to_value_dtype(values, value_dtype)}
    if quant is None:
        quant = Quant()
    quant.validate()
    scale_part = "scales" if part == "values" else f"{part}_scales"
    v = np.asarray(values, dtype=np.float32)
    if quant.scheme == "per_block":
        q, s = quantize_flat_blocks(v.reshape(-1), quant.block, quant.scale_dtype)
        return {part: q.reshape(v.shape), scale_part: s}
    s = scales_from_absmax(row_absmax(np.abs(v)), quant.scale_dtype)
    q = quantize_with(v.reshape(-1), row_expand(s)).reshape(v.shape)
    return {part: q, scale_part: s}


def load_values(stored: np.ndarray, scales: np.ndarray | None, quant: Quant | None,
                row_expand: RowExpand) -> np.ndarray:
    """float32 values from stored parts (exact conversion, or one multiply for int8)."""
    if quant is None:
        return np.asarray(stored).astype(np.float32)
    flat = np.asarray(stored).reshape(-1)
    if quant.scheme == "per_block":
        per = block_scale_per_value(scales, flat.size, quant.block)
    else:
        per = row_expand(scales)
    return dequantize_with(flat, per).reshape(np.shape(stored))


def n_scales(quant: Quant, n_rows: int, n_values: int) -> int:
    return n_rows if quant.scheme == "per_row" else n_block_groups(n_values, quant.block)


def scales_nbytes(value_dtype: str, quant: Quant | None, n_rows: int, n_values: int) -> int:
    if value_dtype != "int8":
        return 0
    q = quant or Quant()
    from .. import dtypes

    return n_scales(q, n_rows, n_values) * dtypes.by_name(q.scale_dtype).itemsize


def dense_rows(m: int, n: int) -> tuple[RowAbsmax, RowExpand]:
    """Row layout of an (m, n) row-major values array."""
    def absmax(a: np.ndarray) -> np.ndarray:
        return a.reshape(m, n).max(axis=1) if n else np.zeros(m, np.float32)

    def expand(s: np.ndarray) -> np.ndarray:
        return np.repeat(s.astype(np.float32), n)

    return absmax, expand


def packed_rows(row_counts: np.ndarray) -> tuple[RowAbsmax, RowExpand]:
    """Row layout of values packed in row-major order, ``row_counts[i]`` of them in row i."""
    counts = np.asarray(row_counts, dtype=np.int64)

    def absmax(a: np.ndarray) -> np.ndarray:
        return group_absmax_contiguous(a, counts)

    def expand(s: np.ndarray) -> np.ndarray:
        return np.repeat(s.astype(np.float32), counts)

    return absmax, expand
