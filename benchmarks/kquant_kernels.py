"""One product at a time: fused mode's k-quant kernels against the dense bf16 product they replace.

A layer's worth of expert matrices (MATRICES of hidden x intermediate, as the runtime benchmark's model has 4 layers
of 8 experts) is held three ways: dense bf16 (what transformers multiplies by), and k-quant at 3 and 2 bits and
ternary (packed codes and scales, as fused mode holds a ``--bits`` file's records). Each timing cycles through all
the matrices, so that they come from memory as in decoding (dense: 2 bytes a weight; q3: 3.3 bits), for x @ W.T
(the input matrices) and h @ W (the output matrix), at 1, 2 and 8 tokens, with 1 and 2 threads. Results go to
results/kquant_kernels.json and results/KQUANT_KERNELS.md.

    python benchmarks/kquant_kernels.py [--hidden 1024] [--inter 3584] [--matrices 32]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from provenance import RUNS, collect, markdown  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WIDTHS = ("q3", "q2", "ternary")
TOKENS = (1, 2, 8)
THREADS = (1, 2)


def timed(fn, runs: int) -> float:
    """Median seconds of ``runs`` calls of ``fn`` after one warm-up call."""
    fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=3584)
    ap.add_argument("--matrices", type=int, default=32)
    ap.add_argument("--runs", type=int, default=max(RUNS, 5))
    a = ap.parse_args(argv)
    from resmoe_format.codecs import kquant
    from resmoe_format.codecs.kquant import KqLayout
    from resmoe_format.torch import native
    from resmoe_format.torch.kquant import PackedValues

    if not native.available():
        raise SystemExit(f"the kernels are not available: {native.unavailable_reason()}")
    prov = collect(("torch", "numpy"), timing_runs=a.runs, kq_avx512=native.uses_kq_avx512(),
                   kq_dpbf16=native.uses_kq_dpbf16())
    layout = KqLayout(64, 4, 6)
    rng = np.random.default_rng(0)
    shape = (a.inter, a.hidden)  # canonical (neurons, hidden): x @ W.T for inputs, h @ W for the output
    dense = [torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 0.02).to(torch.bfloat16)
             for _ in range(a.matrices)]
    dense_t = [w.T.contiguous() for w in dense]  # the output product as one pass over rows (the runtime's layout)
    packed = {}
    for vd in WIDTHS:
        mats = []
        for w in dense[:4]:  # quantizing is slow: four distinct matrices, repeated (same bytes read per product)
            codes, grid = kquant.quantize(w.float().numpy().reshape(-1), vd, layout)
            mats.append(PackedValues.from_parts(kquant.parts_of(codes, grid, vd, layout), "values", shape, vd, layout,
                                                dtype=torch.bfloat16))
        packed[vd] = [PackedValues(p.codes.clone(), p.pairs.clone(), p.supers.clone(), p.value_dtype, p.layout,
                                   p.shape, p.dtype) for _ in range(a.matrices // 4) for p in mats]
    rows = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for T in TOKENS:
            x = torch.randn(T, a.hidden).to(torch.bfloat16)
            h = torch.randn(T, a.inter).to(torch.bfloat16)
            cases = {"dense bf16": (lambda x=x: [native.dense_bf16_linear(x, w) for w in dense],
                                    lambda h=h: [native.dense_bf16_linear(h, w) for w in dense_t],
                                    2 * shape[0] * shape[1])}
            for vd, mats in packed.items():
                cases[vd] = (lambda mats=mats, x=x: [p.linear(x) for p in mats],
                             lambda mats=mats, h=h: [p.rlinear(h) for p in mats], mats[0].nbytes())
            for name, (fin, fout, nbytes) in cases.items():
                t_in, t_out = timed(fin, a.runs) / a.matrices, timed(fout, a.runs) / a.matrices
                rows.append({"threads": threads, "tokens": T, "storage": name, "bytes": nbytes, "in_ms": 1e3 * t_in,
                             "out_ms": 1e3 * t_out, "in_gweights_s": shape[0] * shape[1] / t_in / 1e9,
                             "out_gweights_s": shape[0] * shape[1] / t_out / 1e9})
                print(rows[-1], flush=True)
    res = {"provenance": prov, "meta": {"shape": shape, "matrices": a.matrices}, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kquant_kernels.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "KQUANT_KERNELS.md").write_text(report(res))
    print(report(res))
    return 0


def report(res: dict) -> str:
    m, rows = res["meta"], res["rows"]
    dense = {(r["threads"], r["tokens"]): r for r in rows if r["storage"] == "dense bf16"}
    lines = ["# k-quant kernels against the dense bf16 product (`benchmarks/kquant_kernels.py`)", "",
             f"{m['matrices']} matrices of {m['shape'][0]} x {m['shape'][1]} (neurons x hidden) held as dense bf16 "
             "or as k-quant records (packed codes, one byte per group scale and offset code, float16 super-block "
             "scales); each timing cycles through all of them, so they are read from memory as in decoding. "
             "`x @ W.T` is an input matrix's product (gate, up), `h @ W` the output matrix's; bf16 activations. "
             "Dense: the runtime's one-pass bf16 kernel (`native.dense_bf16_linear`, vdpbf16ps; the output matrix "
             "held transposed). Times are per matrix; 'vs dense' is the dense time over the k-quant time.", "",
             "| threads | tokens | storage | bytes a matrix | x @ W.T ms | vs dense | h @ W ms | vs dense | "
             "G weights/s (x @ W.T) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = dense[r["threads"], r["tokens"]]
        lines.append(f"| {r['threads']} | {r['tokens']} | {r['storage']} | {r['bytes'] / 2**20:.2f} MiB | "
                     f"{r['in_ms']:.3f} | {d['in_ms'] / r['in_ms']:.2f}x | {r['out_ms']:.3f} | "
                     f"{d['out_ms'] / r['out_ms']:.2f}x | {r['in_gweights_s']:.1f} |")
    lines += ["", "The dense product is bound by the bytes it reads (2 a weight); the k-quant kernels read about a "
              "sixth of them and are bound by the instructions that turn codes into bf16 words (vpermb, vpsrlvw or "
              "the ternary digits' arithmetic, a constant table of levels) and by the dot products (vdpbf16ps; "
              "`h @ W` also rounds each h[r] times its group's scale to bf16 and interleaves pairs of rows). Fused "
              "mode multiplies by the barycenter and by each routed expert's residual, so a token touches more "
              "weights than in the dense model (RUNTIME_BF16.md).", "", markdown(res["provenance"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
