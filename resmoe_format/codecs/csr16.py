"""``csr16``: compressed sparse rows with uint16 column indices.

A matrix wider than 65536 columns is cut into column blocks of 65536 (the last
narrower); each block is a CSR of its own, stored one after the other. ``indptr`` has
shape (blocks, m + 1) and holds offsets into the shared ``values``/``indices`` arrays.
"""
from __future__ import annotations

import numpy as np

from .base import (AnyQuant, Encoded, check_no_extra, check_part, check_values, default_quant, fail,
                   group_absmax_contiguous)
from .kquant import is_kquant
from .sparse_common import check_pointers, check_sorted_within, keep_mask, pointer_dtype
from .values import load_part, store_values, values_nbytes
from .. import dtypes
from ..errors import RmoeFormatError

BLOCK_COLS = 65536


def n_col_blocks(n: int) -> int:
    return max(1, -(-n // BLOCK_COLS))


class Csr16:
    name = "csr16"

    def encode(self, x: np.ndarray, value_dtype: str, quant: AnyQuant | None = None,
               mask: np.ndarray | None = None, **_) -> Encoded:
        m, n = x.shape
        mask = keep_mask(x) if mask is None else mask
        cb = n_col_blocks(n)
        counts = np.zeros((cb, m), dtype=np.int64)
        vals, idx = [], []
        for b in range(cb):
            c0, c1 = b * BLOCK_COLS, min(n, (b + 1) * BLOCK_COLS)
            sub = mask[:, c0:c1]
            r, c = np.nonzero(sub)
            counts[b] = sub.sum(axis=1)
            vals.append(x[:, c0:c1][r, c])
            idx.append(c.astype(np.uint16))
        values = np.concatenate(vals).astype(np.float32)
        nnz = values.size
        ptr = np.zeros((cb, m + 1), dtype=np.int64)
        flat_counts = counts.reshape(-1)
        offs = np.concatenate([[0], np.cumsum(flat_counts)])
        for b in range(cb):
            ptr[b] = offs[b * m: b * m + m + 1]
        parts = {"indptr": ptr.astype(dtypes.by_name(pointer_dtype(nnz)).np),
                 "indices": np.concatenate(idx)}
        parts.update(store_values(values, value_dtype, quant, *_rows(counts)))
        return Encoded(self.name, (m, n), value_dtype, parts, {}, default_quant(value_dtype, quant))

    def check_layout(self, shape, value_dtype, quant, params, parts, names) -> None:
        m, n = shape
        counted = "indices" if is_kquant(value_dtype) else "values"  # packed k-quant codes do not give nnz
        if counted not in parts:
            raise RmoeFormatError(f"csr16: {counted} tensor missing ({names.get(counted)})")
        nnz_shape = parts[counted][1]
        if len(nnz_shape) != 1:
            raise fail(names.get(counted, counted), f"csr16 {counted} must be 1-D")
        nnz = nnz_shape[0]
        used = check_values(parts, names, value_dtype, quant, "values", (nnz,), m)
        check_part(parts, names, "indices", (nnz,), ("u16",))
        check_part(parts, names, "indptr", (n_col_blocks(n), m + 1), ("u32", "u64"))
        check_no_extra(parts, names, used | {"indices", "indptr"}, self.name)

    def decode(self, enc: Encoded, names) -> np.ndarray:
        m, n = enc.shape
        cb = n_col_blocks(n)
        indices = enc.parts["indices"]
        nnz = indices.size
        ptr = np.asarray(enc.parts["indptr"]).astype(np.int64)
        pname = names.get("indptr", "indptr")
        for b in range(1, cb):
            if ptr[b, 0] != ptr[b - 1, m]:
                raise fail(pname, f"column block {b} does not start where block {b - 1} ends")
        flat = np.concatenate([ptr[b, :m] for b in range(cb)] + [ptr[-1, m:]])
        check_pointers(flat, nnz, pname)
        counts = np.diff(flat).reshape(cb, m)
        idx = np.asarray(indices).astype(np.int64)
        block_of = np.repeat(np.arange(cb), counts.sum(axis=1))
        width = np.minimum(n - np.arange(cb) * BLOCK_COLS, BLOCK_COLS)
        if idx.size and (idx >= width[block_of]).any():
            raise fail(names.get("indices", "indices"), "column index beyond the matrix width")
        check_sorted_within(idx, counts.reshape(-1), BLOCK_COLS, names.get("indices", "indices"))
        _, expand = _rows(counts)
        values = load_part(enc.parts, enc.value_dtype, enc.quant, "values", nnz, (nnz,), expand, names)
        rows = np.repeat(np.tile(np.arange(m), cb), counts.reshape(-1))
        out = np.zeros((m, n), dtype=np.float32)
        out[rows, idx + block_of * BLOCK_COLS] = values
        return out

    def predict_nbytes(self, shape, value_dtype, quant, nnz: int = 0, **_) -> int:
        m, n = shape
        ptr_b = dtypes.by_name(pointer_dtype(nnz)).itemsize
        return nnz * 2 + n_col_blocks(n) * (m + 1) * ptr_b + values_nbytes(value_dtype, quant, m, nnz)


def _rows(counts: np.ndarray):
    """Row layout of csr values: ``counts[b, i]`` values of row i in column block b."""
    cb, m = counts.shape
    flat = counts.reshape(-1)

    def absmax(a: np.ndarray) -> np.ndarray:
        return group_absmax_contiguous(a, flat).reshape(cb, m).max(axis=0) if m else np.zeros(0, np.float32)

    def expand(s: np.ndarray) -> np.ndarray:
        return np.repeat(np.tile(s.astype(np.float32), cb), flat)

    return absmax, expand
