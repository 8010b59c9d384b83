"""``rice``: the kept positions as Golomb-Rice coded gaps, plus values in row-major order.

The positions p_0 < p_1 < ... of kept entries in the row-major flattened matrix are
stored as gaps g_i = p_i - p_{i-1} - 1 (p_{-1} = -1), each split by the parameter k into
a quotient q_i = g_i >> k and a remainder r_i = g_i & (2^k - 1). Two bit streams, both
little-endian bit order within a byte and zero-padded to a whole byte:

* ``quotients``: for each gap in order, q_i zero bits then a one bit (unary);
* ``remainders``: r_i in exactly k bits each, least significant bit first.

Keeping the two streams apart makes decoding fully vectorised. For the random-looking
masks of magnitude-pruned residuals, gaps are geometric and this code comes within a few
percent of the mask's entropy at every density (bitmap wastes bits below 1/2, csr16
spends 16 bits per kept entry).
"""
from __future__ import annotations

import numpy as np

from .base import AnyQuant, Encoded, _is_int, check_no_extra, check_part, default_quant, fail, stored_count
from .kquant import is_kquant
from .sparse_common import keep_mask, packed_values_count
from .values import load_part, packed_rows, store_values, values_nbytes
from ..errors import RmoeFormatError

MAX_K = 40


def gaps_of(mask_flat: np.ndarray) -> np.ndarray:
    pos = np.flatnonzero(mask_flat)
    return np.diff(pos, prepend=-1) - 1


def stream_bits(gaps: np.ndarray, k: int) -> tuple[int, int]:
    """(quotient bits, remainder bits) for these gaps at parameter k."""
    return int((gaps >> k).sum()) + gaps.size, gaps.size * k


def best_k(gaps: np.ndarray) -> int:
    """The k in [0, MAX_K] that minimises the stored bytes (smallest k on ties)."""
    if gaps.size == 0:
        return 0
    hi = max(1, int(gaps.max()).bit_length())
    cost = [(-(-stream_bits(gaps, k)[0] // 8) - (-stream_bits(gaps, k)[1] // 8), k) for k in range(min(hi, MAX_K) + 1)]
    return min(cost)[1]


class Rice:
    name = "rice"

    def encode(self, x: np.ndarray, value_dtype: str, quant: AnyQuant | None = None,
               mask: np.ndarray | None = None, k: int | None = None, **_) -> Encoded:
        m, n = x.shape
        mask = keep_mask(x) if mask is None else np.asarray(mask, dtype=bool)
        gaps = gaps_of(mask.reshape(-1)).astype(np.int64)
        k = best_k(gaps) if k is None else int(k)
        q = gaps >> k
        ones = np.cumsum(q + 1) - 1  # position of each terminating one bit
        qbits = np.zeros(int(ones[-1]) + 1 if ones.size else 0, dtype=bool)
        qbits[ones] = True
        rem = (gaps & ((1 << k) - 1)) if k else np.zeros(0, np.int64)
        rbits = ((rem[:, None] >> np.arange(k)) & 1).astype(bool).reshape(-1) if k else np.zeros(0, bool)
        parts = {"quotients": np.packbits(qbits, bitorder="little"),
                 "remainders": np.packbits(rbits, bitorder="little")}
        parts.update(store_values(x[mask].astype(np.float32), value_dtype, quant, *packed_rows(mask.sum(axis=1))))
        params = {"k": k, "nnz": gaps.size} if is_kquant(value_dtype) else {"k": k}
        return Encoded(self.name, (m, n), value_dtype, parts, params, default_quant(value_dtype, quant))

    def check_layout(self, shape, value_dtype, quant, params, parts, names) -> None:
        m, n = shape
        k = params.get("k")
        if not (_is_int(k) and 0 <= k <= MAX_K):
            raise RmoeFormatError(f"rice: k must be an integer in [0, {MAX_K}], got {k!r}")
        nnz, used = packed_values_count(parts, names, shape, value_dtype, quant, params, self.name)
        check_part(parts, names, "remainders", (-(-nnz * k // 8),), ("u8",))
        if "quotients" not in parts or len(parts["quotients"][1]) != 1:
            raise RmoeFormatError(f"rice: 1-D quotients tensor missing ({names.get('quotients')})")
        qbytes = parts["quotients"][1][0]
        # nnz one bits at least, and no more bits than gaps summing to < m*n can need
        if qbytes < -(-nnz // 8) or qbytes > -(-(nnz + (m * n >> k)) // 8):
            raise fail(names.get("quotients", "quotients"), f"{qbytes} bytes cannot hold {nnz} gaps of a "
                                                            f"{m}x{n} matrix at k={k}")
        check_part(parts, names, "quotients", (qbytes,), ("u8",))
        check_no_extra(parts, names, used | {"quotients", "remainders"}, self.name)

    def decode(self, enc: Encoded, names) -> np.ndarray:
        m, n = enc.shape
        k = enc.params["k"]
        nnz = stored_count(enc)
        qname = names.get("quotients", "quotients")
        qbits = np.unpackbits(np.asarray(enc.parts["quotients"]), bitorder="little")
        ones = np.flatnonzero(qbits)
        if ones.size != nnz:
            raise fail(qname, f"{ones.size} gaps coded but {nnz} values stored")
        if nnz and qbits.size - ones[-1] > 8:
            raise fail(qname, "stream longer than its gaps need")
        if nnz == 0 and qbits.size:
            raise fail(qname, "gaps coded for an empty matrix")
        q = np.diff(ones, prepend=-1) - 1
        if nnz and q.max() > (m * n) >> k:
            raise fail(qname, "a gap is longer than the matrix")
        rbits = np.unpackbits(np.asarray(enc.parts["remainders"]), bitorder="little")
        if rbits[nnz * k:].any():
            raise fail(names.get("remainders", "remainders"), "padding bits are not zero")
        rem = (rbits[: nnz * k].reshape(nnz, k).astype(np.int64) << np.arange(k)).sum(axis=1) if k else 0
        gaps = (q << k) + rem
        if nnz and gaps.max() >= m * n:
            raise fail(qname, "a gap is longer than the matrix")
        pos = np.cumsum(gaps + 1) - 1
        if nnz and (pos[-1] >= m * n or pos[0] < 0 or (np.diff(pos) <= 0).any()):
            raise fail(qname, f"positions run beyond the {m}x{n} matrix")
        rows = np.bincount(pos // max(n, 1), minlength=m) if nnz else np.zeros(m, np.int64)
        out = np.zeros(m * n, dtype=np.float32)
        out[pos] = load_part(enc.parts, enc.value_dtype, enc.quant, "values", nnz, (nnz,), packed_rows(rows)[1], names)
        return out.reshape(m, n)

    def predict_nbytes(self, shape, value_dtype, quant, nnz: int = 0, gaps: np.ndarray | None = None,
                       k: int | None = None, **_) -> int:
        m, _ = shape
        gaps = np.zeros(0, np.int64) if gaps is None else gaps
        k = best_k(gaps) if k is None else k
        qb, rb = stream_bits(gaps, k)
        return -(-qb // 8) + -(-rb // 8) + values_nbytes(value_dtype, quant, m, nnz)

