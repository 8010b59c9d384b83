"""Group-wise integer codes with two-level scales (k-quant style): the ``q2`` … ``q8`` and
``ternary`` value dtypes (spec section 5.10).

A value part of N values (flattened in storage order) is cut into groups of ``group``
consecutive values; ``super`` consecutive groups form a super-block. Per value:

    a_g = fp32(d_s) * fp32(sc_g)            group scale  (exact in binary32)
    b_g = fp32(m_s) * fp32(mc_g)            group offset (exact in binary32)
    v   = RNE32(RNE32(fp32(q) * a_g) - b_g)  two binary32 operations, no fused multiply-add

with q the value's code (0 … levels-1), (sc_g, mc_g) the group's ``scale_bits``-bit scale and
offset codes and (d_s, m_s) the super-block's float16 scales. Three parts per value part:

* codes        ``u8`` (ceil(N·bits/8),): LSB-first bit stream of ``bits``-bit codes; ``ternary``
  packs five codes per byte as q0 + 3q1 + 9q2 + 27q3 + 81q4 (ceil(N/5) bytes, each ≤ 242);
* group scales ``u8`` (ceil(G·2·scale_bits/8),): LSB-first stream sc_0, mc_0, sc_1, mc_1, …;
* super scales ``fp16`` (S, 2): [d_s, m_s] per super-block.

This module holds the arithmetic (numpy only): sizes, packing, the exact dequantization and the
reference data-free quantizer (a weighted scale and offset search, as llama.cpp's
``make_qkx2_quants``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RmoeFormatError

#: value dtype -> bits per code (ternary: 3 levels, five codes per byte)
KQ_BITS = {"ternary": 1.6, "q2": 2, "q3": 3, "q4": 4, "q5": 5, "q6": 6, "q8": 8}
KQ_DTYPES = tuple(KQ_BITS)
SCALE_BITS = (4, 6, 8)
MAX_GROUP = 1 << 16
MAX_SUPER = 1 << 16
TERNARY_POW = np.array([1, 3, 9, 27, 81], dtype=np.uint16)


def is_kquant(value_dtype: str) -> bool:
    return value_dtype in KQ_BITS


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def levels(value_dtype: str) -> int:
    """Number of code values: 3 for ternary, 2**bits otherwise."""
    return 3 if value_dtype == "ternary" else 1 << int(KQ_BITS[value_dtype])


@dataclass(frozen=True)
class KqLayout:
    """The ``quant`` record of a k-quant value dtype: group size, groups per super-block,
    bits of each group scale and offset code."""

    group: int = 64
    super: int = 4
    scale_bits: int = 6

    def to_json(self) -> dict:
        return {"scheme": "kquant", "group": self.group, "super": self.super, "scale_bits": self.scale_bits}

    @classmethod
    def from_json(cls, d: object, where: str) -> "KqLayout":
        """Parse and validate a ``{"scheme": "kquant", "group", "super", "scale_bits"}`` record (spec 4.8)."""
        if not isinstance(d, dict) or d.get("scheme") != "kquant":
            raise RmoeFormatError(f"{where}: expected a quant record with scheme kquant")
        missing = [k for k in ("group", "super", "scale_bits") if k not in d]
        if missing:
            raise RmoeFormatError(f"{where}: kquant quant needs {', '.join(missing)}")
        layout = cls(d["group"], d["super"], d["scale_bits"])
        try:
            layout.validate()
        except ValueError as e:
            raise RmoeFormatError(f"{where}: {e}") from None
        return layout

    def validate(self) -> None:
        if not (_is_int(self.group) and 1 <= self.group <= MAX_GROUP):
            raise ValueError(f"kquant group must be an integer in [1, {MAX_GROUP}], got {self.group!r}")
        if not (_is_int(self.super) and 1 <= self.super <= MAX_SUPER):
            raise ValueError(f"kquant super must be an integer in [1, {MAX_SUPER}], got {self.super!r}")
        if not (_is_int(self.scale_bits) and self.scale_bits in SCALE_BITS):
            raise ValueError(f"kquant scale_bits must be one of {SCALE_BITS}, got {self.scale_bits!r}")

    def n_groups(self, n: int) -> int:
        return -(-n // self.group)

    def n_super(self, n: int) -> int:
        return -(-self.n_groups(n) // self.super)


def codes_nbytes(n: int, value_dtype: str) -> int:
    if value_dtype == "ternary":
        return -(-n // 5)
    return -(-n * int(KQ_BITS[value_dtype]) // 8)


def group_scales_nbytes(n: int, layout: KqLayout) -> int:
    return -(-layout.n_groups(n) * 2 * layout.scale_bits // 8)


def super_scales_count(n: int, layout: KqLayout) -> int:
    return layout.n_super(n)


def part_nbytes(n: int, value_dtype: str, layout: KqLayout) -> dict[str, int]:
    """Bytes of the three parts holding ``n`` values: codes, group scales, super scales."""
    return {"codes": codes_nbytes(n, value_dtype), "group_scales": group_scales_nbytes(n, layout),
            "super_scales": 4 * super_scales_count(n, layout)}


def nbytes(n: int, value_dtype: str, layout: KqLayout) -> int:
    return sum(part_nbytes(n, value_dtype, layout).values())


def bits_per_value(value_dtype: str, layout: KqLayout, n: int = 1 << 20) -> float:
    """Stored bits per value for a long part (scales included)."""
    return 8 * nbytes(n, value_dtype, layout) / n


# ---- bit streams -------------------------------------------------------------------

def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit integers as an LSB-first byte stream (unused high bits zero)."""
    codes = np.asarray(codes).reshape(-1)
    if bits == 8:
        return codes.astype(np.uint8)
    if 8 % bits == 0:  # 2 or 4 bits: whole codes per byte
        per = 8 // bits
        pad = (-codes.size) % per
        c = np.concatenate([codes.astype(np.uint8), np.zeros(pad, np.uint8)]).reshape(-1, per)
        out = np.zeros(c.shape[0], np.uint8)
        for j in range(per):
            out |= (c[:, j] << (j * bits)).astype(np.uint8)
        return out
    # 3, 5, 6 bits: eight codes fill exactly ``bits`` bytes; build one 64-bit word per eight codes
    nbytes = -(-codes.size * bits // 8)
    c = np.zeros(-(-codes.size // 8) * 8, np.uint8)
    c[:codes.size] = codes
    c = c.reshape(-1, 8)
    word = np.zeros(c.shape[0], np.uint64)
    for k in range(8):
        word |= c[:, k].astype(np.uint64) << np.uint64(k * bits)
    out = np.empty((c.shape[0], bits), np.uint8)
    for j in range(bits):
        out[:, j] = (word >> np.uint64(8 * j)) & np.uint64(0xFF)
    return out.reshape(-1)[:nbytes]


def unpack_bits(stream: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The first ``n`` ``bits``-bit codes of an LSB-first stream, as uint8."""
    stream = np.asarray(stream, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return stream[:n].copy()
    if 8 % bits == 0:
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        out = np.empty((stream.size, per), np.uint8)
        for j in range(per):
            out[:, j] = (stream >> np.uint8(j * bits)) & mask
        return out.reshape(-1)[:n]
    padded = np.zeros(-(-stream.size // bits) * bits, np.uint8)
    padded[:stream.size] = stream
    b = padded.reshape(-1, bits)
    word = np.zeros(b.shape[0], np.uint64)
    for j in range(bits):
        word |= b[:, j].astype(np.uint64) << np.uint64(8 * j)
    out = np.empty((b.shape[0], 8), np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for k in range(8):
        out[:, k] = (word >> np.uint64(k * bits)) & mask
    return out.reshape(-1)[:n]


def pack_ternary(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    pad = (-codes.size) % 5
    c = np.concatenate([codes, np.zeros(pad, np.uint8)]).reshape(-1, 5).astype(np.uint16)
    return (c * TERNARY_POW).sum(axis=1).astype(np.uint8)


def unpack_ternary(stream: np.ndarray, n: int) -> np.ndarray:
    b = np.asarray(stream, dtype=np.uint8).reshape(-1).astype(np.uint16)
    out = np.empty((b.size, 5), np.uint8)
    for j in range(5):
        out[:, j] = b % 3
        b = b // 3
    return out.reshape(-1)[:n]


def pack_codes(codes: np.ndarray, value_dtype: str) -> np.ndarray:
    if value_dtype == "ternary":
        return pack_ternary(codes)
    return pack_bits(codes, int(KQ_BITS[value_dtype]))


def unpack_codes(stream: np.ndarray, value_dtype: str, n: int, where: str = "codes") -> np.ndarray:
    """Codes from a stored stream; raises on bytes a writer cannot produce (ternary > 242,
    set padding bits)."""
    stream = np.asarray(stream, dtype=np.uint8).reshape(-1)
    if stream.size != codes_nbytes(n, value_dtype):
        raise RmoeFormatError(f"tensor {where}: {stream.size} bytes, {codes_nbytes(n, value_dtype)} expected")
    if value_dtype == "ternary":
        if stream.size and int(stream.max()) > 242:
            raise RmoeFormatError(f"tensor {where}: byte above 242 in a ternary code stream")
        out = unpack_ternary(stream, stream.size * 5)
        if out[n:].any():
            raise RmoeFormatError(f"tensor {where}: padding codes after the last value must be 0")
        return out[:n]
    _check_padding(stream, n * int(KQ_BITS[value_dtype]), where)
    return unpack_bits(stream, int(KQ_BITS[value_dtype]), n)


def _check_padding(stream: np.ndarray, used_bits: int, where: str) -> None:
    spare = stream.size * 8 - used_bits
    if spare and int(stream[-1]) >> (8 - spare):
        raise RmoeFormatError(f"tensor {where}: unused bits of the last byte must be zero")


# ---- the grid: per-group scale and offset --------------------------------------------

@dataclass
class KqGrid:
    """Per-group codes of the two-level scales and their exact binary32 values."""

    sc: np.ndarray  # (G,) uint8 scale codes
    mc: np.ndarray  # (G,) uint8 offset codes
    supers: np.ndarray  # (S, 2) float16: d, dmin

    def scale(self, layout: KqLayout) -> np.ndarray:
        """a_g = fp32(d_s) * fp32(sc_g), (G,) float32."""
        d = np.repeat(self.supers[:, 0].astype(np.float32), layout.super)[:self.sc.size]
        return d * self.sc.astype(np.float32)

    def offset(self, layout: KqLayout) -> np.ndarray:
        """b_g = fp32(m_s) * fp32(mc_g), (G,) float32."""
        m = np.repeat(self.supers[:, 1].astype(np.float32), layout.super)[:self.mc.size]
        return m * self.mc.astype(np.float32)


def dequantize(codes: np.ndarray, grid: KqGrid, layout: KqLayout) -> np.ndarray:
    """v = RNE32(RNE32(q * a_g) - b_g) for every value, flat float32 (spec 5.10)."""
    n = codes.size
    a = np.repeat(grid.scale(layout), layout.group)[:n]
    b = np.repeat(grid.offset(layout), layout.group)[:n]
    return codes.astype(np.float32) * a - b


def pack_grid(grid: KqGrid, layout: KqLayout) -> tuple[np.ndarray, np.ndarray]:
    """(group scales stream, super scales (S, 2) fp16)."""
    pairs = np.stack([grid.sc, grid.mc], axis=1).reshape(-1)
    return pack_bits(pairs, layout.scale_bits), np.ascontiguousarray(grid.supers.astype(np.float16))


def unpack_grid(group_scales: np.ndarray, supers: np.ndarray, n: int, layout: KqLayout,
                where: str = "group_scales", where_super: str = "scales") -> KqGrid:
    """The grid of ``n`` values from its stored streams; ``where``/``where_super`` name the tensors in errors."""
    g = layout.n_groups(n)
    stream = np.asarray(group_scales, dtype=np.uint8).reshape(-1)
    if stream.size != group_scales_nbytes(n, layout):
        raise RmoeFormatError(f"tensor {where}: {stream.size} group-scale bytes, "
                              f"{group_scales_nbytes(n, layout)} expected")
    _check_padding(stream, g * 2 * layout.scale_bits, where)
    pairs = unpack_bits(stream, layout.scale_bits, 2 * g).reshape(g, 2)
    sup = np.asarray(supers)
    if sup.dtype != np.float16 or sup.size != 2 * layout.n_super(n):
        raise RmoeFormatError(f"tensor {where_super}: {sup.size // 2} fp16 super-blocks, "
                              f"{layout.n_super(n)} expected")
    sup = sup.reshape(-1, 2)
    if not np.isfinite(sup).all():
        raise RmoeFormatError(f"tensor {where_super}: super-block scales must be finite")
    return KqGrid(pairs[:, 0].copy(), pairs[:, 1].copy(), sup)


# ---- reference quantizer ---------------------------------------------------------------

def _grouped(x: np.ndarray, group: int) -> np.ndarray:
    n = x.size
    g = -(-n // group)
    out = np.zeros(g * group, np.float32)
    out[:n] = x
    return out.reshape(g, group)


def _best_affine(x: np.ndarray, w: np.ndarray, top: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``x`` (groups), a scale a >= 0 and offset b >= 0 (v = a*q - b, q in 0..top)
    minimizing sum w*(v - x)^2 over a candidate search (llama.cpp's make_qkx2_quants idea)."""
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = x.max(axis=1)
    span = hi - lo
    ok = span > 0
    safe = np.where(ok, span, 1.0)
    best_err = np.full(x.shape[0], np.inf)
    best_a = np.where(ok, span / top, 0.0)
    best_b = -lo
    sw = w.sum(axis=1)
    for t in np.linspace(-0.5, 0.5, steps) if steps > 1 else [0.0]:
        iscale = (top + t) / safe
        q = np.clip(np.rint((x - lo[:, None]) * iscale[:, None]), 0, top)
        # weighted least squares for v = a*q + c (c = -b <= 0)
        sq = (w * q).sum(1)
        sqq = (w * q * q).sum(1)
        sx = (w * x).sum(1)
        sqx = (w * q * x).sum(1)
        det = sw * sqq - sq * sq
        with np.errstate(divide="ignore", invalid="ignore"):
            a = (sw * sqx - sq * sx) / det
            c = (sqq * sx - sq * sqx) / det
            bad = ~(det > 0) | (c > 0)
            a_nc = sqx / sqq  # c = 0
        a = np.where(bad, a_nc, a)
        c = np.where(bad, 0.0, c)
        a = np.where(np.isfinite(a) & (a > 0), a, 0.0)
        err = (w * (a[:, None] * q + c[:, None] - x) ** 2).sum(1)
        take = err < best_err
        best_err = np.where(take, err, best_err)
        best_a = np.where(take, a, best_a)
        best_b = np.where(take, -c, best_b)
    return best_a.astype(np.float32), np.maximum(best_b, 0).astype(np.float32)


def _two_level(vals: np.ndarray, layout: KqLayout) -> tuple[np.ndarray, np.ndarray]:
    """Group values (>= 0) -> (codes uint8, per-super fp16 step) with vals ~= step * code."""
    top = (1 << layout.scale_bits) - 1
    g = vals.size
    s = -(-g // layout.super)
    pad = np.zeros(s * layout.super, np.float32)
    pad[:g] = vals
    blocks = pad.reshape(s, layout.super)
    d = (blocks.max(axis=1) / top).astype(np.float16)
    # fp16 rounding may have rounded d down so that max/d > top; codes are clipped, which is fine
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(d32[:, None] > 0, np.rint(blocks / d32[:, None]), 0)
    codes = np.clip(codes, 0, top).astype(np.uint8).reshape(-1)[:g]
    return codes, d


def fit_grid(x: np.ndarray, value_dtype: str, layout: KqLayout, weights: np.ndarray | None = None,
             steps: int = 11) -> KqGrid:
    """Data-free grid of a flat float array: a weighted scale/offset search per group, then the
    group scales and offsets quantized to ``scale_bits`` codes under fp16 super-block scales."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    xg = _grouped(x, layout.group)
    w = np.ones_like(xg) if weights is None else _grouped(np.asarray(weights, np.float32).reshape(-1), layout.group)
    if weights is None and x.size % layout.group:
        w.reshape(-1)[x.size:] = 0
    a, b = _best_affine(xg, w, levels(value_dtype) - 1, steps)
    sc, d = _two_level(a, layout)
    mc, dm = _two_level(b, layout)
    return KqGrid(sc, mc, np.stack([d, dm], axis=1))


def assign_codes(x: np.ndarray, grid: KqGrid, value_dtype: str, layout: KqLayout) -> np.ndarray:
    """Nearest codes of a flat array under a grid: clip(rint((x + b_g) / a_g), 0, levels-1)."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    a = np.repeat(grid.scale(layout), layout.group)[:n]
    b = np.repeat(grid.offset(layout), layout.group)[:n]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(a > 0, np.rint((x + b) / a), 0)
    return np.clip(q, 0, levels(value_dtype) - 1).astype(np.uint8)


def quantize(x: np.ndarray, value_dtype: str, layout: KqLayout, weights: np.ndarray | None = None
             ) -> tuple[np.ndarray, KqGrid]:
    """(codes, grid) of a flat array: the reference data-free quantizer."""
    grid = fit_grid(x, value_dtype, layout, weights)
    return assign_codes(x, grid, value_dtype, layout), grid


def roundtrip(x: np.ndarray, value_dtype: str, layout: KqLayout, weights: np.ndarray | None = None) -> np.ndarray:
    """What the file restores for ``x`` (same shape, float32)."""
    codes, grid = quantize(x, value_dtype, layout, weights)
    return dequantize(codes, grid, layout).reshape(np.shape(x))


# ---- parts ---------------------------------------------------------------------------

def part_names(part: str = "values") -> tuple[str, str, str]:
    """(codes, group scales, super scales) part names for value part ``part``:
    ``values`` -> values, group_scales, scales; ``u`` -> u, u_group_scales, u_scales."""
    if part == "values":
        return "values", "group_scales", "scales"
    return part, f"{part}_group_scales", f"{part}_scales"


def parts_of(codes: np.ndarray, grid: KqGrid, value_dtype: str, layout: KqLayout,
             part: str = "values") -> dict[str, np.ndarray]:
    """The stored parts of one value part from its codes and grid (ValueError for codes, scale codes or
    super-block scales that the parts cannot hold: the bytes would not decode to what was meant)."""
    c, gs, ss = part_names(part)
    n = np.size(codes)
    if n and int(np.max(codes)) >= levels(value_dtype):
        raise ValueError(f"{value_dtype} codes must be below {levels(value_dtype)}")
    if np.size(grid.sc) != layout.n_groups(n) or np.size(grid.mc) != layout.n_groups(n):
        raise ValueError(f"{n} values need {layout.n_groups(n)} group scale and offset codes")
    if max(int(np.max(grid.sc, initial=0)), int(np.max(grid.mc, initial=0))) >= 1 << layout.scale_bits:
        raise ValueError(f"group scale codes must be below {1 << layout.scale_bits}")
    if np.shape(grid.supers) != (layout.n_super(n), 2) or not np.isfinite(grid.supers).all():
        raise ValueError(f"{n} values need {layout.n_super(n)} finite super-block scale pairs")
    gstream, supers = pack_grid(grid, layout)
    return {c: pack_codes(codes, value_dtype), gs: gstream, ss: supers}


def values_of(parts: dict, n: int, value_dtype: str, layout: KqLayout, part: str = "values",
              names: dict | None = None) -> np.ndarray:
    """Flat float32 values of one value part from its stored parts (checks every byte)."""
    c, gs, ss = part_names(part)
    names = names or {}
    codes = unpack_codes(parts[c], value_dtype, n, names.get(c, c))
    grid = unpack_grid(parts[gs], parts[ss], n, layout, names.get(gs, gs), names.get(ss, ss))
    return dequantize(codes, grid, layout)
