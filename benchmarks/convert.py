"""End-to-end conversion benchmark: time and peak RSS against the number of layers.

Writes synthetic Mixtral-format checkpoints (hub tensor names, one safetensors shard per
layer plus model.safetensors.index.json, bf16, upcycled experts: one base with neurons
permuted per expert plus noise) of 2 to 32 layers, converts each three times with
resmoe-convert, each in a fresh process, and records the median wall time and peak RSS of
that process (with their ranges), next to the peak RSS of a process that only imports the
converter. Streaming means the peak stays about flat as layers are added. Results:
benchmarks/results/convert.{json,md,png}.

    python benchmarks/convert.py [--quick] [--hidden 512 --inter 1792 --experts 8]

With ``--calibration FILE`` every checkpoint also gets a character-level tokenizer.json and each
conversion runs ``--calibration FILE`` (give ``--flags --bits B``): the source model then runs one
decoder layer at a time, and the results go to convert[_style]_calibrated.*.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import RUNS, collect, markdown, spread

RESULTS = Path(__file__).parent / "results"


def write_checkpoint(d: Path, layers: int, hidden: int, inter: int, experts: int, style: str = "mixtral") -> int:
    """A sharded bf16 checkpoint written one layer (shard) at a time; returns its bytes."""
    from converters.example import write_mixtral_checkpoint

    return write_mixtral_checkpoint(d, layers, hidden, inter, experts, vocab=4096, sharded=True, style=style)


CHILD = """
import resource, sys
from converters.cli.convert import main
try:
    rc = main(sys.argv[2:])
finally:
    open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
sys.exit(rc)
"""
# the same process with the converter's module imports done (torch among them) and nothing converted
BASELINE = """
import resource, sys
import converters.cli.convert, converters.convert
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def baseline_rss_mib(tmp: Path) -> float:
    """Peak RSS of a fresh interpreter that imports the converter (with torch) and converts nothing."""
    f = tmp / "baseline.peak"
    subprocess.run([sys.executable, "-c", BASELINE, str(f)], check=True)
    return int(f.read_text()) / 1024


def run_convert(src: Path, out: Path, flags: list[str]) -> dict:
    """resmoe-convert in a fresh process: wall seconds and that process's own peak RSS."""
    rep, peak_file = out.with_suffix(".json"), out.with_suffix(".peak")
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, str(peak_file), str(src), str(out), "-q", "--report", str(rep),
                    *flags], check=True)
    seconds = time.perf_counter() - t0
    report = json.loads(rep.read_text())
    return {"seconds": seconds, "peak_rss_mib": int(peak_file.read_text()) / 1024,
            "file_bytes": out.stat().st_size, "rel_error_mean": report["summary"]["rel_error_mean"],
            "expert_bytes_fraction": report["summary"]["expert_bytes_fraction"],
            "layer_seconds": [lay["seconds"] for lay in report["layers"]]}


def char_tokenizer(text: str) -> str:
    """tokenizer.json of a tokenizer with one token per character of ``text`` (no merges)."""
    from tokenizers import Tokenizer, models

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(sorted(set(text)))}}
    return Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]")).to_str()


def run_rows(a: argparse.Namespace, counts: list[int], tmp: Path) -> list[dict]:
    """Per layer count: one checkpoint, RUNS conversions; medians and ranges of time and peak RSS."""
    rows = []
    flags = [*a.flags, *(["--calibration", str(a.calibration)] if a.calibration else [])]
    for n in counts:
        src = tmp / f"ckpt{n}"
        size = write_checkpoint(src, n, a.hidden, a.inter, a.experts, a.style)
        if a.calibration:
            (src / "tokenizer.json").write_text(char_tokenizer(Path(a.calibration).read_text()))
        runs = [run_convert(src, tmp / f"m{n}.rmoe", flags) for _ in range(RUNS)]
        one_layer = a.experts * 3 * a.hidden * a.inter * 2
        r = {k: runs[-1][k] for k in ("file_bytes", "rel_error_mean", "expert_bytes_fraction", "layer_seconds")}
        r.update({"layers": n, "checkpoint_bytes": size, "layer_expert_bytes": one_layer,
                  "seconds": spread([x["seconds"] for x in runs]),
                  "peak_rss_mib": spread([x["peak_rss_mib"] for x in runs])})
        rows.append(r)
        print(f"{n:3d} layers: {size / 2**20:8.1f} MiB in, {r['file_bytes'] / 2**20:8.1f} MiB out, "
              f"{r['seconds']['median']:7.1f} s, peak RSS {r['peak_rss_mib']['median']:7.1f} MiB", flush=True)
        shutil.rmtree(src)
    return rows


def readme_sentence(rows: list[dict], style: str, prov: dict) -> str:
    """The README's figures for one style: peak RSS range and seconds per layer."""
    peak = [r["peak_rss_mib"]["median"] for r in rows]
    per_layer = [r["seconds"]["median"] / r["layers"] for r in rows]
    return (f"peak RSS {min(peak):.0f}-{max(peak):.0f} MiB from {rows[0]['layers']} to {rows[-1]['layers']} layers "
            f"({rows[0]['checkpoint_bytes'] / 2**20:.0f} to {rows[-1]['checkpoint_bytes'] / 2**20:.0f} MiB of "
            f"{style} checkpoint), {min(per_layer):.1f}-{max(per_layer):.1f} s per layer on "
            f"{prov['cpus_usable']} CPU cores (median of {RUNS} runs)")


def report(res: dict, tag: str) -> str:
    """CONVERT.md, entirely from ``res``."""
    shape, rows, prov, base = res["shape"], res["rows"], res["provenance"], res["baseline_rss_mib"]
    flags = " ".join(res["flags"]) or "(defaults: --method resmoe --keep 0.25)"
    lines = ["# End-to-end conversion: time and peak RSS", "",
             f"Synthetic bf16 {res['style']} checkpoints (hub names), one shard per layer: {shape['experts']} experts, "
             f"hidden {shape['hidden']}, intermediate {shape['intermediate']} (upcycled: permuted copies of one base "
             f"plus noise). `resmoe-convert SRC OUT {flags}`, {RUNS} runs per checkpoint, each in a fresh process; "
             "seconds and peak RSS (getrusage of that process) are the median of the runs, with their range.", "",
             f"In the README: {res['readme']}", "",
             "| layers | checkpoint MiB | .rmoe MiB | expert bytes kept | rel. error | seconds (range) | s/layer "
             "| peak RSS MiB (range) | x one layer's bf16 experts |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, m = r["seconds"], r["peak_rss_mib"]
        lines.append(f"| {r['layers']} | {r['checkpoint_bytes'] / 2**20:.1f} | {r['file_bytes'] / 2**20:.1f} | "
                     f"{r['expert_bytes_fraction']:.1%} | {r['rel_error_mean']:.4f} | "
                     f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) | {t['median'] / r['layers']:.2f} | "
                     f"{m['median']:.0f} ({m['min']:.0f}-{m['max']:.0f}) | "
                     f"{m['median'] * 2**20 / r['layer_expert_bytes']:.1f} |")
    peak = [r["peak_rss_mib"]["median"] for r in rows]
    lines += ["", f"Peak RSS stays between {min(peak):.0f} and {max(peak):.0f} MiB while the checkpoint grows from "
              f"{rows[0]['checkpoint_bytes'] / 2**20:.0f} to {rows[-1]['checkpoint_bytes'] / 2**20:.0f} MiB. A fresh "
              "process that only imports the converter's modules (torch among them) peaks at "
              f"{base:.0f} MiB; the rest, "
              f"{min(peak) - base:.0f} to {max(peak) - base:.0f} MiB, is what converting adds.", "",
              f"![memory and time](convert{tag}.png)", "", markdown(prov)]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["layers"] for r in rows]
    ax[0].plot(xs, [r["peak_rss_mib"]["median"] for r in rows], "o-", label="peak RSS")
    ax[0].plot(xs, [r["checkpoint_bytes"] / 2**20 for r in rows], "s--", label="checkpoint size")
    ax[0].set_xlabel("layers"), ax[0].set_ylabel("MiB"), ax[0].set_xscale("log", base=2), ax[0].legend()
    ax[0].set_title("memory stays flat while the input grows")
    t = [r["seconds"] for r in rows]
    ax[1].errorbar(xs, [x["median"] for x in t], yerr=[[x["median"] - x["min"] for x in t],
                                                       [x["max"] - x["median"] for x in t]], fmt="o-", capsize=3)
    ax[1].set_xlabel("layers"), ax[1].set_ylabel("seconds (median, range)"), ax[1].set_xscale("log", base=2)
    ax[1].set_title("conversion time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 and 4 layers only; writes *_quick files")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1792)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, nargs="*", default=[2, 4, 8, 16, 32])
    ap.add_argument("--style", default="mixtral", choices=("mixtral", "qwen3_moe"),
                    help="checkpoint names/config; results of a non-default style go to convert_<style>.*")
    ap.add_argument("--calibration", metavar="FILE.txt", help="calibrate on this text (with --flags --bits B)")
    ap.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="extra resmoe-convert flags")
    a = ap.parse_args()
    counts = [2, 4] if a.quick else a.layers
    tag = (("" if a.style == "mixtral" else f"_{a.style}") + ("_calibrated" if a.calibration else "")
           + ("_quick" if a.quick else ""))
    prov = collect(("torch", "numpy", "scipy", "safetensors"))
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        base = baseline_rss_mib(Path(tmp))
        rows = run_rows(a, counts, Path(tmp))
    flags = a.flags + (["--calibration", a.calibration] if a.calibration else [])
    res = {"provenance": prov, "style": a.style, "flags": flags, "baseline_rss_mib": base,
           "shape": {"hidden": a.hidden, "intermediate": a.inter, "experts": a.experts}, "rows": rows,
           "readme": readme_sentence(rows, a.style, prov)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"convert{tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / f"CONVERT{tag.upper()}.md").write_text(report(res, tag))
    plot(rows, RESULTS / f"convert{tag}.png")


if __name__ == "__main__":
    main()
