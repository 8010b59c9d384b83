"""Bytes per element of each residual encoding against the mask-entropy bound, the ``auto``
choice, the entropy of the kept values, and encode/decode throughput.

A 1024 x 4096 Gaussian residual is magnitude-pruned to each density (an unstructured,
random-looking mask, as pruned residuals are). For every encoding the stored bytes are
measured by encoding for real. The mask bound is m*n*H(d)/8 + nnz*value_bytes (+ scales for
int8): no code for an unstructured mask that stores the kept values raw does better on
average. The values themselves are compressible (their empirical entropy is measured too), so
this is not a bound for codes that also entropy-code the values. Target: ``auto`` within 5% of
the mask bound at every density; the script exits 1 otherwise.

    python benchmarks/encoding_sizes.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from provenance import RUNS, collect, markdown, repeat, spread
from tqdm import tqdm

from resmoe_format import codecs
from resmoe_format.codecs import AUTO_BSR_BLOCKS, Quant

RESULTS = Path(__file__).parent / "results"
DENSITIES = (0.01, 0.02, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.40, 0.50)
SHAPE = (1024, 4096)
VALUE = {"bf16": (None, 16), "int8": (Quant("per_row"), 8)}


def pruned(rng: np.random.Generator, shape, density: float) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    k = int(round(density * x.size))
    thr = np.partition(np.abs(x).reshape(-1), x.size - k)[x.size - k]
    return np.where(np.abs(x) >= thr, x, np.float32(0))


def entropy_bits(d: float) -> float:
    return 0.0 if d in (0.0, 1.0) else -(d * math.log2(d) + (1 - d) * math.log2(1 - d))


def encodings_to_try():
    yield "dense", {}
    yield "bitmap", {}
    yield "csr16", {}
    yield "rice", {}
    for bs in AUTO_BSR_BLOCKS:
        yield f"bsr{bs[0]}x{bs[1]}", {"block_shape": bs}


def sizes(x: np.ndarray, vd: str, quant) -> dict:
    m, n = x.shape
    nnz = int(np.count_nonzero(x))
    predicted = codecs.predict_sizes(x, vd, quant)
    row = {"nnz": nnz, "bits": {}}
    for label, params in encodings_to_try():
        enc = codecs.encode(x, "bsr" if label.startswith("bsr") else label, vd, quant, **params)
        assert enc.nbytes == predicted[label][0], (label, enc.nbytes, predicted[label][0])
        row["bits"][label] = 8 * enc.nbytes / (m * n)
    auto = codecs.encode(x, "auto", vd, quant)
    row["auto"] = {"encoding": auto.encoding, "params": auto.params, "bits": 8 * auto.nbytes / (m * n)}
    scale_bits = 0 if quant is None else 32 * m / (m * n)
    row["bound_bits"] = entropy_bits(nnz / (m * n)) + nnz * VALUE[vd][1] / (m * n) + scale_bits
    row["value_entropy_bits"] = value_entropy(x, vd, quant)
    row["best"] = min(row["bits"], key=row["bits"].get)
    row["auto_over_best"] = row["auto"]["bits"] / row["bits"][row["best"]] - 1
    row["auto_over_bound"] = row["auto"]["bits"] / row["bound_bits"] - 1
    return row


def value_entropy(x: np.ndarray, vd: str, quant) -> float:
    """Empirical entropy, in bits per kept value, of the stored value codes (bf16 or int8 bit patterns)."""
    v = np.ascontiguousarray(codecs.encode(x, "csr16", vd, quant).parts["values"])
    _, counts = np.unique(v.view(np.uint16 if v.itemsize == 2 else np.uint8), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def mbps(mb: float, fn) -> dict:
    """Throughput over RUNS runs of ``fn``: median MB/s and the range."""
    t = spread(repeat(fn, max(RUNS, 5))[0])
    return {"median": mb / t["median"], "min": mb / t["max"], "max": mb / t["min"]}


def throughput(x: np.ndarray) -> dict:
    out = {}
    mb = x.nbytes / 1e6
    for label, params in encodings_to_try():
        if label.startswith("bsr") and label != "bsr16x16":
            continue
        name = "bsr" if label.startswith("bsr") else label
        enc = codecs.encode(x, name, "bf16", **params)
        out[label] = {"encode_MBps": mbps(mb, lambda n=name, p=params: codecs.encode(x, n, "bf16", **p)),
                      "decode_MBps": mbps(mb, lambda e=enc: codecs.decode(e))}
    return out


def run(quick: bool) -> dict:
    rng = np.random.default_rng(0)
    shape = (256, 1024) if quick else SHAPE
    res = {"provenance": collect(("numpy", "ml_dtypes")), "shape": list(shape), "densities": list(DENSITIES),
           "sizes": {}, "throughput": {}}
    mats = {d: pruned(rng, shape, d) for d in DENSITIES}
    for vd in VALUE:
        res["sizes"][vd] = [dict(density=d, **sizes(mats[d], vd, VALUE[vd][0]))
                            for d in tqdm(DENSITIES, desc=f"sizes {vd}")]
    for d in tqdm((0.05, 0.25, 0.5), desc="throughput"):
        res["throughput"][str(d)] = throughput(mats[d])
    res["target_met"] = all(r["auto_over_bound"] <= 0.05 for rows in res["sizes"].values() for r in rows)
    res["worst_auto_over_bound"] = max(r["auto_over_bound"] for rows in res["sizes"].values() for r in rows)
    res["readme"] = readme_sentence(res)
    return res


def readme_sentence(res: dict) -> str:
    """The README's sentence about ``auto`` against the mask bound."""
    ds = res["densities"]
    bf = [r["value_entropy_bits"] for r in res["sizes"]["bf16"]]
    return (f"Measured on pruned Gaussian residuals, `auto` stays within "
            f"{100 * res['worst_auto_over_bound']:.1f}% of the mask-entropy bound (mask entropy + raw value bits, "
            f"the least any code storing the values raw needs) from {ds[0]:.0%} to {ds[-1]:.0%} density; the kept "
            f"bf16 values themselves carry only {min(bf):.1f}-{max(bf):.1f} bits of entropy, which no encoding "
            "here exploits")


def report(res: dict) -> str:
    labels = [lab for lab, _ in encodings_to_try()]
    m, n = res["shape"]
    out = ["# Residual encodings: bits per element", "",
           f"Matrix {m} x {n}, Gaussian, magnitude-pruned to each density. Bits per element = stored bits / "
           f"(m n), measured by encoding. Mask bound = H(d) + d * value bits (+ per-row fp32 scales for int8), "
           "with H the binary entropy of the density: the least any code of an unstructured mask needs when it "
           "stores the kept values raw (16 bits for bf16, 8 for int8). It is not a bound for a code that also "
           "compresses the values: the last column gives the empirical entropy of the stored value codes (bits "
           "per kept value), below the raw width.", "", f"In the README: {res['readme']}", ""]
    for vd, rows in res["sizes"].items():
        out += [f"## values {vd}", "", "| density | " + " | ".join(labels) + " | mask bound | auto picks | auto bits | "
                "auto vs best | auto vs mask bound | value entropy (bits per kept value) |",
                "|---:|" + "---:|" * (len(labels) + 6)]
        for r in rows:
            auto = r["auto"]["encoding"] + ("{}x{}".format(*r["auto"]["params"]["block_shape"])
                                            if r["auto"]["encoding"] == "bsr" else "")
            out.append(f"| {r['density']:.2f} | " + " | ".join(f"{r['bits'][lab]:.3f}" for lab in labels)
                       + f" | {r['bound_bits']:.3f} | {auto} | {r['auto']['bits']:.3f} | "
                       f"{100 * r['auto_over_best']:+.1f}% | {100 * r['auto_over_bound']:+.1f}% | "
                       f"{r['value_entropy_bits']:.2f} |")
        out.append("")
    out += [f"## Throughput (MB/s of dense float32 input, median of {max(RUNS, 5)} runs, bf16 values)", "",
            "| density | " + " | ".join(f"{lab} enc | {lab} dec" for lab in res["throughput"]["0.05"]) + " |",
            "|---:|" + "---:|" * (2 * len(res["throughput"]["0.05"]))]
    for d, t in res["throughput"].items():
        out.append(f"| {d} | " + " | ".join(f"{v['encode_MBps']['median']:.0f} | {v['decode_MBps']['median']:.0f}"
                                             for v in t.values()) + " |")
    out += ["", f"Target (auto within 5% of the mask bound at every density): "
            f"**{'met' if res['target_met'] else 'NOT met'}** (worst: {100 * res['worst_auto_over_bound']:+.1f}%). "
            "auto computes every candidate's exact size from the mask before encoding, so it always picks "
            "the smallest. Versus the mask bound: rice (Golomb-Rice coded gaps) follows H(d) closely at low "
            "density, where fixed-rate index codes (16 bits per kept entry for csr16, 1 bit per element for "
            "bitmap) waste bits; bitmap's mask cost equals H(d) at d = 1/2. Every encoding stores values at their "
            "raw width, so none approaches the lower total that entropy-coded values would allow.", "",
            markdown(res["provenance"])]
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res["sizes"]), figsize=(12, 4.5), sharey=False)
    for ax, (vd, rows) in zip(axes, res["sizes"].items()):
        d = [r["density"] for r in rows]
        for lab, _ in encodings_to_try():
            ax.plot(d, [r["bits"][lab] for r in rows], marker=".", label=lab)
        ax.plot(d, [r["bound_bits"] for r in rows], "k--", label="mask bound (raw values)")
        ax.plot(d, [r["auto"]["bits"] for r in rows], "ko", mfc="none", ms=10, label="auto's choice")
        ax.set_title(f"values {vd}")
        ax.set_xlabel("density (fraction of residual kept)")
        ax.set_ylabel("bits per element")
        ax.set_ylim(0, VALUE[vd][1] * 1.15)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 256 x 1024 matrix (seconds)")
    a = ap.parse_args()
    res = run(a.quick)
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if a.quick else ""
    (RESULTS / f"encodings{suffix}.json").write_text(json.dumps(res, indent=2))
    (RESULTS / f"ENCODINGS{suffix.upper()}.md").write_text(report(res))
    plot(res, RESULTS / f"encodings{suffix}.png")
    print(report(res))
    return 0 if res["target_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
