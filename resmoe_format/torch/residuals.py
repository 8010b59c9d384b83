"""Residuals as torch operators that never build a dense expert (the ``fused`` mode).

A residual D (n, H) of an input matrix contributes ``x @ D.T`` to the pre-activations; the
residual of the output matrix contributes ``h @ D``. Each record keeps the shape its encoding
is cheapest to multiply in:

- ``lowrank`` U (n, r), V (r, H): ``x @ V.T @ U.T`` and ``h @ U @ V``; a U shared by an
  expert's records (format 2.0) is one tensor in memory.
- sparse encodings (csr16, bitmap, bsr, rice): a torch CSR matrix with int32 indices, stored
  as D for inputs and as D.T for the output so both products are CSR @ dense.
- ``dense``: the matrix itself.

Element-wise records (sparse, dense) are multiplied by the restored weights exactly, the final
rounding to the source dtype included (spec 6.7): :func:`rounded_residual` replaces D by
D' = round_T(B + D) - B' on D's stored entries, where B' = round_T(B) is the barycenter the
layer holds. A low-rank record is a dense matrix U V: rounding B + U V would mean building it,
so ``lowrank`` records are multiplied by B + U V, the restored weight before its final rounding.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import codecs
from ..container import Reader
from ..restore import combine
from ..schema import EncodedRef, LayerSpec

SPARSE_ENCODINGS = frozenset({"csr16", "bitmap", "bsr", "rice"})


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
    def __init__(self, d: torch.Tensor):
        self.d = d

    def nbytes(self) -> int:
        return self.d.numel() * self.d.element_size()

    def apply_in(self, x):
        return torch.nn.functional.linear(x, self.d)

    def apply_out(self, h):
        return h @ self.d


class LowRankResidual(Residual):
    def __init__(self, u: torch.Tensor, v: torch.Tensor, u_shared: bool):
        self.u, self.v, self.u_shared = u, v, u_shared

    def nbytes(self) -> int:
        u = 0 if self.u_shared else self.u.numel() * self.u.element_size()
        return u + self.v.numel() * self.v.element_size()

    def apply_in(self, x):
        return (x @ self.v.T) @ self.u.T

    def apply_out(self, h):
        return (h @ self.u) @ self.v


class SparseResidual(Residual):
    """CSR with int32 indices; values float32 (torch's CPU CSR kernels take no bf16/fp16)."""

    def __init__(self, csr: torch.Tensor):
        self.csr = csr

    @classmethod
    def from_dense(cls, d: np.ndarray, device: torch.device) -> "SparseResidual":
        import scipy.sparse

        c = scipy.sparse.csr_matrix(np.asarray(d, dtype=np.float32))
        idx = [torch.from_numpy(a.astype(np.int32, copy=False)) for a in (c.indptr, c.indices)]
        return cls(torch.sparse_csr_tensor(*idx, torch.from_numpy(c.data), size=c.shape, device=device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.csr.crow_indices(), self.csr.col_indices(),
                                                          self.csr.values()))

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return (self.csr @ x.T.to(self.csr.dtype)).T.to(x.dtype)

    apply_in = _mm
    apply_out = _mm


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
                  dtype: torch.dtype, device: torch.device, shared: dict[str, torch.Tensor],
                  base: np.ndarray | None = None, held: np.ndarray | None = None) -> Residual:
    """Decode one residual record into the operator its encoding multiplies fastest with; element-wise
    records as :func:`rounded_residual` of ``base`` (decoded) and ``held`` (the barycenter multiplied by)."""
    spec = lay.matrix(matrix)
    enc = reader.encoded(ref, spec)
    if ref.encoding == "lowrank":
        u_np, v_np = codecs.CODECS["lowrank"].factors(enc)
        key = ref.tensors["u"]
        u = shared.get(key)
        if u is None:
            u = shared[key] = torch.from_numpy(u_np).to(device=device, dtype=dtype)
        return LowRankResidual(u, torch.from_numpy(v_np).to(device=device, dtype=dtype), shared_u(lay, ref))
    d = rounded_residual(codecs.decode(enc, ref.tensors), base, held, spec.dtype)
    if ref.encoding in SPARSE_ENCODINGS:
        return SparseResidual.from_dense(d.T if output else d, device)
    return DenseResidual(torch.from_numpy(d).to(device=device, dtype=dtype))


def shared_u(lay: LayerSpec, ref: EncodedRef) -> bool:
    """Whether ``ref``'s U is also another record's U (counted once, on the first record)."""
    key = ref.tensors["u"]
    for expert in lay.residuals:
        for r in expert.values():
            if r is not None and r.encoding == "lowrank" and r.tensors.get("u") == key:
                return r is not ref
    return False
