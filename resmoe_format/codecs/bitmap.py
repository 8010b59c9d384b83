"""``bitmap``: one bit per element (row-major, little-endian bit order within a byte)
plus the kept values packed in row-major order."""
from __future__ import annotations

import numpy as np

from .base import Encoded, Quant, check_no_extra, check_part, check_quant_parts, fail, value_bytes
from .dense import _q
from .sparse_common import keep_mask, packed_values_count
from .values import load_values, packed_rows, scales_nbytes, store_values


class Bitmap:
    name = "bitmap"

    def encode(self, x: np.ndarray, value_dtype: str, quant: Quant | None = None,
               mask: np.ndarray | None = None, **_) -> Encoded:
        m, n = x.shape
        mask = keep_mask(x) if mask is None else np.asarray(mask, dtype=bool)
        packed = np.packbits(mask.reshape(-1), bitorder="little")
        values = x[mask].astype(np.float32)
        parts = {"mask": packed}
        parts.update(store_values(values, value_dtype, quant, *packed_rows(mask.sum(axis=1))))
        return Encoded(self.name, (m, n), value_dtype, parts, {}, _q(value_dtype, quant))

    def check_layout(self, shape, value_dtype, quant, params, parts, names) -> None:
        m, n = shape
        nnz = packed_values_count(parts, names, shape, value_dtype, self.name)
        check_part(parts, names, "mask", (-(-m * n // 8),), ("u8",))
        used = {"values", "mask"} | check_quant_parts(parts, names, quant, value_dtype, "values", m, nnz)
        check_no_extra(parts, names, used, self.name)

    def decode(self, enc: Encoded, names) -> np.ndarray:
        m, n = enc.shape
        packed = np.asarray(enc.parts["mask"])
        bits = np.unpackbits(packed, bitorder="little").view(bool)
        if bits[m * n:].any():
            raise fail(names.get("mask", "mask"), "padding bits after the last element are not zero")
        mask = bits[: m * n].reshape(m, n)
        nnz = enc.parts["values"].size
        if int(mask.sum()) != nnz:
            raise fail(names.get("mask", "mask"), f"{int(mask.sum())} bits set but {nnz} values stored")
        _, expand = packed_rows(mask.sum(axis=1))
        out = np.zeros((m, n), dtype=np.float32)
        out[mask] = load_values(enc.parts["values"], enc.parts.get("scales"), enc.quant, expand)
        return out

    def predict_nbytes(self, shape, value_dtype, quant, nnz: int = 0, **_) -> int:
        m, n = shape
        return -(-m * n // 8) + nnz * value_bytes(value_dtype) + scales_nbytes(value_dtype, quant, m, nnz)

