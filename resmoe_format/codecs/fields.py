"""``fields``: a bf16, fp16 or fp32 matrix stored exactly, its float fields in separate streams
(spec 5.11, version 4.0).

Each element's bit pattern (W bits: sign, E exponent bits, M mantissa bits) is split into

* ``sign``: the sign bit, one bit per element (LSB-first);
* ``head``: the exponent and the top h mantissa bits, an (E + h)-bit value v, stored as one byte
  per element, ``(v - offset) mod 2^(E+h)`` when that is below 255, else the byte 255 (an escape)
  with v itself in ``escapes`` (u16, in element order);
* ``tail``: the low M - h mantissa bits, LSB-first.

Each field may be taken against a *predictor* P (the layer's base, in the same dtype): ``xor``
(field of X xor field of P) or, for the head, ``sub`` (difference modulo 2^(E+h)); ``raw`` uses
X alone. The ``sign``, ``head`` and ``tail`` byte streams are stored raw or as one Zstandard
frame (RFC 8878, the ``zstandard`` package: Huffman-coded literals, decoded natively), whichever
is smaller. Decoding is bounded: a frame must declare exactly its stream's length, and nothing
larger is ever allocated.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import zstandard

from .. import dtypes
from ..errors import RmoeFormatError
from .base import AnyQuant, Encoded, _is_int, check_no_extra, check_part, fail

#: source dtype -> (bits W, exponent bits E, mantissa bits M)
LAYOUT = {"bf16": (16, 8, 7), "fp16": (16, 5, 10), "fp32": (32, 8, 23)}
UINT = {16: np.uint16, 32: np.uint32}
STREAMS = ("sign", "head", "tail")
MODES = {"sign": ("raw", "xor"), "head": ("raw", "xor", "sub"), "tail": ("raw", "xor")}
ESCAPE = 255
#: head widths E + h are at most 16 bits, so an escaped head fits a u16
MAX_HEAD = 16
#: head bits the reference writer tries: a tail of 4 (bf16) or 8 (fp16) bits unpacks fastest
HEAD_BITS = {"bf16": (3,), "fp16": (2,), "fp32": (2, 3, 4)}
#: the reference writer's Zstandard level (any level gives a valid frame; 3 measured as small as 19 here)
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class FieldsParams:
    """The record's ``params``: head bits h, offset, the mode of each field, the streams stored as zstd frames."""

    head_bits: int
    offset: int
    modes: tuple[str, str, str]  # sign, head, tail
    zstd: tuple[str, ...]

    def to_json(self) -> dict:
        return {"head_bits": self.head_bits, "offset": self.offset, "sign": self.modes[0], "head": self.modes[1],
                "tail": self.modes[2], "zstd": list(self.zstd)}

    @property
    def predicted(self) -> bool:
        return any(m != "raw" for m in self.modes)

    @classmethod
    def parse(cls, params: dict, value_dtype: str) -> "FieldsParams":
        """Validate a record's params against its value dtype (spec 5.11); RmoeFormatError if invalid."""
        if value_dtype not in LAYOUT:
            raise RmoeFormatError(f"fields: value_dtype must be one of {tuple(LAYOUT)}, got {value_dtype!r}")
        _, e, m = LAYOUT[value_dtype]
        h = params.get("head_bits")
        if not (_is_int(h) and 0 <= h <= min(m, MAX_HEAD - e)):
            raise RmoeFormatError(f"fields: head_bits must be an integer in [0, {min(m, MAX_HEAD - e)}] for "
                                  f"{value_dtype}, got {h!r}")
        off = params.get("offset")
        if not (_is_int(off) and 0 <= off < 1 << (e + h)):
            raise RmoeFormatError(f"fields: offset must be an integer in [0, 2^{e + h}), got {off!r}")
        modes = []
        for s in STREAMS:
            mode = params.get(s)
            if mode not in MODES[s]:
                raise RmoeFormatError(f"fields: {s} mode must be one of {MODES[s]}, got {mode!r}")
            modes.append(mode)
        de = params.get("zstd")
        if not (isinstance(de, list) and all(isinstance(x, str) and x in STREAMS for x in de)
                and len(set(de)) == len(de)):
            raise RmoeFormatError(f"fields: zstd must be a list of distinct stream names from {STREAMS}")
        return cls(h, off, tuple(modes), tuple(sorted(de, key=STREAMS.index)))


def raw_sizes(n: int, value_dtype: str, head_bits: int) -> dict[str, int]:
    """Bytes of each raw (inflated) stream of ``n`` elements."""
    _, _, m = LAYOUT[value_dtype]
    return {"sign": -(-n // 8), "head": n, "tail": -(-n * (m - head_bits) // 8)}


# ---- bit fields ------------------------------------------------------------------------------

def pack_fields(values: np.ndarray, width: int) -> np.ndarray:
    """Unsigned ``width``-bit values (0 <= width <= 32) as an LSB-first byte stream."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if width == 0 or v.size == 0:
        return np.zeros(-(-v.size * width // 8), np.uint8)
    bits = ((v[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_fields(stream: np.ndarray, width: int, n: int, dtype=np.uint32) -> np.ndarray:
    """The first ``n`` ``width``-bit values (width <= 32) of an LSB-first stream, as ``dtype`` (uint32 by default).

    Eight fields fill exactly ``width`` bytes: each group of eight is read as little-endian 64-bit words."""
    if width == 0 or n == 0:
        return np.zeros(n, dtype)
    stream = np.asarray(stream, np.uint8).reshape(-1)
    if width in (8, 16, 32) and stream.size * 8 >= n * width:  # whole bytes: a little-endian view
        return stream[: n * width // 8].view(f"<u{width // 8}").astype(dtype)
    if width in (1, 2, 4) and stream.size * 8 >= n * width:  # whole fields per byte
        per = 8 // width
        b = stream[: -(-n // per)]
        out = np.empty((b.size, per), dtype)
        for j in range(per):
            out[:, j] = (b >> np.uint8(j * width)) & np.uint8((1 << width) - 1)
        return out.reshape(-1)[:n]
    groups = -(-n // 8)
    nw = -(-width // 8)
    g = np.zeros((groups, 8 * nw), np.uint8)
    flat = stream[: groups * width]
    g[: flat.size // width, :width] = flat[: flat.size // width * width].reshape(-1, width)
    if flat.size % width:
        g[flat.size // width, : flat.size % width] = flat[flat.size // width * width:]
    words = g.view("<u8")
    out = np.empty((groups, 8), dtype)
    mask = np.uint64((1 << width) - 1)
    for k in range(8):
        wi, sh = divmod(k * width, 64)
        v = words[:, wi] >> np.uint64(sh)
        if sh + width > 64:
            v |= words[:, wi + 1] << np.uint64(64 - sh)
        out[:, k] = v & mask
    return out.reshape(-1)[:n]


def split(bits: np.ndarray, value_dtype: str, head_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sign, head, tail) fields of flat bit patterns, as uint32 arrays."""
    w, _, m = LAYOUT[value_dtype]
    b = bits.astype(np.uint32)
    t = m - head_bits
    return b >> (w - 1), (b >> t) & np.uint32((1 << (w - 1 - t)) - 1), b & np.uint32((1 << t) - 1)


def bits_of(x: np.ndarray, value_dtype: str) -> np.ndarray:
    """Flat bit patterns of ``x`` (a float array) in ``value_dtype``; ValueError if not exactly representable."""
    dt = dtypes.by_name(value_dtype).np
    a = np.asarray(x)
    if a.dtype != dt:
        f = a.astype(np.float32)
        a = f.astype(dt)
        if not np.array_equal(a.astype(np.float32).view(np.uint32), f.view(np.uint32)):
            raise ValueError(f"fields stores values exactly: some are not {value_dtype} values")
    return np.ascontiguousarray(a).reshape(-1).view(UINT[LAYOUT[value_dtype][0]])


class Predictor:
    """A predictor's bit patterns and, per head width, its fields in place (sign as 0/1 bytes, head and tail
    masked in their bit positions), computed once for all the records coded against it."""

    def __init__(self, values: np.ndarray, value_dtype: str):
        self.value_dtype = value_dtype
        self.bits = bits_of(np.asarray(values).reshape(-1), value_dtype)
        self._fields: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def fields(self, head_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if head_bits not in self._fields:
            w, e, m = LAYOUT[self.value_dtype]
            u = UINT[w]
            t = m - head_bits
            b = self.bits
            self._fields[head_bits] = ((b >> u(w - 1)).astype(np.uint8), b & u(((1 << (e + head_bits)) - 1) << t),
                                       b & u((1 << t) - 1))
        return self._fields[head_bits]


# ---- streams ---------------------------------------------------------------------------------

_LOCAL = threading.local()  # a ZstdDecompressor is not for concurrent use: one per thread


def _dctx() -> zstandard.ZstdDecompressor:
    if not hasattr(_LOCAL, "dctx"):
        _LOCAL.dctx = zstandard.ZstdDecompressor()
    return _LOCAL.dctx


def compress(raw: bytes) -> bytes:
    """One Zstandard frame (RFC 8878) of ``raw``, its content size declared, no checksum, no dictionary."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=False).compress(raw)


def decompress(stream: np.ndarray, size: int, where: str) -> np.ndarray:
    """Exactly ``size`` bytes from one Zstandard frame that declares that size and fills ``stream``; nothing
    larger is allocated (the declared size is checked before decoding)."""
    data = np.asarray(stream, np.uint8).tobytes()
    try:
        fp = zstandard.get_frame_parameters(data)
        if fp.content_size != size or fp.dict_id != 0:
            raise fail(where, f"the zstd frame declares {fp.content_size} bytes (dictionary {fp.dict_id}); the "
                              f"stream holds {size} bytes and uses no dictionary")
        out = _dctx().decompress(data, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise fail(where, f"not one valid zstd frame ({e})") from None
    if len(out) != size:
        raise fail(where, f"the zstd frame decodes to {len(out)} bytes, {size} expected")
    return np.frombuffer(out, np.uint8)


def _entropy_bytes(counts: np.ndarray) -> float:
    """Order-0 entropy, in bytes, of symbols with these counts."""
    c = counts[counts > 0].astype(np.float64)
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum() / 8) if n else 0.0


def _best_offset(head: np.ndarray, width: int) -> tuple[int, int]:
    """(offset, escapes): the start of the 255 cyclically consecutive head values holding most elements."""
    size = 1 << width
    cnt = np.bincount(head, minlength=size).astype(np.int64)
    if size <= ESCAPE:
        return 0, 0
    cs = np.concatenate([[0], np.cumsum(np.concatenate([cnt, cnt[:ESCAPE]]))])
    window = cs[ESCAPE:ESCAPE + size] - cs[:size]
    off = int(np.argmax(window))
    return off, int(head.size - window[off])


def _head_cost(head: np.ndarray, width: int) -> tuple[float, int]:
    off, esc = _best_offset(head, width)
    sym = np.where((head - off) % (1 << width) < ESCAPE, (head - off) % (1 << width), ESCAPE)
    return _entropy_bytes(np.bincount(sym.astype(np.int64))) + 2 * esc, off


# ---- the codec -------------------------------------------------------------------------------

class Fields:
    name = "fields"

    def encode(self, x: np.ndarray, value_dtype: str, quant: AnyQuant | None = None,
               predictor: np.ndarray | None = None, head_bits: int | None = None, **_) -> Encoded:
        """Store ``x`` exactly in ``value_dtype``; with ``predictor`` (same shape, same dtype) each field is
        taken raw or against it, whichever measures smaller; ``head_bits`` None tries 2, 3 and 4."""
        if value_dtype not in LAYOUT:
            raise ValueError(f"fields stores bf16, fp16 or fp32 values, not {value_dtype}")
        m, n = x.shape
        w, e, man = LAYOUT[value_dtype]
        bits = bits_of(x, value_dtype)
        pbits = None if predictor is None else bits_of(np.asarray(predictor).reshape(x.shape), value_dtype)
        candidates = [head_bits] if head_bits is not None else HEAD_BITS[value_dtype]
        best = None
        for h in candidates:
            s, hd, t = split(bits, value_dtype, h)
            ps = None if pbits is None else split(pbits, value_dtype, h)
            width = e + h
            heads = {"raw": hd}
            if ps is not None:
                heads |= {"xor": hd ^ ps[1], "sub": (hd - ps[1]) & np.uint32((1 << width) - 1)}
            costs = {mode: _head_cost(v.astype(np.int64), width) for mode, v in heads.items()}
            hmode = min(costs, key=lambda k: costs[k][0])
            cost = costs[hmode][0] + bits.size * (man - h) / 8
            if best is None or cost < best[0]:
                best = (cost, h, hmode, costs[hmode][1], s, heads[hmode], t, ps)
        _, h, hmode, off, s, hd, t, ps = best
        smode = tmode = "raw"
        if ps is not None:
            sx = s ^ ps[0]
            if _bit_entropy(sx) < _bit_entropy(s):
                smode, s = "xor", sx
            tx = t ^ ps[2]
            if _tail_cost(tx, man - h) < _tail_cost(t, man - h):
                tmode, t = "xor", tx
        width = e + h
        v = (hd.astype(np.int64) - off) % (1 << width)
        esc = v >= ESCAPE
        raw = {"sign": np.packbits(s.astype(np.uint8), bitorder="little"),
               "head": np.where(esc, ESCAPE, v).astype(np.uint8),
               "tail": pack_fields(t, man - h)}
        parts, framed = {}, []
        for name in STREAMS:
            packed = compress(raw[name].tobytes()) if raw[name].size else b""
            if len(packed) < raw[name].size:
                parts[name] = np.frombuffer(packed, np.uint8).copy()
                framed.append(name)
            else:
                parts[name] = raw[name]
        parts["escapes"] = hd[esc].astype(np.uint16)
        params = FieldsParams(h, off, (smode, hmode, tmode), tuple(framed)).to_json()
        return Encoded(self.name, (m, n), value_dtype, parts, params, None)

    def check_layout(self, shape, value_dtype, quant, params, parts, names) -> None:
        m, n = shape
        p = FieldsParams.parse(params, value_dtype)
        if quant is not None:
            raise RmoeFormatError(f"fields: no quant record is allowed ({names.get('head', 'head')})")
        sizes = raw_sizes(m * n, value_dtype, p.head_bits)
        for s in STREAMS:
            tname = names.get(s, s)
            if s not in parts or len(parts[s][1]) != 1:
                raise RmoeFormatError(f"fields: 1-D {s} tensor missing ({tname})")
            length = parts[s][1][0]
            if s in p.zstd and not (0 < length < sizes[s]):
                raise fail(tname, f"a zstd frame of {length} bytes for {sizes[s]} bytes: it must be shorter "
                                  f"than the raw stream and not empty")
            check_part(parts, names, s, (length if s in p.zstd else sizes[s],), ("u8",))
        if "escapes" not in parts or len(parts["escapes"][1]) != 1 or parts["escapes"][1][0] > m * n:
            raise RmoeFormatError(f"fields: a 1-D escapes tensor of at most {m * n} entries is required "
                                  f"({names.get('escapes', 'escapes')})")
        check_part(parts, names, "escapes", parts["escapes"][1], ("u16",))
        check_no_extra(parts, names, set(STREAMS) | {"escapes"}, self.name)

    def decode(self, enc: Encoded, names, predictor: np.ndarray | None = None) -> np.ndarray:
        """The float32 (m, n) matrix; ``predictor`` (the base's values, float) when a field uses it."""
        bits = self.decode_bits(enc, names, predictor)
        if enc.value_dtype == "bf16":  # the high half of a binary32
            return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(enc.shape)
        return bits.view(dtypes.by_name(enc.value_dtype).np).astype(np.float32).reshape(enc.shape)

    def decode_bits(self, enc: Encoded, names, predictor: np.ndarray | None = None) -> np.ndarray:
        """The flat bit patterns (uint16 or uint32) the record stores."""
        m, n = enc.shape
        N = m * n
        vd = enc.value_dtype
        w, e, man = LAYOUT[vd]
        p = FieldsParams.parse(enc.params, vd)
        h = p.head_bits
        width = e + h
        sizes = raw_sizes(N, vd, h)
        raw = {}
        for s in STREAMS:
            part = np.asarray(enc.parts[s], np.uint8).reshape(-1)
            raw[s] = decompress(part, sizes[s], names.get(s, s)) if s in p.zstd else part
            if raw[s].size != sizes[s]:
                raise fail(names.get(s, s), f"{raw[s].size} bytes, {sizes[s]} expected")
        for s, used in (("sign", N), ("tail", N * (man - h))):
            spare = raw[s].size * 8 - used
            if spare and int(raw[s][-1]) >> (8 - spare):
                raise fail(names.get(s, s), "unused bits of the last byte must be zero")
        u = UINT[w]
        t = man - h
        hmask = u(((1 << width) - 1) << t)  # the head field in place: bits t .. W - 2
        y = raw["head"]
        escapes = np.asarray(enc.parts["escapes"]).reshape(-1)
        ename = names.get("escapes", "escapes")
        k = int(np.count_nonzero(y == ESCAPE))
        if escapes.size != k:
            raise fail(ename, f"{escapes.size} escaped heads stored, the head stream has {k} escapes")
        word = y.astype(u)  # heads in place: ((y + o) mod 2^H) << t
        word += u(p.offset)
        word <<= u(t)
        word &= hmask
        if k:
            ev = escapes.astype(np.int64)
            if int(ev.max()) >> width or ((ev - p.offset) % (1 << width) < ESCAPE).any():
                raise fail(ename, "an escaped head that is out of range or could have been stored directly")
            word[y == ESCAPE] = (ev << t).astype(u)
        tail = unpack_fields(raw["tail"], t, N, u)
        sign = np.unpackbits(raw["sign"], bitorder="little", count=N)
        if p.predicted:
            if predictor is None:
                raise RmoeFormatError(f"fields: record {names.get('head', 'head')} is coded against a predictor, "
                                      f"and none was given")
            pf = predictor if isinstance(predictor, Predictor) else Predictor(predictor, vd)
            if pf.bits.size != N or pf.value_dtype != vd:
                raise RmoeFormatError(f"fields: a {pf.value_dtype} predictor of {pf.bits.size} values for {N} "
                                      f"{vd} values")
            ps, ph, pt = pf.fields(h)
            if p.modes[0] == "xor":
                sign ^= ps
            if p.modes[1] == "xor":
                word ^= ph
            elif p.modes[1] == "sub":  # ((a + b) mod 2^H) << t: the sum of two fields in place fits in W bits
                word += ph
                word &= hmask
            if p.modes[2] == "xor":
                tail ^= pt
        word |= tail
        word |= np.left_shift(sign, u(w - 1), dtype=u)
        return word

    def predict_nbytes(self, shape, value_dtype, quant, **_) -> int:
        """An upper bound: every stream raw, no escapes (the coded size depends on the data)."""
        if value_dtype not in LAYOUT:
            raise ValueError(f"fields stores bf16, fp16 or fp32 values, not {value_dtype}")
        m, n = shape
        return sum(raw_sizes(m * n, value_dtype, 0).values())


def _bit_entropy(bits: np.ndarray) -> float:
    """Binary entropy, in bits per element, of a 0/1 array."""
    q = float(np.mean(bits)) if bits.size else 0.0
    return 0.0 if q in (0.0, 1.0) else float(-(q * np.log2(q) + (1 - q) * np.log2(1 - q)))


def _tail_cost(t: np.ndarray, width: int) -> float:
    """Estimated bytes of a tail stream: raw unless its bytes have a skewed histogram."""
    if width == 0 or t.size == 0:
        return 0.0
    packed = pack_fields(t[: min(t.size, 1 << 16)], width)
    frac = t.size / min(t.size, 1 << 16)
    return min(float(packed.size), _entropy_bytes(np.bincount(packed, minlength=256))) * frac


def uses_predictor(params: dict) -> bool:
    """Whether a ``fields`` record's params take some field against the predictor (params assumed valid)."""
    return any(params.get(s, "raw") != "raw" for s in STREAMS)
