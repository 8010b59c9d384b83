"""Container benchmark: streaming writes keep memory at about one layer, reads are mmapped.

For synthetic files of 2 to 32 MoE layers (8 experts, hidden 512, intermediate 1408,
bf16 residuals at 25% density, bitmap-encoded), each phase runs three times, each in a fresh
process, and reports the median seconds and peak RSS with their range: writing, opening,
verifying every checksum, and restoring every tensor layer by layer. Results go to
benchmarks/results/container.{json,md}.

    python benchmarks/container.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import RUNS, collect, markdown, spread

RESULTS = Path(__file__).parent / "results"
SHAPE = dict(experts=8, hidden=512, inter=1408, density=0.25)


def _phase(phase: str, path: str, layers: int) -> dict:
    import numpy as np

    import resmoe_format
    from resmoe_format import MatrixSpec, MoELayer, SourceSpec, Writer, codecs, restore

    E, H, I, d = SHAPE["experts"], SHAPE["hidden"], SHAPE["inter"], SHAPE["density"]
    t0 = time.perf_counter()
    out: dict = {}
    if phase == "write":
        rng = np.random.default_rng(0)
        shapes = {"w1": (I, H), "w3": (I, H), "w2": (H, I)}
        with Writer(path, {"architecture": "bench"}) as w:
            for i in range(layers):
                base = {n: codecs.encode(rng.standard_normal(s).astype(np.float32), "dense", "bf16")
                        for n, s in shapes.items()}
                res = []
                for _ in range(E):
                    r = {}
                    for n, s in shapes.items():
                        x = rng.standard_normal(s).astype(np.float32)
                        x[rng.random(s) >= d] = 0
                        r[n] = codecs.encode(x, "bitmap", "bf16")
                    res.append(r)
                mats = [MatrixSpec(n, s, "bf16", 0 if n != "w2" else 1) for n, s in shapes.items()]
                srcs = [SourceSpec(f"l{i}.e{k}.{n}", "bf16", s, k, [n]) for k in range(E) for n, s in shapes.items()]
                w.add_layer(MoELayer(i, I, mats, "barycenter", base, res, [rng.permutation(I) for _ in range(E)],
                                     srcs))
                del base, res
        out["file_bytes"] = os.path.getsize(path)
    elif phase == "open":
        with resmoe_format.open(path) as r:
            out["tensors"] = len(r.tensor_names)
    elif phase == "verify":
        with resmoe_format.open(path) as r:
            r.verify()
    elif phase == "restore":
        n = 0
        with resmoe_format.open(path) as r:
            for _, a in restore.restore_all(r, original_order=True):
                n += a.nbytes
        out["restored_bytes"] = n
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run(layers_list: list[int]) -> dict:
    prov = collect(("numpy",))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # baseline: the interpreter with numpy + resmoe_format imported and nothing done
        base = spread([_child("open-none", "", 0)["peak_rss_mib"] for _ in range(RUNS)])
        for L in layers_list:
            path = str(Path(tmp) / f"b{L}.rmoe")
            row = {"layers": L}
            for phase in ("write", "open", "verify", "restore"):
                runs = []
                for _ in range(RUNS):
                    if phase == "write" and os.path.exists(path):
                        os.unlink(path)
                    runs.append(_child(phase, path, L))
                row[phase] = {**runs[-1], "seconds": spread([r["seconds"] for r in runs]),
                              "peak_rss_mib": spread([r["peak_rss_mib"] for r in runs])}
                print(f"layers={L:3d} {phase:8s} {row[phase]['seconds']['median']:.3f} s", flush=True)
            os.unlink(path)
            rows.append(row)
    return {"provenance": prov, "shape": SHAPE, "import_baseline_rss_mib": base, "rows": rows}


def _child(phase: str, path: str, layers: int) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import container as c; "
            f"print(json.dumps(c._phase_or_none({phase!r}, {path!r}, {layers})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _phase_or_none(phase: str, path: str, layers: int) -> dict:
    if phase == "open-none":
        import numpy  # noqa: F401

        import resmoe_format  # noqa: F401

        return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return _phase(phase, path, layers)


def report(res: dict) -> str:
    s = res["shape"]
    lines = [
        "# Container: streaming write, mmap read",
        "",
        f"Synthetic layers: {s['experts']} experts, hidden {s['hidden']}, intermediate {s['inter']}, bf16 "
        f"residuals at density {s['density']} (bitmap). Each phase {RUNS} times, each in a fresh process; peak "
        "RSS from getrusage; seconds and peak RSS are the median of the runs (seconds with their range). "
        f"Interpreter + numpy + resmoe_format alone: {res['import_baseline_rss_mib']['median']:.0f} MiB.",
        "",
        "| layers | file MiB | write s | write peak RSS MiB | open ms | verify s (GB/s) | verify peak RSS MiB | "
        "restore s | restore peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def sec(x: dict, scale: float = 1.0, fmt: str = ".2f") -> str:
        return f"{scale * x['median']:{fmt}} ({scale * x['min']:{fmt}}-{scale * x['max']:{fmt}})"

    for r in res["rows"]:
        mib = r["write"]["file_bytes"] / 2**20
        v = r["verify"]["seconds"]
        lines.append(f"| {r['layers']} | {mib:.1f} | {sec(r['write']['seconds'])} | "
                     f"{r['write']['peak_rss_mib']['median']:.0f} | {sec(r['open']['seconds'], 1000, '.1f')} | "
                     f"{sec(v)} ({r['write']['file_bytes'] / v['median'] / 1e9:.2f}) | "
                     f"{r['verify']['peak_rss_mib']['median']:.0f} | {sec(r['restore']['seconds'])} | "
                     f"{r['restore']['peak_rss_mib']['median']:.0f} |")
    first, last = res["rows"][0], res["rows"][-1]
    grow = last["write"]["peak_rss_mib"]["median"] - first["write"]["peak_rss_mib"]["median"]
    lines += ["", f"Write peak RSS grows by {grow:.0f} MiB from {first['layers']} to {last['layers']} layers while "
              f"the file grows by {(last['write']['file_bytes'] - first['write']['file_bytes']) / 2**20:.0f} MiB: "
              "the writer holds one layer, the rest is on disk. Verify and restore read through the mmap and "
              "release the file pages they touched after each layer (and every 64 MiB of checksummed "
              "data), so their RSS also stays near one layer's worth.", "", markdown(res["provenance"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 and 4 layers only; writes *_quick files")
    a = ap.parse_args()
    res = run([2, 4] if a.quick else [2, 8, 32])
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if a.quick else ""
    (RESULTS / f"container{suffix}.json").write_text(json.dumps(res, indent=2))
    (RESULTS / f"CONTAINER{suffix.upper()}.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
