"""``lowrank``: U (m, r) and V (r, n); the matrix is U @ V.

The product is accumulated in float64 and rounded once to float32 (spec section
"Restoration arithmetic").
"""
from __future__ import annotations

import numpy as np

from .base import AnyQuant, Encoded, _is_int, check_no_extra, check_values, default_quant
from .values import dense_rows, load_part, store_values, values_nbytes
from ..errors import RmoeFormatError


class LowRank:
    name = "lowrank"

    def encode(self, x: np.ndarray | None = None, value_dtype: str = "fp32", quant: AnyQuant | None = None,
               *, u: np.ndarray | None = None, v: np.ndarray | None = None, rank: int | None = None,
               **_) -> Encoded:
        """Encode given factors ``u``, ``v``, or truncate the SVD of ``x`` to ``rank``."""
        if u is None or v is None:
            if x is None or rank is None:
                raise ValueError("lowrank needs factors u, v or a matrix and a rank")
            u, v = svd_factors(x, rank)
        u = np.asarray(u, dtype=np.float32)
        v = np.asarray(v, dtype=np.float32)
        (m, r), (r2, n) = u.shape, v.shape
        if r != r2:
            raise ValueError(f"factor shapes {u.shape} and {v.shape} do not chain")
        parts = {}
        parts.update(store_values(u, value_dtype, quant, *dense_rows(m, r), part="u"))
        parts.update(store_values(v, value_dtype, quant, *dense_rows(r, n), part="v"))
        return Encoded(self.name, (m, n), value_dtype, parts, {"rank": r}, default_quant(value_dtype, quant))

    def check_layout(self, shape, value_dtype, quant, params, parts, names) -> None:
        m, n = shape
        r = params.get("rank")
        if not (_is_int(r) and 0 <= r <= min(m, n)):
            raise RmoeFormatError(f"lowrank: rank {r!r} must be an integer in [0, min(m, n)] for shape {[m, n]}")
        used = check_values(parts, names, value_dtype, quant, "u", (m, r), m)
        used |= check_values(parts, names, value_dtype, quant, "v", (r, n), r)
        check_no_extra(parts, names, used, self.name)

    def factors(self, enc: Encoded, names=None) -> tuple[np.ndarray, np.ndarray]:
        """The decoded float32 factors (U, V) of a lowrank record (a runtime multiplies by them)."""
        m, n = enc.shape
        r = enc.params["rank"]
        u = load_part(enc.parts, enc.value_dtype, enc.quant, "u", m * r, (m, r), dense_rows(m, r)[1], names)
        v = load_part(enc.parts, enc.value_dtype, enc.quant, "v", r * n, (r, n), dense_rows(r, n)[1], names)
        return u, v

    def decode(self, enc: Encoded, names) -> np.ndarray:
        u, v = self.factors(enc, names)
        return (u.astype(np.float64) @ v.astype(np.float64)).astype(np.float32)

    def predict_nbytes(self, shape, value_dtype, quant, rank: int = 0, **_) -> int:
        m, n = shape
        return values_nbytes(value_dtype, quant, m, m * rank) + values_nbytes(value_dtype, quant, rank, rank * n)


def split_svd(u, s, vh, rank: int):
    """The factors of an SVD ``u @ diag(s) @ vh`` truncated to ``rank`` (clamped to [0, len(s)]), with
    sqrt(sigma) on both sides. Works on numpy arrays and torch tensors alike (the converter's
    :func:`converters.encoders.compress.svd_factors` runs it on torch's SVD)."""
    rank = max(0, min(rank, s.shape[0]))
    root = s[:rank] ** 0.5
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def svd_factors(x: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncated SVD ``x ~= u @ v`` with sqrt(sigma) split between the factors (float64 maths)."""
    u, v = split_svd(*np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False), rank)
    return u.astype(np.float32), v.astype(np.float32)
