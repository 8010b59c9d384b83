"""Build the worked example of spec/FORMAT.md section 10 and print it field by field.

    python spec/worked_example.py example.rmoe

One MoE layer, 2 experts, 3 hidden neurons, hidden size 4, source dtype bf16. The
numbers printed here are the ones the spec shows.
"""
from __future__ import annotations

import json
import struct
import sys

import numpy as np

import resmoe_format
from resmoe_format import MatrixSpec, MoELayer, SourceSpec, Writer, codecs, restore


def build(path: str) -> None:
    w1_base = np.array([[0.5, -1.0, 0.25, 2.0], [1.0, 0.0, -0.5, 0.75], [-2.0, 1.5, 0.0, 1.0]], np.float32)
    w2_base = np.array([[1.0, 0.5, -1.0], [0.0, 2.0, 0.25], [-0.5, 1.0, 1.5], [0.75, -0.25, 0.0]], np.float32)
    # expert 0: residual with two entries in w1 and one in w2 (csr16); expert 1: bitmap
    r0_w1 = np.zeros((3, 4), np.float32)
    r0_w1[0, 1], r0_w1[2, 3] = 0.125, -0.375
    r0_w2 = np.zeros((4, 3), np.float32)
    r0_w2[1, 0] = 0.5
    r1_w1 = np.zeros((3, 4), np.float32)
    r1_w1[1, 0], r1_w1[1, 2], r1_w1[2, 1] = -0.25, 0.0625, 1.0
    r1_w2 = np.zeros((4, 3), np.float32)
    r1_w2[3, 2] = -1.5
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


def compact_json(doc) -> str:
    """Indented JSON with short lists and small objects kept on one line."""
    def fmt(v, ind):
        one = json.dumps(v)
        if len(one) + ind <= 100:
            return one
        pad = " " * (ind + 2)
        if isinstance(v, dict):
            return "{\n" + ",\n".join(f"{pad}{json.dumps(k)}: {fmt(x, ind + 2)}" for k, x in v.items()) + "\n" + " " * ind + "}"
        if isinstance(v, list):
            return "[\n" + ",\n".join(pad + fmt(x, ind + 2) for x in v) + "\n" + " " * ind + "]"
        return one
    return fmt(doc, 0)


def walk(path: str) -> None:
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    print(f"file size: {len(raw)} bytes")
    print(f"bytes 0..7 (header length N, u64 little-endian): {raw[:8].hex(' ')}  -> N = {n}")
    print(f"data buffer: bytes {8 + n}..{len(raw) - 1} ({len(raw) - 8 - n} bytes)\n")
    head = json.loads(raw[8:8 + n])
    meta = head.pop("__metadata__")
    print("__metadata__ (rmoe_schema shown parsed):")
    print(json.dumps({k: v for k, v in meta.items() if k != "rmoe_schema"}, indent=2))
    print("rmoe_schema =")
    print(compact_json(json.loads(meta["rmoe_schema"])))
    print("\ntensors in data order:")
    print(f"{'name':40s} {'dtype':5s} {'shape':10s} {'data_offsets':14s} bytes (hex)")
    for name, e in sorted(head.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, end = e["data_offsets"]
        print(f"{name:40s} {e['dtype']:5s} {str(e['shape']):10s} {str([b, end]):14s} {raw[8 + n + b: 8 + n + end].hex(' ')}")
    with resmoe_format.open(path) as r:
        r.verify()
        print("\nchecksums tensor (u32 crc32 of each other tensor, in data order):",
              [f"{c:08x}" for c in r.tensor("rmoe.checksums").tolist()])
        for k in range(2):
            for m in ("w1", "w2"):
                print(f"\nexpert {k} {m}: residual decoded (float32):\n{r.residual(0, k, m)}")
                print(f"expert {k} {m}: restored, barycenter order (bf16 -> float32):\n"
                      f"{restore.restore_matrix(r, 0, k, m).astype(np.float32)}")
                print(f"expert {k} {m}: restored, original order:\n"
                      f"{restore.restore_matrix(r, 0, k, m, original_order=True).astype(np.float32)}")


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "example.rmoe"
    build(out)
    walk(out)
