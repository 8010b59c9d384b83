"""``bitmap``: one bit per element (row-major, little-endian bit order within a byte)
plus the kept values packed in row-major order (their number in ``params.nnz`` for k-quant values)."""
from __future__ import annotations

import numpy as np

from .base import AnyQuant, Encoded, check_no_extra, check_part, default_quant, fail, stored_count
from .kquant import is_kquant
from .sparse_common import keep_mask, packed_values_count
from .values import load_part, packed_rows, store_values, values_nbytes


class Bitmap:
    name = "bitmap"

    def encode(self, x: np.ndarray, value_dtype: str, quant: AnyQuant | None = None,
               mask: np.ndarray | None = None, **_) -> Encoded:
        m, n = x.shape
        mask = keep_mask(x) if mask is None else np.asarray(mask, dtype=bool)
        packed = np.packbits(mask.reshape(-1), bitorder="little")
        values = x[mask].astype(np.float32)
        parts = {"mask": packed}
        parts.update(store_values(values, value_dtype, quant, *packed_rows(mask.sum(axis=1))))
        params = {"nnz": values.size} if is_kquant(value_dtype) else {}
        return Encoded(self.name, (m, n), value_dtype, parts, params, default_quant(value_dtype, quant))

    def check_layout(self, shape, value_dtype, quant, params, parts, names) -> None:
        m, n = shape
        _, used = packed_values_count(parts, names, shape, value_dtype, quant, params, self.name)
        check_part(parts, names, "mask", (-(-m * n // 8),), ("u8",))
        check_no_extra(parts, names, used | {"mask"}, self.name)

    def decode(self, enc: Encoded, names) -> np.ndarray:
        m, n = enc.shape
        packed = np.asarray(enc.parts["mask"])
        bits = np.unpackbits(packed, bitorder="little").view(bool)
        if bits[m * n:].any():
            raise fail(names.get("mask", "mask"), "padding bits after the last element are not zero")
        mask = bits[: m * n].reshape(m, n)
        nnz = stored_count(enc)
        if int(mask.sum()) != nnz:
            raise fail(names.get("mask", "mask"), f"{int(mask.sum())} bits set but {nnz} values stored")
        _, expand = packed_rows(mask.sum(axis=1))
        out = np.zeros((m, n), dtype=np.float32)
        out[mask] = load_part(enc.parts, enc.value_dtype, enc.quant, "values", nnz, (nnz,), expand, names)
        return out

    def predict_nbytes(self, shape, value_dtype, quant, nnz: int = 0, **_) -> int:
        m, n = shape
        return -(-m * n // 8) + values_nbytes(value_dtype, quant, m, nnz)

