"""``bsr``: block sparse rows. The matrix is tiled by R x C blocks (edge blocks padded
with zeros); every block holding a kept entry is stored whole. ``indptr`` (block rows + 1)
and ``indices`` (block column of each stored block) are as in scipy's BSR."""
from __future__ import annotations

import numpy as np

from .base import AnyQuant, Encoded, _is_int, check_no_extra, check_part, check_values, default_quant, fail
from .kquant import is_kquant
from .sparse_common import check_pointers, check_sorted_within, keep_mask, pointer_dtype
from .values import load_part, store_values, values_nbytes
from .. import dtypes
from ..errors import RmoeFormatError

DEFAULT_BLOCK = (16, 16)


def grid(shape, block) -> tuple[int, int]:
    (m, n), (r, c) = shape, block
    return -(-m // r), -(-n // c)


def block_occupancy(mask: np.ndarray, block) -> np.ndarray:
    """(block rows, block cols) bool: which blocks hold a kept entry."""
    m, n = mask.shape
    r, c = block
    mb, nb = grid((m, n), block)
    pad = np.zeros((mb * r, nb * c), dtype=bool)
    pad[:m, :n] = mask
    return pad.reshape(mb, r, nb, c).any(axis=(1, 3))


class Bsr:
    name = "bsr"

    def encode(self, x: np.ndarray, value_dtype: str, quant: AnyQuant | None = None,
               mask: np.ndarray | None = None, block_shape=DEFAULT_BLOCK, **_) -> Encoded:
        m, n = x.shape
        r, c = (int(b) for b in block_shape)
        if r < 1 or c < 1:
            raise ValueError("bsr block shape must be positive")
        mask = keep_mask(x) if mask is None else mask
        mb, nb = grid((m, n), (r, c))
        occ = block_occupancy(mask, (r, c))
        br, bc = np.nonzero(occ)
        pad = np.zeros((mb * r, nb * c), dtype=np.float32)
        pad[:m, :n] = np.where(mask, x, np.float32(0))
        blocks = pad.reshape(mb, r, nb, c).transpose(0, 2, 1, 3)[br, bc]
        ptr = np.concatenate([[0], np.cumsum(occ.sum(axis=1))])
        parts = {"indptr": ptr.astype(dtypes.by_name(pointer_dtype(br.size)).np),
                 "indices": bc.astype(dtypes.by_name(_col_dtype(nb)).np)}
        parts.update(store_values(blocks, value_dtype, quant, *_rows(br, mb, r, c)))
        return Encoded(self.name, (m, n), value_dtype, parts, {"block_shape": [r, c]},
                       default_quant(value_dtype, quant))

    def check_layout(self, shape, value_dtype, quant, params, parts, names) -> None:
        m, n = shape
        bs = params.get("block_shape")
        if not (isinstance(bs, list) and len(bs) == 2 and all(_is_int(b) and 1 <= b <= 65536 for b in bs)):
            raise RmoeFormatError(f"bsr: block_shape must be two integers in [1, 65536], got {bs!r}")
        r, c = bs
        mb, nb = grid((m, n), (r, c))
        if is_kquant(value_dtype):  # packed k-quant codes do not give nnzb: the indices do
            if "indices" not in parts or len(parts["indices"][1]) != 1:
                raise RmoeFormatError(f"bsr: 1-D indices tensor missing ({names.get('indices')})")
            nnzb, counted = parts["indices"][1][0], "indices"
        else:
            if "values" not in parts or len(parts["values"][1]) != 3:
                raise RmoeFormatError(f"bsr: values must be (blocks, R, C) ({names.get('values')})")
            nnzb, counted = parts["values"][1][0], "values"
        if nnzb > mb * nb:
            raise fail(names.get(counted, counted), f"{nnzb} blocks but the grid has {mb * nb}")
        used = check_values(parts, names, value_dtype, quant, "values", (nnzb, r, c), mb * r)
        check_part(parts, names, "indices", (nnzb,), ("u16", "u32"))
        check_part(parts, names, "indptr", (mb + 1,), ("u32", "u64"))
        check_no_extra(parts, names, used | {"indices", "indptr"}, self.name)

    def decode(self, enc: Encoded, names) -> np.ndarray:
        m, n = enc.shape
        r, c = enc.params["block_shape"]
        mb, nb = grid((m, n), (r, c))
        nnzb = enc.parts["indices"].size
        ptr = check_pointers(enc.parts["indptr"], nnzb, names.get("indptr", "indptr"))
        counts = np.diff(ptr)
        bc = np.asarray(enc.parts["indices"]).astype(np.int64)
        check_sorted_within(bc, counts, nb, names.get("indices", "indices"))
        br = np.repeat(np.arange(mb), counts)
        blocks = load_part(enc.parts, enc.value_dtype, enc.quant, "values", nnzb * r * c, (nnzb, r, c),
                           _rows(br, mb, r, c)[1], names)
        pad = np.zeros((mb, nb, r, c), dtype=np.float32)
        pad[br, bc] = blocks
        return np.ascontiguousarray(pad.transpose(0, 2, 1, 3).reshape(mb * r, nb * c)[:m, :n])

    def predict_nbytes(self, shape, value_dtype, quant, nnzb: int = 0, block_shape=DEFAULT_BLOCK, **_) -> int:
        r, c = block_shape
        mb, nb = grid(shape, (r, c))
        return (values_nbytes(value_dtype, quant, mb * r, nnzb * r * c) + nnzb * dtypes.by_name(_col_dtype(nb)).itemsize
                + (mb + 1) * dtypes.by_name(pointer_dtype(nnzb)).itemsize)


def _col_dtype(nb: int) -> str:
    return "u16" if nb <= 65536 else "u32"


def _rows(br: np.ndarray, mb: int, r: int, c: int):
    """Row layout of bsr values (blocks, R, C): element (b, i, j) lies in row br[b]*R + i."""
    def absmax(a: np.ndarray) -> np.ndarray:
        out = np.zeros((mb, r), dtype=np.float32)
        if a.size:
            np.maximum.at(out, br, a.reshape(-1, r, c).max(axis=2))
        return out.reshape(-1)

    def expand(s: np.ndarray) -> np.ndarray:
        return np.repeat(s.astype(np.float32).reshape(mb, r)[br].reshape(-1), c)

    return absmax, expand
