"""``dense``: the full matrix, row-major."""
from __future__ import annotations

import numpy as np

from .base import Encoded, Quant, check_no_extra, check_part, check_quant_parts, value_allowed, value_bytes
from .values import dense_rows, load_values, scales_nbytes, store_values


class Dense:
    name = "dense"

    def encode(self, x: np.ndarray, value_dtype: str, quant: Quant | None = None, **_) -> Encoded:
        m, n = x.shape
        absmax, expand = dense_rows(m, n)
        parts = store_values(x, value_dtype, quant, absmax, expand)
        return Encoded(self.name, (m, n), value_dtype, parts, {}, _q(value_dtype, quant))

    def check_layout(self, shape, value_dtype, quant, params, parts, names) -> None:
        m, n = shape
        check_part(parts, names, "values", (m, n), value_allowed(value_dtype))
        used = {"values"} | check_quant_parts(parts, names, quant, value_dtype, "values", m, m * n)
        check_no_extra(parts, names, used, self.name)

    def decode(self, enc: Encoded, names) -> np.ndarray:
        m, n = enc.shape
        _, expand = dense_rows(m, n)
        return load_values(enc.parts["values"], enc.parts.get("scales"), enc.quant, expand)

    def predict_nbytes(self, shape, value_dtype, quant, nnz=None, **_) -> int:
        m, n = shape
        return m * n * value_bytes(value_dtype) + scales_nbytes(value_dtype, quant, m, m * n)


def _q(value_dtype: str, quant: Quant | None) -> Quant | None:
    return (quant or Quant()) if value_dtype == "int8" else None
