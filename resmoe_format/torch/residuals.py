"""Residuals as torch operators that never build a dense expert (the ``fused`` mode).

A residual D (n, H) of an input matrix contributes ``x @ D.T`` to the pre-activations; the
residual of the output matrix contributes ``h @ D``. Each record keeps the shape its encoding
is cheapest to multiply in:

- ``lowrank`` U (n, r), V (r, H): ``x @ V.T @ U.T`` and ``h @ U @ V``; a U shared by an
  expert's records (format 2.0) is one tensor in memory.
- sparse encodings (csr16, bitmap, bsr, rice): on the CPU, the compiled kernels' bitmap (16-column words) or
  CSR (uint16 columns), whichever is smaller, values bf16 when stored so, else float32 (:mod:`.native`); a torch
  CSR with int32 indices and float32 values elsewhere or without a C compiler. Stored as D for inputs and as
  D.T for the output so both products are rows of D times x.
- ``dense``: the matrix itself.

Element-wise records (sparse of non-bf16 values, dense) are multiplied by the restored weights exactly, the final
rounding to the source dtype included (spec 6.7): :func:`rounded_residual` replaces D by
D' = round_T(B + D) - B' on D's stored entries, where B' = round_T(B) is the barycenter the
layer holds. A low-rank record is a dense matrix U V: rounding B + U V would mean building it,
so ``lowrank`` records are multiplied by B + U V, the restored weight before its final rounding. Sparse records
of bf16 values are held as stored (2 bytes a value: D' would need float32) and, like low-rank ones, multiplied by
B + D.

Records with k-quant values (spec 5.10) stay packed (:class:`PackedValues`: about bits/8 bytes per
value). On the CPU, products with a few tokens decode them weight by weight inside the compiled kernels
(:func:`.native.kq_matmul`, rows of whole 64-value groups); otherwise they are dequantized on the device
at each product. Like low-rank ones they are multiplied
by B + D, the restored weight before its final rounding. Sparse k-quant records keep a CSR
structure of int32 indices beside their packed values; where the encoding does not store its
values in row-major order (bsr, csr16 over 65536 columns) they are held as a float32 CSR instead.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import codecs
from ..codecs import Encoded, kquant
from ..codecs.base import stored_count
from ..codecs.csr16 import n_col_blocks
from ..container import Reader
from ..restore import combine
from ..schema import EncodedRef, LayerSpec
from . import native
from .kquant import PackedValues

SPARSE_ENCODINGS = frozenset({"csr16", "bitmap", "bsr", "rice"})


def as_tensor(x) -> torch.Tensor:
    """The tensor ``x`` stands for (``x`` itself, or dequantized from its packed bytes)."""
    return x if isinstance(x, torch.Tensor) else x.tensor()


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """``x @ W.T`` for W a tensor, :class:`PackedValues` (the compiled k-quant kernels for a few tokens) or
    :class:`StackedRows` (one product per piece)."""
    if isinstance(w, torch.Tensor):
        return torch.nn.functional.linear(x, w)
    if isinstance(w, StackedRows):
        return torch.cat([linear(x, p) for p in w.pieces], dim=1)
    return w.linear(x)


def rlinear(h: torch.Tensor, w) -> torch.Tensor:
    """``h @ W`` for W a tensor or :class:`PackedValues`."""
    return h @ w if isinstance(w, torch.Tensor) else w.rlinear(h)


def held_nbytes(x) -> int:
    """Bytes ``x`` holds in memory (packed bytes for packed values)."""
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else x.nbytes()


class StackedRows:
    """Matrices concatenated along their first axis, some of them packed: built on use."""

    def __init__(self, pieces: list):
        self.pieces = pieces

    def tensor(self) -> torch.Tensor:
        return torch.cat([as_tensor(p) for p in self.pieces])

    def nbytes(self) -> int:
        return sum(held_nbytes(p) for p in self.pieces)


def unrounded(ref: EncodedRef) -> bool:
    """Whether fused multiplies by B + D before its rounding to the source dtype: low-rank records, records with
    k-quant values and sparse records of bf16 values, held as stored (spec 6.7)."""
    return ref.encoding == "lowrank" or kquant.is_kquant(ref.value_dtype) or stored_bf16(ref)


def stored_bf16(ref: EncodedRef) -> bool:
    """Whether a sparse record's values are held as its stored bf16 values (2 bytes each, no rounding step)."""
    return ref.encoding in SPARSE_ENCODINGS and ref.value_dtype == "bf16"


class Residual:
    """One decoded residual record ready to multiply."""

    def nbytes(self) -> int:
        raise NotImplementedError

    def apply_in(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ D.T`` for x (T, H): the record's contribution to pre-activations (T, n)."""
        raise NotImplementedError

    def apply_out(self, h: torch.Tensor) -> torch.Tensor:
        """``h @ D`` for h (T, n): the contribution to the output (T, H)."""
        raise NotImplementedError


class DenseResidual(Residual):
    """The matrix D itself, or its packed k-quant values."""

    def __init__(self, d: torch.Tensor | PackedValues):
        self.d = d

    def nbytes(self) -> int:
        return held_nbytes(self.d)

    def apply_in(self, x):
        return linear(x, self.d)

    def apply_out(self, h):
        return rlinear(h, self.d)


class LowRankResidual(Residual):
    """Factors U (n, r) and V (r, H), tensors or packed k-quant values; either may be shared with other records
    (``u_shared``, ``v_shared``: held, and counted, by an earlier record)."""

    def __init__(self, u: torch.Tensor | PackedValues, v: torch.Tensor | PackedValues, u_shared: bool,
                 v_shared: bool = False, v_shared_across: bool = False):
        self.u, self.v, self.u_shared, self.v_shared = u, v, u_shared, v_shared
        #: V is also other experts' V (a cross-expert factor): fused mode multiplies every token by it once
        self.v_shared_across = v_shared_across

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) as tensors."""
        return as_tensor(self.u), as_tensor(self.v)

    def nbytes(self) -> int:
        return (0 if self.u_shared else held_nbytes(self.u)) + (0 if self.v_shared else held_nbytes(self.v))

    def apply_in(self, x):
        return linear(linear(x, self.v), self.u)

    def apply_out(self, h):
        return rlinear(rlinear(h, self.u), self.v)


class SparseResidual(Residual):
    """A sparse D (inputs) or D.T (output): on the CPU the compiled kernels' bitmap or CSR with uint16 columns and
    values as stored (bf16 or float32, :mod:`.native`); elsewhere, or without a C compiler, a torch CSR with int32
    indices and float32 values (torch's CPU CSR kernels take no bf16/fp16)."""

    def __init__(self, csr: torch.Tensor | None = None, rows: native.SparseRows | None = None,
                 output_rows: bool = False):
        #: an output record held as D itself (its file bytes, :func:`.native.bitmap_record_rows`), not D.T
        self.csr, self.rows, self.output_rows = csr, rows, output_rows

    @classmethod
    def from_dense(cls, d: np.ndarray, device: torch.device, values: torch.dtype = torch.float32
                   ) -> "SparseResidual":
        """From D (float32, zero where nothing is stored); ``values``: the dtype the kernels hold the values in
        (bfloat16 only for values that are bfloat16 numbers)."""
        if torch.device(device).type == "cpu" and native.available():
            return cls(rows=native.pack_rows(d, values))
        import scipy.sparse

        c = scipy.sparse.csr_matrix(np.asarray(d, dtype=np.float32))
        idx = [torch.from_numpy(a.astype(np.int32, copy=False)) for a in (c.indptr, c.indices)]
        return cls(torch.sparse_csr_tensor(*idx, torch.from_numpy(c.data), size=c.shape, device=device))

    def parts(self) -> dict[str, torch.Tensor]:
        """The tensors held: ``values``, ``indices`` (columns or bitmap words), ``row_pointers``."""
        if self.rows is not None:
            return {"values": self.rows.values, "indices": self.rows.index, "row_pointers": self.rows.offsets}
        return {"values": self.csr.values(), "indices": self.csr.col_indices(),
                "row_pointers": self.csr.crow_indices()}

    def entries(self) -> int:
        """The number of stored entries."""
        return int(self.rows.offsets[-1]) if self.rows is not None else self.csr.values().numel()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return self.rows.matmul(x).to(x.dtype)
        return (self.csr @ x.T.to(self.csr.dtype)).T.to(x.dtype)

    apply_in = _mm

    def apply_out(self, h: torch.Tensor) -> torch.Tensor:
        return self.rows.rmatmul(h).to(h.dtype) if self.output_rows else self._mm(h)


class PackedSparseResidual(Residual):
    """A sparse record with k-quant values: the CSR structure (int32) of D (inputs) or D.T (output) and
    the packed values, dequantized into the CSR at each product. ``order``: the stored value of each CSR
    entry (None: the same order)."""

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, order: torch.Tensor | None, values: PackedValues,
                 size: tuple[int, int]):
        self.crow, self.col, self.order, self.values, self.size = crow, col, order, values, size

    @classmethod
    def from_record(cls, enc: Encoded, names, output: bool, device: torch.device) -> "PackedSparseResidual":
        """From a record whose values are stored in row-major order (:func:`row_major_values`)."""
        n = value_count(enc)
        values = PackedValues.from_parts(enc.parts, "values", (n,), enc.value_dtype, enc.quant, device, names)
        rows, cols = np.divmod(np.flatnonzero(codecs.decode(_ones(enc, n), names)), enc.shape[1])
        order = None
        size = enc.shape
        if output:  # CSR of D.T: entries by column of D
            order = np.lexsort((rows, cols))
            rows, cols = cols[order], rows[order]
            size = size[::-1]
        crow = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=size[0]))])
        idx = [torch.from_numpy(a.astype(np.int32)).to(device) for a in (crow, cols)]
        return cls(*idx, None if order is None else torch.from_numpy(order.astype(np.int32)).to(device), values, size)

    def nbytes(self) -> int:
        held = [self.crow, self.col] + ([self.order] if self.order is not None else [])
        return sum(t.numel() * t.element_size() for t in held) + self.values.nbytes()

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        v = self.values.tensor()
        if self.order is not None:
            v = v[self.order]
        csr = torch.sparse_csr_tensor(self.crow, self.col, v, size=self.size)
        return (csr @ x.T.to(v.dtype)).T.to(x.dtype)

    apply_in = _mm
    apply_out = _mm


def in_place(ref: EncodedRef, device: torch.device) -> bool:
    """Whether the kernels may multiply by the record's own mapped bytes (a bitmap of bf16 values on the CPU; its
    rows must also be whole 32-bit words: :func:`.native.bitmap_record_rows`)."""
    return ref.encoding == "bitmap" and stored_bf16(ref) and torch.device(device).type == "cpu" and native.available()


def held_values(refs: list[EncodedRef]) -> torch.dtype:
    """The dtype sparse records' values are held in: bf16 when all are stored as bf16, else float32."""
    return torch.bfloat16 if all(stored_bf16(r) for r in refs) else torch.float32


def value_count(enc: Encoded) -> int:
    """The number of stored values of a sparse record."""
    return int(enc.parts["indices"].size) if enc.encoding == "csr16" else stored_count(enc)


def row_major_values(enc: Encoded) -> bool:
    """Whether a sparse record stores its values in the row-major order of their positions."""
    return enc.encoding in ("bitmap", "rice") or (enc.encoding == "csr16" and n_col_blocks(enc.shape[1]) == 1)


def _ones(enc: Encoded, n: int) -> Encoded:
    """``enc`` with every stored k-quant value replaced by 1.0 (codes 0, a_g = 0, b_g = -1): decoded, it is
    the mask of the stored entries."""
    layout = enc.quant
    g = layout.n_groups(n)
    grid = kquant.KqGrid(np.zeros(g, np.uint8), np.ones(g, np.uint8),
                         np.tile(np.array([[0, -1]], np.float16), (layout.n_super(n), 1)))
    parts = dict(enc.parts) | kquant.parts_of(np.zeros(n, np.uint8), grid, enc.value_dtype, layout)
    return Encoded(enc.encoding, enc.shape, enc.value_dtype, parts, enc.params, layout)


def rounded_residual(d: np.ndarray, base: np.ndarray | None, held: np.ndarray | None, dtype: str) -> np.ndarray:
    """D' (float32) with ``held + D'`` equal to the restored weight round_T(base + d) (spec 6.1) on
    ``d``'s non-zero entries and 0 elsewhere; ``held`` is the barycenter the runtime multiplies by
    (round_T(base) for element-wise records), ``base`` the decoded one (None: no base)."""
    nz = np.nonzero(d)
    w = combine(None if base is None else base[nz], d[nz], dtype).astype(np.float32)
    out = np.zeros(d.shape, np.float32)
    out[nz] = w if held is None else w - held[nz]
    return out


def load_residual(reader: Reader, lay: LayerSpec, ref: EncodedRef, matrix: str, output: bool,
                  dtype: torch.dtype, device: torch.device, shared: dict[str, object],
                  base: np.ndarray | None = None, held: np.ndarray | None = None) -> Residual:
    """Decode one residual record into the operator its encoding multiplies fastest with; k-quant values
    stay packed; other element-wise records as :func:`rounded_residual` of ``base`` (decoded) and ``held``
    (the barycenter multiplied by). ``shared`` maps a low-rank factor tensor's name to what holds it."""
    spec = lay.matrix(matrix)
    enc = reader.encoded(ref, spec)
    kq = kquant.is_kquant(ref.value_dtype)
    if ref.encoding == "lowrank":
        ukey, vkey = ref.tensors["u"], ref.tensors["v"]
        (m, n), r = enc.shape, ref.params["rank"]
        u, v = shared.get(ukey), shared.get(vkey)
        if kq:
            if u is None:
                u = PackedValues.from_parts(enc.parts, "u", (m, r), ref.value_dtype, ref.quant, device, ref.tensors,
                                            dtype)
            if v is None:
                v = PackedValues.from_parts(enc.parts, "v", (r, n), ref.value_dtype, ref.quant, device, ref.tensors,
                                            dtype)
        elif u is None or v is None:
            u_np, v_np = codecs.CODECS["lowrank"].factors(enc, ref.tensors)
            u = torch.from_numpy(u_np).to(device=device, dtype=dtype) if u is None else u
            v = torch.from_numpy(v_np).to(device=device, dtype=dtype) if v is None else v
        shared[ukey], shared[vkey] = u, v
        across = sum(r is not None and r.encoding == "lowrank" and r.tensors.get("v") == vkey
                     for res in lay.residuals for r in res.values()) > 1
        return LowRankResidual(u, v, not_first(lay, ref, "u"), not_first(lay, ref, "v"), across)
    if kq and ref.encoding == "dense":
        return DenseResidual(PackedValues.from_parts(enc.parts, "values", enc.shape, ref.value_dtype, ref.quant,
                                                     device, ref.tensors, dtype))
    if kq and row_major_values(enc):
        return PackedSparseResidual.from_record(enc, ref.tensors, output, device)
    if in_place(ref, device):
        rows = native.bitmap_record_rows(enc.parts["mask"], enc.parts["values"], "bf16", enc.shape)
        if rows is not None:
            return SparseResidual(rows=rows, output_rows=output)
    d = reader.decode(lay.index, ref, matrix)
    if not kq and not stored_bf16(ref):
        d = rounded_residual(d, base, held, spec.dtype)
    if ref.encoding in SPARSE_ENCODINGS:
        return SparseResidual.from_dense(d.T if output else d, device, held_values([ref]))
    return DenseResidual(torch.from_numpy(d).to(device=device, dtype=dtype))


def not_first(lay: LayerSpec, ref: EncodedRef, part: str) -> bool:
    """Whether ``ref``'s factor ``part`` (u or v) is also an earlier record's (held and counted once, on the
    first record that names it)."""
    key = ref.tensors[part]
    for expert in lay.residuals:
        for r in expert.values():
            if r is not None and r.encoding == "lowrank" and r.tensors.get(part) == key:
                return r is not ref
    return False
