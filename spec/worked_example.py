"""Build the worked example of spec/FORMAT.md section 9 and print it field by field.

    python spec/worked_example.py OUT.rmoe [--check spec/FORMAT.md]

One MoE layer, 2 experts, 3 hidden neurons, hidden size 4, source dtype bf16; base dense
bf16, expert 0's residuals csr16 bf16, expert 1's bitmap bf16; one passthrough tensor and
an embedded config.json. Every number section 9 of the spec shows is printed here, under
the same sub-section numbers; the decoding below is done by hand from the file's bytes
(struct and plain integer arithmetic) and then checked against the library. Then the
k-quant example of section 5.10 (ten values as q3 and as ternary), decoded the same way.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import struct
import sys
import zlib

import ml_dtypes
import numpy as np

import resmoe_format
from resmoe_format import MatrixSpec, MoELayer, SourceSpec, Writer, accounting, codecs, restore
from resmoe_format.codecs import KqLayout, kquant


def build(path: str) -> None:
    w1_base = np.array([[0.5, -1.0, 0.25, 2.0], [1.0, 0.0, -0.5, 0.75], [-2.0, 1.5, 0.0, 1.0]], np.float32)
    w2_base = np.array([[1.0, 0.5, -1.0], [0.0, 2.0, 0.25], [-0.5, 1.0, 1.5], [0.75, -0.25, 0.0]], np.float32)
    # expert 0 (csr16): two entries in w1, one in w2
    r0_w1 = np.zeros((3, 4), np.float32)
    r0_w1[0, 1], r0_w1[2, 3] = 0.125, -0.375
    r0_w2 = np.zeros((4, 3), np.float32)
    r0_w2[1, 0] = 0.5
    # expert 1 (bitmap): three entries in w1, two in w2; w2[0, 0] = 3 * 2**-8 makes a bf16 tie
    r1_w1 = np.zeros((3, 4), np.float32)
    r1_w1[1, 0], r1_w1[1, 2], r1_w1[2, 1] = -0.25, 0.0625, 1.0
    r1_w2 = np.zeros((4, 3), np.float32)
    r1_w2[0, 0], r1_w2[3, 2] = 0.01171875, -1.5
    layer = MoELayer(
        index=0, num_neurons=3,
        matrices=[MatrixSpec("w1", (3, 4), "bf16", 0), MatrixSpec("w2", (4, 3), "bf16", 1)],
        base_kind="barycenter",
        base={"w1": codecs.encode(w1_base, "dense", "bf16"), "w2": codecs.encode(w2_base, "dense", "bf16")},
        residuals=[{"w1": codecs.encode(r0_w1, "csr16", "bf16"), "w2": codecs.encode(r0_w2, "csr16", "bf16")},
                   {"w1": codecs.encode(r1_w1, "bitmap", "bf16"), "w2": codecs.encode(r1_w2, "bitmap", "bf16")}],
        permutations=[np.array([0, 1, 2]), np.array([2, 0, 1])],
        sources=[SourceSpec(f"experts.{k}.{m}.weight", "bf16", s, k, [m])
                 for k in range(2) for m, s in (("w1", (3, 4)), ("w2", (4, 3)))],
        prefix="model.layers.0.moe")
    with Writer(path, {"architecture": "TinyMoE", "source_dtype": "bf16"}, {"name": "example"}) as w:
        w.add_file("config.json", b'{"model_type":"tiny"}')
        w.add_passthrough("norm.weight", np.array([1.0, 1.0, 1.0, 1.0], np.float32))
        w.add_layer(layer)


# ---- helpers: decoding by hand -------------------------------------------------------

def bf16(h: int) -> float:
    """The value of a bf16 bit pattern: it is the top half of a binary32."""
    return struct.unpack("<f", struct.pack("<I", h << 16))[0]


def f32_bits(x) -> int:
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


def u16s(b: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(b) // 2}H", b))


def u32s(b: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(b) // 4}I", b))


def compact_json(doc) -> str:
    """Indented JSON with short lists and small objects kept on one line."""
    def fmt(v, ind):
        one = json.dumps(v)
        if len(one) + ind <= 132:
            return one
        pad = " " * (ind + 2)
        if isinstance(v, dict):
            body = ",\n".join(f"{pad}{json.dumps(k)}: {fmt(x, ind + 2)}" for k, x in v.items())
            return "{\n" + body + "\n" + " " * ind + "}"
        if isinstance(v, list):
            return "[\n" + ",\n".join(pad + fmt(x, ind + 2) for x in v) + "\n" + " " * ind + "]"
        return one
    return fmt(doc, 0)


def hexdump(b: bytes, base: int) -> str:
    lines = []
    for i in range(0, len(b), 16):
        chunk = b[i:i + 16]
        hx = " ".join(f"{x:02x}" for x in chunk[:8]) + "  " + " ".join(f"{x:02x}" for x in chunk[8:])
        txt = "".join(chr(x) if 32 <= x < 127 else "." for x in chunk)
        lines.append(f"{base + i:08x}  {hx:<49s} |{txt}|")
    return "\n".join(lines)


def num(x) -> str:
    """The exact decimal value (every value in this example is a short binary fraction)."""
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


def mat(a, indent: str = "    ") -> str:
    return "\n".join(indent + "[" + ", ".join(f"{num(v):>10s}" for v in row) + "]"
                     for row in np.asarray(a, np.float32).reshape(-1, np.shape(a)[-1]))


# ---- the walk-through ------------------------------------------------------------------

def walk(path: str) -> None:
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    ds = 8 + n
    print("[9.1] framing")
    print(f"file size: {len(raw)} bytes")
    print(f"bytes 0..7: {raw[:8].hex(' ')}  -> N = {n} (u64 little-endian)")
    print(f"header: bytes 8..{ds - 1}; 8 + N = {ds} = 8 * {ds // 8}")
    print(f"header starts: {raw[8:8 + 48].decode()!r}")
    pad = len(raw[8:ds]) - len(raw[8:ds].rstrip(b' '))
    print(f"header ends: {raw[ds - 24:ds].decode()!r} ({pad} padding spaces)")
    print(f"data buffer: bytes {ds}..{len(raw) - 1} ({len(raw) - ds} bytes)")

    head = json.loads(raw[8:ds])
    meta = head.pop("__metadata__")
    schema_raw = meta["rmoe_schema"]
    print("\n[9.2] __metadata__")
    for k, v in meta.items():
        print(f"{k} = {v!r}" if k != "rmoe_schema" else f"{k} = <{len(v.encode())} bytes of compact JSON, below>")
    print(f"crc32(UTF-8 of rmoe_schema) = {zlib.crc32(schema_raw.encode()) & 0xFFFFFFFF}")
    print("rmoe_schema, re-indented:")
    print(compact_json(json.loads(schema_raw)))

    print("\n[9.3] tensors")
    print(f"in data order; data_offsets are relative to the data buffer, which starts at file offset {ds}")
    print(f"{'name':38s} {'dtype':5s} {'shape':7s} {'data_offsets':12s} {'file bytes':11s} bytes (hex)")
    order = sorted(head.items(), key=lambda kv: tuple(kv[1]["data_offsets"]))
    for name, e in order:
        b, end = e["data_offsets"]
        body = raw[ds + b: ds + end]
        shown = body.hex(" ") if len(body) <= 24 else body[:16].hex(" ") + f" ... ({len(body)} bytes)"
        print(f"{name:38s} {e['dtype']:5s} {str(e['shape']):7s} {str([b, end]):12s} "
              f"{f'{ds + b}..{ds + end - 1}':11s} {shown}")
    print(f"\ndata buffer hexdump (offsets are file offsets in hex; {ds} = 0x{ds:x}):")
    print(hexdump(raw[ds:], ds))

    def t(name: str) -> bytes:
        b, end = head[name]["data_offsets"]
        return raw[ds + b: ds + end]

    print("\n[9.4] checksums")
    ck = u32s(t("rmoe.checksums"))
    others = [nm for nm, _ in order if nm != "rmoe.checksums"]
    for nm, c in zip(others, ck):
        mine = zlib.crc32(t(nm)) & 0xFFFFFFFF
        print(f"  {c:08x}  {nm}{'' if mine == c else '  MISMATCH'}")
    sch = json.loads(schema_raw)
    print(f"crc32 of the checksum tensor's {len(t('rmoe.checksums'))} bytes = "
          f"{zlib.crc32(t('rmoe.checksums')) & 0xFFFFFFFF}; schema.checksum.crc32 = {sch['checksum']['crc32']}")

    pre = "rmoe.layers.0"
    print("\n[9.5] base and permutations")
    print("base w1, dense bf16 (3 x 4, row-major)")
    bw1 = u16s(t(f"{pre}.base.w1.values"))
    for i in range(3):
        print(f"  row {i}: " + "  ".join(f"{h:04x}={num(bf16(h))}" for h in bw1[4 * i:4 * i + 4]))
    print("base w2, dense bf16 (4 x 3, row-major)")
    bw2 = u16s(t(f"{pre}.base.w2.values"))
    for i in range(4):
        print(f"  row {i}: " + "  ".join(f"{h:04x}={num(bf16(h))}" for h in bw2[3 * i:3 * i + 3]))
    for k in range(2):
        print(f"permutation of expert {k}: bytes {t(f'{pre}.experts.{k}.permutation').hex(' ')} "
              f"-> u16 {u16s(t(f'{pre}.experts.{k}.permutation'))}")

    print("\n[9.6] expert 0 residuals, csr16 bf16")
    for m, (rows, cols) in (("w1", (3, 4)), ("w2", (4, 3))):
        p = f"{pre}.experts.0.{m}"
        ptr, idx, val = u32s(t(f"{p}.indptr")), u16s(t(f"{p}.indices")), u16s(t(f"{p}.values"))
        nblocks = max(1, -(-cols // 65536))
        ptr2 = [ptr[b * (rows + 1):(b + 1) * (rows + 1)] for b in range(nblocks)]
        print(f"{m} ({rows} x {cols}): column blocks B = {nblocks}; indptr (B, m+1) = {ptr2}; "
              f"indices = {idx}; values = {[f'{h:04x}' for h in val]}")
        dense = np.zeros((rows, cols), np.float32)
        for i in range(rows):
            lo, hi = ptr[i], ptr[i + 1]
            entries = [f"indices[{j}] = col {idx[j]}, values[{j}] = {val[j]:04x} = {num(bf16(val[j]))}"
                       for j in range(lo, hi)]
            print(f"  row {i}: indptr[0][{i}..{i + 1}] = [{lo}, {hi})"
                  + (" -> " + "; ".join(entries) if entries else ", no entries"))
            for j in range(lo, hi):
                dense[i, idx[j]] = bf16(val[j])
        print(f"  decoded residual D:\n{mat(dense)}")

    print("\n[9.7] expert 1 residuals, bitmap bf16")
    for m, (rows, cols) in (("w1", (3, 4)), ("w2", (4, 3))):
        p = f"{pre}.experts.1.{m}"
        mask, val = t(f"{p}.mask"), u16s(t(f"{p}.values"))
        print(f"{m} ({rows} x {cols}): mask = {mask.hex(' ')} ({len(mask)} bytes = ceil({rows * cols}/8)); "
              f"values = {[f'{h:04x}' for h in val]}")
        bits = [j for j in range(8 * len(mask)) if mask[j // 8] >> (j % 8) & 1]
        for bi, byte in enumerate(mask):
            set_ = [8 * bi + s for s in range(8) if byte >> s & 1]
            print(f"  byte {bi} = 0x{byte:02x} = 0b{byte:08b}: bits set (LSB = bit 0) {[s - 8 * bi for s in set_]} "
                  f"-> element indices {set_}")
        print(f"  padding bits {rows * cols}..{8 * len(mask) - 1} are "
              f"{'zero' if all(j < rows * cols for j in bits) else 'NOT zero'}")
        dense = np.zeros((rows, cols), np.float32)
        for v, j in zip(val, bits):
            print(f"  element {j} = (row {j // cols}, col {j % cols}) <- next value {v:04x} = {num(bf16(v))}")
            dense[j // cols, j % cols] = bf16(v)
        print(f"  decoded residual D:\n{mat(dense)}")

    print("\n[9.8] restoring elements by hand")
    cases = [(0, "w1", 0, 1, 4, bw1, "csr16"), (1, "w2", 0, 0, 3, bw2, "bitmap")]
    with resmoe_format.open(path) as r:
        r.verify()
        for k, m, i, j, cols, base, _ in cases:
            b = np.float32(bf16(base[i * cols + j]))
            d = np.float32(r.residual(0, k, m)[i, j])
            a = np.float32(b + d)
            bits = f32_bits(a)
            hi, lo = bits >> 16, bits & 0xFFFF
            if lo > 0x8000 or (lo == 0x8000 and hi & 1):
                w, why = hi + 1, "rounds up" if lo > 0x8000 else "tie, rounds to the even neighbour (up)"
            else:
                w, why = hi, "rounds down" if lo != 0x8000 else "tie, rounds to the even neighbour (down)"
            if lo == 0:
                why = "exact"
            lib = restore.restore_matrix(r, 0, k, m)[i, j]
            libbits = int(np.asarray(lib).view(np.uint16))
            print(f"expert {k} {m}[{i},{j}]: B = bf16 {base[i * cols + j]:04x} = {num(b)}; D = {num(d)} "
                  f"(fp32 {f32_bits(d):08x})")
            print(f"  A = B + D = {num(a)} (fp32 {bits:08x}): high half {hi:04x}, low half {lo:04x} -> {why}")
            print(f"  W = bf16 {w:04x} = {num(bf16(w))}; library restore_matrix gives {libbits:04x}"
                  f"{'' if libbits == w else '  MISMATCH'}")
        for k in range(2):
            for m in ("w1", "w2"):
                print(f"expert {k} {m}, aligned order:\n{mat(restore.restore_matrix(r, 0, k, m))}")
                print(f"expert {k} {m}, original order (permutation {r.permutation(0, k).tolist()}):\n"
                      f"{mat(restore.restore_matrix(r, 0, k, m, original_order=True))}")

        print("\n[9.9] byte accounting")
        acc = accounting.account(r)
        for c, v in acc.bytes.items():
            print(f"  {c:17s} {v:5d}")
        print(f"  {'total':17s} {sum(acc.bytes.values()):5d} = file size {acc.file_size}")
        print(f"expert weights = {acc.expert_weights}; expert bytes = {acc.expert_bytes}; "
              f"bits per expert weight = {acc.bits_per_expert_weight():.4f} (source: {acc.source_bits_per_weight:g})")


# ---- section 5.10: k-quant values ------------------------------------------------------

def f16_bits(x) -> int:
    return int(np.asarray(x, np.float16).view(np.uint16))


def bits_lsb_first(stream: bytes) -> str:
    """The stream as bits in stream order: bit j is bit j mod 8 of byte j div 8."""
    return "".join(str(b >> j & 1) for b in stream for j in range(8))


def kquant_example() -> None:
    """Ten values stored as q3 (then as ternary) under group 4, super 2, scale_bits 6, decoded by hand."""
    x = np.array([0.5, -1.25, 2.0, 0.75, -0.5, 1.5, 3.0, -2.25, 0.25, 1.0], np.float32)
    layout, vd, n = KqLayout(4, 2, 6), "q3", 10
    codes, grid = kquant.quantize(x, vd, layout)
    parts = kquant.parts_of(codes, grid, vd, layout)
    cs, gs, ss = (parts[p].tobytes() for p in kquant.part_names())
    print("[5.10] k-quant example")
    print(f"x = [{', '.join(num(v) for v in x)}] (10 values, fp32)")
    print(f"value_dtype {vd}: codes 0..7 in 3 bits; quant {json.dumps(layout.to_json())}")
    print("groups G = ceil(10/4) = 3: values 0..3, 4..7, 8..9; super-blocks K = ceil(3/2) = 2: groups 0..1, 2")
    print(f"reference encoder (informative) chose q = {codes.tolist()}, sc = {grid.sc.tolist()}, "
          f"mc = {grid.mc.tolist()}")
    print(f"parts: values u8 ({len(cs)},) = ceil(10*3/8); group_scales u8 ({len(gs)},) = ceil(3*2*6/8); "
          f"scales fp16 (2, 2): {len(cs) + len(gs) + len(ss)} bytes in all")
    print(f"values = {cs.hex(' ')}")
    bits = bits_lsb_first(cs)
    print(f"  bits in stream order: {' '.join(bits[3 * i:3 * i + 3] for i in range(n))} | {bits[3 * n:]} (padding)")
    hand = [sum(int(bits[3 * i + j]) << j for j in range(3)) for i in range(n)]
    print(f"  code i = bits 3i, 3i+1, 3i+2 (least significant first): {hand}")
    print(f"group_scales = {gs.hex(' ')}")
    bits = bits_lsb_first(gs)
    pairs = [sum(int(bits[6 * i + j]) << j for j in range(6)) for i in range(6)]
    print(f"  bits in stream order: {' '.join(bits[6 * i:6 * i + 6] for i in range(6))} | {bits[36:]} (padding)")
    print(f"  6-bit fields sc0 mc0 sc1 mc1 sc2 mc2 = {pairs}")
    sup = struct.unpack("<4e", ss)
    h = struct.unpack("<4H", ss)
    print(f"scales = {ss.hex(' ')}")
    for s in range(2):
        print(f"  super-block {s}: d = fp16 {h[2 * s]:04x} = {num(sup[2 * s])}, m = fp16 {h[2 * s + 1]:04x} = "
              f"{num(sup[2 * s + 1])}")
    f32 = np.float32
    a = [f32(sup[2 * (g // 2)]) * f32(pairs[2 * g]) for g in range(3)]
    b = [f32(sup[2 * (g // 2) + 1]) * f32(pairs[2 * g + 1]) for g in range(3)]
    for g in range(3):
        print(f"group {g}: a = d * sc = {num(a[g])} (fp32 {f32_bits(a[g]):08x}); "
              f"b = m * mc = {num(b[g])} (fp32 {f32_bits(b[g]):08x})")
    out = []
    for i, q in enumerate(hand):
        p = f32(q) * a[i // 4]
        v = f32(p - b[i // 4])
        out.append(v)
        print(f"  v{i} = RNE32(RNE32({q} * a{i // 4}) - b{i // 4}) = RNE32({num(p)} - {num(b[i // 4])}) = {num(v)} "
              f"(fp32 {f32_bits(v):08x}; x = {num(x[i])})")
    lib = kquant.values_of(parts, n, vd, layout)
    same = np.array_equal(np.array(out, np.float32).view(np.uint32), lib.view(np.uint32))
    print(f"library values_of gives {'the same bits' if same else 'DIFFERENT bits: MISMATCH'}")
    tcodes, tgrid = kquant.quantize(x, "ternary", layout)
    tb = kquant.parts_of(tcodes, tgrid, "ternary", layout)["values"].tobytes()
    print(f"as ternary (codes 0..2), the reference encoder chose q = {tcodes.tolist()}; values u8 (2,) = "
          f"ceil(10/5) = {tb.hex(' ')}")
    for k, byte in enumerate(tb):
        five = tcodes[5 * k:5 * k + 5].tolist()
        terms = " + ".join(f"{c}*{3 ** j}" for j, c in enumerate(five))
        print(f"  byte {k} = {terms} = {sum(c * 3 ** j for j, c in enumerate(five))} = 0x{byte:02x}")


# ---- section 5.11: fields ---------------------------------------------------------------

def fields_example() -> None:
    """Eight bf16 values stored as fields against a predictor, h = 3, decoded by hand from the bytes."""
    x = np.array([0.5, -1.25, 2.0, 0.75, -0.5, 1.5, 3.0, 1e-20], np.float32).astype(ml_dtypes.bfloat16)
    p = np.array([0.5, -1.0, 2.25, 0.75, -0.5, 1.25, 3.0, 2.0], np.float32).astype(ml_dtypes.bfloat16)
    enc = codecs.encode(x.reshape(1, 8), "fields", "bf16", predictor=p.reshape(1, 8), head_bits=3)
    prm = enc.params
    h, o = prm["head_bits"], prm["offset"]
    W, E, M = 16, 8, 7
    H = E + h
    print("[5.11] fields example")
    def hexes(a) -> str:
        return " ".join(f"{b:04x}" for b in a.view(np.uint16))
    print(f"x = [{', '.join(num(float(v)) for v in x)}] (8 values, bf16: {hexes(x)})")
    print(f"P = [{', '.join(num(float(v)) for v in p)}] (the predictor: {hexes(p)})")
    print(f"params {json.dumps(prm)}: H = 8 + {h} = {H} head bits, tail {M - h} bits")
    parts = {k: v.tobytes() for k, v in enc.parts.items()}
    print(f"parts: sign u8 ({len(parts['sign'])},), head u8 ({len(parts['head'])},), tail u8 ({len(parts['tail'])},), "
          f"escapes u16 ({len(parts['escapes']) // 2},): {sum(map(len, parts.values()))} bytes in all (source: 16)")
    for k in ("sign", "head", "tail", "escapes"):
        print(f"{k} = {parts[k].hex(' ')}")
    sbits = bits_lsb_first(parts["sign"])
    tbits = bits_lsb_first(parts["tail"])
    esc = list(struct.unpack(f"<{len(parts['escapes']) // 2}H", parts["escapes"]))
    print(f"  sign bits in stream order: {sbits}; tail fields of {M - h} bits: "
          f"{' '.join(tbits[(M - h) * i:(M - h) * (i + 1)] for i in range(8))}")
    out, j = [], 0
    for i in range(8):
        pw = int(p.view(np.uint16)[i])
        ps, pv, pt = pw >> (W - 1), (pw >> (M - h)) % (1 << H), pw % (1 << (M - h))
        y = parts["head"][i]
        if y == 255:
            u, how = esc[j], f"escape {j}: u = {esc[j]}"
            j += 1
        else:
            u, how = (y + o) % (1 << H), f"u = ({y} + {o}) mod 2^{H} = {(y + o) % (1 << H)}"
        s1 = int(sbits[i])
        t1 = sum(int(tbits[(M - h) * i + b]) << b for b in range(M - h))
        s = s1 ^ ps if prm["sign"] == "xor" else s1
        v = {"xor": u ^ pv, "sub": (u + pv) % (1 << H), "raw": u}[prm["head"]]
        t = t1 ^ pt if prm["tail"] == "xor" else t1
        w = (s << (W - 1)) | (v << (M - h)) | t
        out.append(w)
        print(f"  {i}: y = {y:3d}, {how}; P: s {ps} v {pv} t {pt}; s = {s}, v = {v}, t = {t}: "
              f"w = {w:04x} = {num(float(np.array([w], np.uint16).view(ml_dtypes.bfloat16)[0]))}")
    lib = codecs.CODECS["fields"].decode_bits(enc, {}, p.reshape(1, 8))
    same = np.array_equal(np.array(out, np.uint16), lib) and np.array_equal(lib, x.view(np.uint16))
    print(f"library decode gives {'the same bits, equal to x' if same else 'DIFFERENT bits: MISMATCH'}")


def sections(text: str) -> dict[str, str]:
    """The printed output split at its "[9.x] title" (and "[5.10]", "[5.11] title") lines: {"9.x": body}."""
    out: dict[str, str] = {}
    for m in re.finditer(r"^\[(\d+\.\d+)\] [^\n]*\n(.*?)(?=^\[\d+\.\d+\]|\Z)", text, re.S | re.M):
        out[m.group(1)] = m.group(2).rstrip("\n")
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="example.rmoe", help="path of the .rmoe file to write")
    ap.add_argument("--check", metavar="FORMAT.md",
                    help="also check that every printed block appears verbatim in this spec file")
    a = ap.parse_args(argv)
    build(a.out)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        walk(a.out)
        print()
        kquant_example()
        print()
        fields_example()
    text = buf.getvalue()
    print(text, end="")
    if a.check:
        spec = open(a.check, encoding="utf-8").read()
        stale = [k for k, body in sections(text).items() if body not in spec]
        if stale:
            print(f"\n{a.check}: section(s) {', '.join(stale)} differ from this output", file=sys.stderr)
            return 1
        print(f"\n{a.check}: every block of sections 9, 5.10 and 5.11 matches this output", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
