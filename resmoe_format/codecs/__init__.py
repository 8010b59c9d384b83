"""Encodings of a residual (or base) matrix: registry, encode/decode, and ``auto``.

Use :func:`encode` with an encoding name, or :func:`encode_auto` to store each matrix in
whichever encoding is smallest for its actual mask and values.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..errors import RmoeFormatError
from . import kquant
from .base import PART_CATEGORY, AnyQuant, Encoded, Quant, default_quant, part_category
from .bitmap import Bitmap
from .bsr import Bsr, block_occupancy
from .csr16 import Csr16
from .dense import Dense
from .fields import Fields
from .kquant import KqLayout
from .lowrank import LowRank, svd_factors
from . import rice
from .rice import Rice, gaps_of
from .sparse_common import keep_mask

CODECS = {c.name: c for c in (Dense(), LowRank(), Csr16(), Bitmap(), Bsr(), Rice(), Fields())}
ENCODINGS = tuple(CODECS)
#: Block shapes ``auto`` tries for bsr.
AUTO_BSR_BLOCKS = ((4, 4), (8, 8), (16, 16), (32, 32))
#: Tie-break order for ``auto`` (earlier wins at equal size).
AUTO_ORDER = ("dense", "bitmap", "csr16", "rice", "bsr")

__all__ = ["CODECS", "ENCODINGS", "Encoded", "Quant", "KqLayout", "AnyQuant", "PART_CATEGORY", "part_category",
           "kquant", "encode", "encode_auto", "decode", "check_layout", "predict_sizes", "keep_mask", "svd_factors"]


def codec(name: str):
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise RmoeFormatError(f"unknown encoding {name!r}; known: {', '.join(ENCODINGS)}") from None


def _as2d(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        return x.reshape(1, -1)
    if x.ndim != 2:
        raise ValueError(f"codecs take 1-D or 2-D matrices, got shape {x.shape}")
    return x


def encode(x: np.ndarray | None, encoding: str, value_dtype: str = "bf16", quant: AnyQuant | None = None,
           **params: Any) -> Encoded:
    """Encode matrix ``x`` (1-D is taken as one row) in ``encoding``.

    Sparse encodings store the entries of ``mask`` (default: every entry that is not +0.0).
    ``lowrank`` takes factors ``u=``, ``v=`` or a ``rank=`` to truncate ``x`` to. ``quant`` is a
    :class:`Quant` for int8 values (default per_row fp32) and a :class:`KqLayout` for the k-quant
    value dtypes ``q2`` … ``q8``, ``ternary`` (default ``KqLayout()``); float values take none.
    """
    quant = default_quant(value_dtype, quant)
    if encoding == "auto":
        return encode_auto(x, value_dtype, quant, **params)
    if x is not None:
        x = _as2d(x)
        if "mask" in params and params["mask"] is not None:
            params["mask"] = np.asarray(params["mask"], dtype=bool).reshape(x.shape)
    return codec(encoding).encode(x, value_dtype, quant, **params)


def decode(enc: Encoded, names: Mapping[str, str] | None = None, predictor: np.ndarray | None = None) -> np.ndarray:
    """The float32 (m, n) matrix an encoded record stands for; checks index contents. ``predictor``: the
    layer's base matrix, for a ``fields`` record coded against it (spec 5.11); other encodings ignore it."""
    if enc.encoding == "fields":
        return CODECS["fields"].decode(enc, names or {}, predictor)
    return codec(enc.encoding).decode(enc, names or {})


def check_layout(encoding: str, shape, value_dtype: str, quant: AnyQuant | None, params: Mapping[str, Any],
                 parts: Mapping[str, tuple[str, tuple[int, ...]]], names: Mapping[str, str]) -> None:
    """Check part dtypes and shapes against the schema, without reading any data."""
    codec(encoding).check_layout(tuple(shape), value_dtype, quant, dict(params), parts, names)


def predict_sizes(x: np.ndarray, value_dtype: str, quant: AnyQuant | None = None, mask: np.ndarray | None = None,
                  block_shapes=AUTO_BSR_BLOCKS) -> dict[str, tuple[int, dict]]:
    """Exact stored bytes of ``x`` in each element-wise encoding: {label: (bytes, params)}."""
    x = _as2d(x)
    mask = keep_mask(x) if mask is None else np.asarray(mask, dtype=bool).reshape(x.shape)
    nnz = int(mask.sum())
    out = {
        "dense": (CODECS["dense"].predict_nbytes(x.shape, value_dtype, quant), {}),
        "bitmap": (CODECS["bitmap"].predict_nbytes(x.shape, value_dtype, quant, nnz=nnz), {}),
        "csr16": (CODECS["csr16"].predict_nbytes(x.shape, value_dtype, quant, nnz=nnz), {}),
    }
    gaps = gaps_of(mask.reshape(-1))
    k = rice.best_k(gaps)
    out["rice"] = (CODECS["rice"].predict_nbytes(x.shape, value_dtype, quant, nnz=nnz, gaps=gaps, k=k), {"k": k})
    for bs in block_shapes:
        nnzb = int(block_occupancy(mask, bs).sum())
        out[f"bsr{bs[0]}x{bs[1]}"] = (CODECS["bsr"].predict_nbytes(x.shape, value_dtype, quant, nnzb=nnzb,
                                                                     block_shape=bs), {"block_shape": list(bs)})
    return out


def encode_auto(x: np.ndarray | None, value_dtype: str = "bf16", quant: AnyQuant | None = None, *,
                mask: np.ndarray | None = None, u: np.ndarray | None = None, v: np.ndarray | None = None,
                block_shapes=AUTO_BSR_BLOCKS, **_: Any) -> Encoded:
    """Store in the smallest encoding: low-rank factors stay low rank unless dense is smaller;
    a matrix goes to whichever of dense, bitmap, csr16, rice, bsr is smallest for its mask."""
    if u is not None and v is not None:
        m, n = np.shape(u)[0], np.shape(v)[1]
        r = np.shape(u)[1]
        lr = CODECS["lowrank"].predict_nbytes((m, n), value_dtype, quant, rank=r)
        if lr <= CODECS["dense"].predict_nbytes((m, n), value_dtype, quant):
            return CODECS["lowrank"].encode(None, value_dtype, quant, u=u, v=v)
        x = np.asarray(u, np.float32).astype(np.float64) @ np.asarray(v, np.float32).astype(np.float64)
        return CODECS["dense"].encode(x.astype(np.float32), value_dtype, quant)
    x = _as2d(x)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool).reshape(x.shape)
    sizes = predict_sizes(x, value_dtype, quant, mask, block_shapes)
    rank = {name: i for i, name in enumerate(AUTO_ORDER)}

    def encoding_of(label: str) -> str:
        return "bsr" if label.startswith("bsr") else label

    # ties: AUTO_ORDER first, then (for bsr) the smaller block, in AUTO_BSR_BLOCKS order
    order = {label: i for i, label in enumerate(sizes)}
    label = min(sizes, key=lambda k: (sizes[k][0], rank[encoding_of(k)], order[k]))
    name = encoding_of(label)
    return CODECS[name].encode(x, value_dtype, quant, mask=mask, **sizes[label][1])
