"""``dense``: the full matrix, row-major."""
from __future__ import annotations

import numpy as np

from .base import AnyQuant, Encoded, check_no_extra, check_values, default_quant
from .values import dense_rows, load_part, store_values, values_nbytes


class Dense:
    name = "dense"

    def encode(self, x: np.ndarray, value_dtype: str, quant: AnyQuant | None = None, **_) -> Encoded:
        m, n = x.shape
        absmax, expand = dense_rows(m, n)
        parts = store_values(x, value_dtype, quant, absmax, expand)
        return Encoded(self.name, (m, n), value_dtype, parts, {}, default_quant(value_dtype, quant))

    def check_layout(self, shape, value_dtype, quant, params, parts, names) -> None:
        m, n = shape
        used = check_values(parts, names, value_dtype, quant, "values", (m, n), m)
        check_no_extra(parts, names, used, self.name)

    def decode(self, enc: Encoded, names) -> np.ndarray:
        m, n = enc.shape
        _, expand = dense_rows(m, n)
        return load_part(enc.parts, enc.value_dtype, enc.quant, "values", m * n, (m, n), expand, names)

    def predict_nbytes(self, shape, value_dtype, quant, nnz=None, **_) -> int:
        m, n = shape
        return values_nbytes(value_dtype, quant, m, m * n)
