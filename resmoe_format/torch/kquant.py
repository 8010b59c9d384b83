"""k-quant value parts (value dtypes ``q2`` … ``q8``, ``ternary``; spec 5.10) dequantized in torch.

:func:`dequantize` turns the three stored parts of a value part (packed codes, group scale and
offset codes, float16 super-block scales) into float32 values bit for bit as
:func:`resmoe_format.codecs.kquant.dequantize` does: per value two binary32 operations,
``v = (q * a_g) - b_g``, each rounded (two separate tensor operations, never a fused multiply-add).
The same code runs on the CPU and on CUDA.

:class:`PackedValues` holds one value part on a device as its stored codes and scales (about
bits/8 bytes per value) and dequantizes it when asked: the fused runtime multiplies by k-quant
records this way.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..codecs import kquant
from ..codecs.kquant import KQ_BITS, KqLayout
from ..errors import RmoeFormatError
from . import native
from .tensors import to_torch

TERNARY_DIGITS = 5


def unpack_bits(stream: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` ``bits``-bit codes (1 … 8 bits) of an LSB-first uint8 stream, as uint8 (n,)."""
    stream = stream.reshape(-1)
    if bits == 8:
        return stream[:n]
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # whole codes per byte
        out = torch.empty(stream.numel(), 8 // bits, dtype=torch.uint8, device=stream.device)
        for j in range(8 // bits):
            out[:, j] = (stream >> (j * bits)) & mask
        return out.view(-1)[:n]
    # eight codes fill exactly ``bits`` bytes: decode each of the eight positions of every chunk
    chunks = -(-stream.numel() // bits)
    s = F.pad(stream, (0, chunks * bits - stream.numel())).view(chunks, bits)
    out = torch.empty(chunks, 8, dtype=torch.uint8, device=stream.device)
    for j in range(8):
        byte, shift = divmod(j * bits, 8)
        c = s[:, byte] >> shift
        if shift + bits > 8:
            c = c | (s[:, byte + 1] << (8 - shift))  # uint8 arithmetic: the bits shifted out are dropped
        out[:, j] = c & mask
    return out.view(-1)[:n]


#: byte -> its five base-3 digits, least significant first (bytes above 242 never reach it: checked on load)
_TERNARY = np.array([[b // 3 ** j % 3 for j in range(TERNARY_DIGITS)] for b in range(256)], dtype=np.uint8)
_ternary_tables: dict[torch.device, torch.Tensor] = {}


def unpack_ternary(stream: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` base-3 digits of bytes q0 + 3q1 + 9q2 + 27q3 + 81q4, as uint8 (n,)."""
    table = _ternary_tables.get(stream.device)
    if table is None:
        table = _ternary_tables[stream.device] = torch.from_numpy(_TERNARY).to(stream.device)
    return table.index_select(0, stream.reshape(-1).int()).view(-1)[:n]


def unpack_codes(stream: torch.Tensor, value_dtype: str, n: int) -> torch.Tensor:
    """The ``n`` codes of a packed code stream of ``value_dtype``, as uint8 (n,)."""
    if value_dtype == "ternary":
        return unpack_ternary(stream, n)
    return unpack_bits(stream, int(KQ_BITS[value_dtype]), n)


def scale_codes(group_scales: torch.Tensor, n: int, layout: KqLayout) -> torch.Tensor:
    """The (sc_g, mc_g) codes of the groups of ``n`` values from their packed stream, uint8 (G, 2)."""
    g = layout.n_groups(n)
    return unpack_bits(group_scales, layout.scale_bits, 2 * g).view(g, 2)


def group_affine(pairs: torch.Tensor, supers: torch.Tensor, layout: KqLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_g, b_g) float32 per group: fp32(d_s) * fp32(sc_g) and fp32(m_s) * fp32(mc_g), both exact, from
    the (G, 2) scale codes and the (S, 2) float16 super-block scales."""
    g = pairs.shape[0]
    sup = supers.float().reshape(-1, 1, 2).expand(-1, layout.super, 2).reshape(-1, 2)[:g]
    ab = sup * pairs.float()
    return ab[:, 0], ab[:, 1]


def dequantize_codes(codes: torch.Tensor, pairs: torch.Tensor, supers: torch.Tensor, n: int, value_dtype: str,
                     layout: KqLayout) -> torch.Tensor:
    """Flat float32 (n,) values from the packed codes, the unpacked (G, 2) scale codes and the super scales."""
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=codes.device)
    q = unpack_codes(codes, value_dtype, n)
    a, b = group_affine(pairs, supers, layout)
    g = a.numel()
    if g * layout.group != n:
        q = F.pad(q, (0, g * layout.group - n))
    v = q.view(g, layout.group).float()
    v.mul_(a[:, None])  # RNE32(q * a_g)
    v.sub_(b[:, None])  # RNE32(... - b_g): a second operation, so no fused multiply-add
    return v.view(-1)[:n]


def dequantize(codes: torch.Tensor, group_scales: torch.Tensor, supers: torch.Tensor, n: int, value_dtype: str,
               layout: KqLayout) -> torch.Tensor:
    """Flat float32 (n,) values of one value part from its three stored parts (spec 5.10)."""
    return dequantize_codes(codes, scale_codes(group_scales, n, layout), supers, n, value_dtype, layout)


def check_codes(stream: np.ndarray, n: int, value_dtype: str, where: str) -> None:
    """The checks :func:`kquant.unpack_codes` makes, without unpacking: the size, ternary bytes <= 242,
    zero padding codes (ternary) or zero unused bits of the last byte."""
    stream = np.asarray(stream).reshape(-1)
    if stream.dtype != np.uint8 or stream.size != kquant.codes_nbytes(n, value_dtype):
        raise RmoeFormatError(f"tensor {where}: {stream.size} bytes, {kquant.codes_nbytes(n, value_dtype)} expected")
    if not stream.size:
        return
    last = int(stream[-1])
    if value_dtype == "ternary":
        if int(stream.max()) > 242:
            raise RmoeFormatError(f"tensor {where}: byte above 242 in a ternary code stream")
        if n % TERNARY_DIGITS and last >= 3 ** (n % TERNARY_DIGITS):
            raise RmoeFormatError(f"tensor {where}: padding codes after the last value must be 0")
        return
    spare = stream.size * 8 - n * int(KQ_BITS[value_dtype])
    if spare and last >> (8 - spare):
        raise RmoeFormatError(f"tensor {where}: unused bits of the last byte must be zero")


class PackedValues:
    """One k-quant value part held on a device as its packed codes, its group scale and offset codes
    (unpacked: one byte each) and its float16 super-block scales; dequantized by :meth:`tensor` each time
    it is used.

    ``shape``: the logical shape of its values (their product is the value count). :meth:`tensor` gives
    them rounded to ``round_to`` (a source dtype; None: not rounded) and converted to ``dtype``.
    """

    def __init__(self, codes: torch.Tensor, pairs: torch.Tensor, supers: torch.Tensor, value_dtype: str,
                 layout: KqLayout, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 round_to: torch.dtype | None = None):
        self.codes, self.pairs, self.supers = codes, pairs, supers
        self.value_dtype, self.layout, self.shape = value_dtype, layout, tuple(shape)
        self.dtype, self.round_to = dtype, round_to
        self.n = int(np.prod(self.shape, dtype=np.int64))
        self._args: tuple | None | bool = False

    @classmethod
    def from_parts(cls, parts: Mapping[str, np.ndarray], part: str, shape: tuple[int, ...], value_dtype: str,
                   layout: KqLayout, device: torch.device | str = "cpu", names: Mapping[str, str] | None = None,
                   dtype: torch.dtype = torch.float32, round_to: torch.dtype | None = None) -> "PackedValues":
        """Value part ``part`` (``values``, ``u``, ``v``) of a record's parts, checked as the numpy decoder
        checks it (:class:`RmoeFormatError` otherwise; ``names``: tensor names for messages) and copied
        to ``device``."""
        names = names or {}
        c, gs, ss = kquant.part_names(part)
        n = int(np.prod(shape, dtype=np.int64))
        check_codes(parts[c], n, value_dtype, names.get(c, c))
        grid = kquant.unpack_grid(parts[gs], parts[ss], n, layout, names.get(gs, gs), names.get(ss, ss))
        held = [np.asarray(parts[c]).reshape(-1), np.stack([grid.sc, grid.mc], axis=1), grid.supers]
        return cls(*(to_torch(a, device=device, copy=True) for a in held), value_dtype, layout, shape, dtype,
                   round_to)

    def tensor(self) -> torch.Tensor:
        """The values in ``shape``: float32 bit for bit as the file restores them (decoded by the compiled kernels
        on the CPU for whole 64-value groups), rounded to ``round_to`` if set, in ``dtype``."""
        if native.kq_supported((1, self.n), self.layout.group, self.codes.device):  # whole groups
            v = native.kq_dequantize(self.codes, self.code_bits, self.pairs, self.supers, self.layout.super, self.n)
        else:
            v = dequantize_codes(self.codes, self.pairs, self.supers, self.n, self.value_dtype, self.layout)
        if self.round_to is not None:
            v = v.to(self.round_to)
        return v.to(self.dtype).view(self.shape)

    @property
    def code_bits(self) -> int:
        """The kernels' code width: 2 ... 8 bits, 0 for ternary."""
        return 0 if self.value_dtype == "ternary" else int(KQ_BITS[self.value_dtype])

    def _kernel_args(self, tokens: int) -> tuple | None:
        """The compiled kernels' arguments for a product with ``tokens`` tokens, or None where they do not apply
        (many tokens, rounding to a dtype other than bf16, rows of partial groups, not on the CPU)."""
        if tokens > native.DENSE_TOKENS:
            return None
        if self._args is False:  # decided once, on first use
            self._args = None
            if self.round_to in (None, torch.bfloat16) and native.kq_supported(self.shape, self.layout.group,
                                                                               self.codes.device):
                self._args = (self.codes, self.code_bits, self.pairs, self.supers, self.layout.super,
                              self.round_to is not None, self.shape)
        return self._args

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for x (T, n), in x's dtype: decoded weight by weight in the compiled kernels for a few tokens,
        else dequantized (:meth:`tensor`) and multiplied by torch."""
        args = self._kernel_args(x.shape[0])
        if args is None:
            return torch.nn.functional.linear(x, self.tensor().to(x.dtype))
        return native.kq_matmul(*args, x).to(x.dtype)

    def rlinear(self, h: torch.Tensor) -> torch.Tensor:
        """``h @ W`` for h (T, m), in h's dtype (as :meth:`linear`)."""
        args = self._kernel_args(h.shape[0])
        if args is None:
            return h @ self.tensor().to(h.dtype)
        return native.kq_rmatmul(*args, h).to(h.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.pairs, self.supers))

    def __repr__(self) -> str:
        return f"PackedValues({self.value_dtype}, shape={list(self.shape)}, {self.nbytes()} bytes)"
