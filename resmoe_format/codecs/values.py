"""Storing a values array in its value dtype: float, int8 with scales, or k-quant codes.

Codecs describe *which row* each value belongs to (for per_row scales) by a
``RowLayout``; this module turns float values into stored parts and back. k-quant values
(spec 5.10) ignore rows: the value part is flattened in storage order and cut into groups.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .. import dtypes
from . import kquant
from .base import (AnyQuant, Quant, block_scale_per_value, default_quant, dequantize_with, group_absmax_contiguous,
                   n_block_groups, quantize_flat_blocks, quantize_with, scales_from_absmax, to_value_dtype,
                   value_bytes)

#: (absvals) -> per-row absmax, and (per-row scales) -> per-value scale, both flat.
RowAbsmax = Callable[[np.ndarray], np.ndarray]
RowExpand = Callable[[np.ndarray], np.ndarray]


def store_values(values: np.ndarray, value_dtype: str, quant: AnyQuant | None,
                 row_absmax: RowAbsmax, row_expand: RowExpand,
                 part: str = "values") -> dict[str, np.ndarray]:
    """Parts holding ``values`` (any shape, float) in ``value_dtype``; k-quant values by the reference
    quantizer :func:`kquant.quantize` on the flattened part."""
    quant = default_quant(value_dtype, quant)
    if isinstance(quant, kquant.KqLayout):
        codes, grid = kquant.quantize(np.asarray(values, np.float32).reshape(-1), value_dtype, quant)
        return kquant.parts_of(codes, grid, value_dtype, quant, part)
    if quant is None:
        return {part: to_value_dtype(values, value_dtype)}
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


def load_part(parts: Mapping[str, np.ndarray], value_dtype: str, quant: AnyQuant | None, part: str, n: int,
              shape: tuple[int, ...], row_expand: RowExpand, names: Mapping[str, str] | None = None) -> np.ndarray:
    """float32 values of value part ``part`` (``n`` values of logical ``shape``) from a record's parts;
    k-quant streams are checked byte by byte (spec 7.3), ``names`` gives tensor names for errors."""
    if kquant.is_kquant(value_dtype):
        return kquant.values_of(parts, n, value_dtype, quant, part, dict(names or {})).reshape(shape)
    scale_part = "scales" if part == "values" else f"{part}_scales"
    return load_values(parts[part], parts.get(scale_part), quant, row_expand)


def n_scales(quant: Quant, n_rows: int, n_values: int) -> int:
    return n_rows if quant.scheme == "per_row" else n_block_groups(n_values, quant.block)


def values_nbytes(value_dtype: str, quant: AnyQuant | None, n_rows: int, n_values: int) -> int:
    """Stored bytes of one value part of ``n_values`` values over ``n_rows`` rows, scales included."""
    quant = default_quant(value_dtype, quant)
    if isinstance(quant, kquant.KqLayout):
        return kquant.nbytes(n_values, value_dtype, quant)
    scales = 0 if quant is None else n_scales(quant, n_rows, n_values) * dtypes.by_name(quant.scale_dtype).itemsize
    return n_values * value_bytes(value_dtype) + scales


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
