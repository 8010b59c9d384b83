"""One command for every evaluation result: error tables, held-out perplexity, llama.cpp quantization.

For each trained fixture in ``benchmarks/fixtures/`` (see ``train_fixtures.py``):

- converts it with every method (``resmoe``, ``resmoe-svd``, ``prune``, ``svd``, ``merge``) at
  ``--keep`` 0.25 and 0.50 (equal total size) and, for all but merge (which stores no
  residual), at the paper's ``--residual-keep`` 0.10, 0.25 and 0.50 (for prune and svd, whose
  residual is the expert itself, that equals ``--keep``); plus ``resmoe-int8`` (int8 residual values and an
  int8 barycenter, ``--value-dtype int8 --base-dtype int8``);
- records the mean relative Frobenius error of the restored experts (per layer and overall, as
  measured on the file by the converter), the true on-disk expert bytes (byte accounting), and
  the held-out perplexity per byte of the restored model (torch runtime, float32);
- exports the original model to GGUF and quantizes it with llama.cpp's own quantizer (q8_0,
  q4_k_m, q3_k_m, q2_k), measuring perplexity in llama.cpp and expert bytes from the GGUF's
  ``ffn_*_exps`` tensors.

Writes ``benchmarks/results/eval.json`` (rows ``{"fixture", "method", "keep", "residual_keep",
"expert_bytes", "bits_per_expert_weight", "ppl", ...}``), ``EVAL.md`` and ``eval_<fixture>.png``.

    python benchmarks/eval.py [--windows 64] [--fixture NAME]   (per fixture: results/eval_<NAME>.json)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
RESULTS = HERE / "results"
SEQ = 256
METHODS = {"resmoe": dict(method="resmoe"), "resmoe-svd": dict(method="resmoe", residual="svd"),
           "prune": dict(method="prune"), "svd": dict(method="svd"), "merge": dict(method="merge")}
KEEPS = (0.25, 0.5)
RESIDUAL_KEEPS = (0.1, 0.25, 0.5)
LLAMA_TYPES = ("q8_0", "q4_k_m", "q3_k_m", "q2_k")


def heldout_ids(windows: int) -> np.ndarray:
    text = (FIXTURES / "heldout.txt").read_bytes()
    return np.frombuffer(text[:windows * SEQ + 1], dtype=np.uint8).astype(np.int64)


def nll_from_logits(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood of ``targets`` under ``logits`` (T, V), in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(targets)), targets].sum())


def torch_ppl(model, ids: np.ndarray) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.size - 1, SEQ):
            x = torch.from_numpy(ids[i:i + SEQ + 1])[None]
            logits = model(input_ids=x[:, :-1]).logits[0].float().numpy()
            nll += nll_from_logits(logits, ids[i + 1:i + 1 + logits.shape[0]])
            n += logits.shape[0]
    return math.exp(nll / n)


def llama_ppl(path: Path, ids: np.ndarray) -> float:
    """Held-out perplexity in llama.cpp, each window from an empty context, all in one child process
    (``converters.exporters.llama_eval``: a crash there raises LlamaRunError instead of ending this run)."""
    from converters.exporters.llama_eval import run_llama

    windows = [ids[i:i + SEQ + 1] for i in range(0, ids.size - 1, SEQ)]
    logits = run_llama(path, [w[:-1].tolist() for w in windows], n_ctx=SEQ + 8).logits
    nll = sum(nll_from_logits(z, w[1:]) for z, w in zip(logits, windows))
    return math.exp(nll / sum(len(w) - 1 for w in windows))


#: llama.cpp evaluations that failed in this run, with their cause; main() lists them and exits with status 1.
LLAMA_FAILURES: list[str] = []


def llama_row(fixture: str, qtype: str, path: Path, ids: np.ndarray, weights: int) -> dict | None:
    """The row of one GGUF file, or None (recorded in LLAMA_FAILURES) if llama.cpp failed or crashed on it."""
    from converters.exporters.llama_eval import LlamaRunError

    eb = expert_bytes_gguf(path)
    try:
        ppl = llama_ppl(path, ids)
    except LlamaRunError as e:
        LLAMA_FAILURES.append(f"{fixture} {qtype}: {e}")
        print(f"{fixture}: llama.cpp {qtype}: FAILED: {e}", file=sys.stderr, flush=True)
        return None
    row = {"fixture": fixture, "method": qtype, "keep": None, "residual_keep": None, "expert_bytes": eb,
           "bits_per_expert_weight": 8 * eb / weights, "ppl": ppl}
    print(f"{fixture}: llama.cpp {qtype}: {row['bits_per_expert_weight']:.2f} bits/weight, ppl {ppl:.4f}", flush=True)
    return row


def expert_bytes_rmoe(path: Path) -> tuple[int, int]:
    """(on-disk expert bytes, expert weights) from the byte accounting."""
    import resmoe_format
    from resmoe_format.accounting import account

    with resmoe_format.open(path) as r:
        acc = account(r)
    return acc.expert_bytes, acc.expert_weights


def expert_bytes_gguf(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors if "_exps." in t.name)


def rmoe_row(fixture: str, method: str, src: Path, out: Path, ids: np.ndarray, keep=None, residual_keep=None,
             **extra) -> dict:
    from converters.convert import ConvertOptions, convert
    from resmoe_format.torch import load_model

    opts = {**METHODS[method.replace("-int8", "")], **extra}
    report = convert(src, out, ConvertOptions(keep=keep, residual_keep=residual_keep, **opts), progress=False)
    eb, weights = expert_bytes_rmoe(out)
    per_layer = [float(np.mean([e for s in lay["matrices"].values() for e in s["rel_error"]]))
                 for lay in report["layers"]]
    model = load_model(out, mode="materialize", dtype="fp32")
    row = {"fixture": fixture, "method": method, "keep": keep, "residual_keep": residual_keep, "expert_bytes": eb,
           "bits_per_expert_weight": 8 * eb / weights, "ppl": torch_ppl(model, ids),
           "rel_error": report["summary"]["rel_error_mean"], "rel_error_per_layer": per_layer,
           "achieved_keep": report["summary"]["keep"]}
    print(f"{fixture:18} {method:12} keep={keep} residual_keep={residual_keep}: error {row['rel_error']:.4f}, "
          f"{row['bits_per_expert_weight']:.2f} bits/weight, ppl {row['ppl']:.4f}", flush=True)
    return row


def evaluate(fixture: Path, windows: int, tmp: Path) -> list[dict]:
    import transformers

    from converters.convert import ConvertOptions, convert
    from converters.exporters.gguf_export import export_gguf

    name = fixture.name
    ids = heldout_ids(windows)
    rows = []
    lossless = tmp / f"{name}_lossless.rmoe"
    report = convert(fixture, lossless, ConvertOptions(lossless=True), progress=False)
    weights = report["summary"]["expert_params"]
    src_bytes = report["summary"]["expert_bytes_source"]
    model = transformers.AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32).eval()
    rows.append({"fixture": name, "method": "original", "keep": None, "residual_keep": None,
                 "expert_bytes": src_bytes, "bits_per_expert_weight": 8 * src_bytes / weights,
                 "ppl": torch_ppl(model, ids), "rel_error": 0.0})
    print(f"{name}: original ppl {rows[-1]['ppl']:.4f}", flush=True)
    for method in METHODS:
        for keep in KEEPS:
            rows.append(rmoe_row(name, method, fixture, tmp / "x.rmoe", ids, keep=keep))
    for method in ("resmoe", "resmoe-svd", "prune", "svd"):  # merge stores no residual: no such budget
        for rk in RESIDUAL_KEEPS:
            rows.append(rmoe_row(name, method, fixture, tmp / "x.rmoe", ids, residual_keep=rk))
    for keep in KEEPS:
        rows.append(rmoe_row(name, "resmoe-int8", fixture, tmp / "x.rmoe", ids, keep=keep, value_dtype="int8",
                             base_dtype="int8"))
    for t in ("f32",) + LLAMA_TYPES:
        row = llama_row(name, t, export_gguf(lossless, tmp / f"{name}_{t}.gguf", t), ids, weights)
        if row is not None:
            rows.append(row)
    return rows


def summary(rows: list[dict], fixture: str) -> str | None:
    """The README's sentence for one fixture: ResMoE against pruning at --keep 0.25, the best sparse
    method at up to 5 bits per expert weight, int8 ResMoE, and llama.cpp's q4_k_m and q2_k."""
    rs = [r for r in rows if r["fixture"] == fixture]

    def get(method: str, keep=None) -> dict | None:
        return next((r for r in rs if r["method"] == method and r.get("keep") == keep
                     and (keep is not None or r.get("residual_keep") is None)), None)

    orig, res, pr = get("original"), get("resmoe", 0.25), get("prune", 0.25)
    if not (orig and res and pr):
        return None
    ppl = "lower than" if res["ppl"] < pr["ppl"] else "higher than"
    out = (f"`{fixture}`: at `--keep 0.25` ResMoE's error is {res['rel_error']:.3f} against vanilla pruning's "
           f"{pr['rel_error']:.3f}, and its perplexity {res['ppl']:.2f} is {ppl} pruning's {pr['ppl']:.2f} "
           f"(original {orig['ppl']:.2f})")
    sparse = [r for r in rs if r["method"] in METHODS or r["method"] == "resmoe-int8"]
    small = [r for r in sparse if r["bits_per_expert_weight"] <= 5]
    if small:
        b = min(small, key=lambda r: r["ppl"])
        budget = f"keep {b['keep']:g}" if b.get("keep") is not None else f"residual-keep {b['residual_keep']:g}"
        out += (f"; the best sparse format at up to 5 bits per expert weight is {b['method']} at {budget} "
                f"({b['ppl']:.2f} at {b['bits_per_expert_weight']:.1f} bits)")
    i8 = get("resmoe-int8", 0.25)
    if i8:
        out += (f"; int8 values and barycenter (`resmoe-int8`) bring ResMoE at `--keep 0.25` to "
                f"{i8['bits_per_expert_weight']:.1f} bits at perplexity {i8['ppl']:.2f}")
    q = [r for t in ("q4_k_m", "q2_k") if (r := get(t))]
    if q:
        out += "; llama.cpp " + " and ".join(f"{r['method']} gives {r['ppl']:.3f} at "
                                             f"{r['bits_per_expert_weight']:.1f} bits" for r in q)
    return out + "."


def markdown(rows: list[dict], prov: dict, sources: dict) -> str:
    """EVAL.md, entirely from the rows and how they were made."""
    from provenance import markdown as how

    wins = {p.get("windows") for p in sources.values() if isinstance(p, dict) and "windows" in p}
    windows = (f"{wins.pop()} x {SEQ} bytes" if len(wins) == 1 and len(sources) == sum(
        "windows" in p for p in sources.values()) else f"`--windows` x {SEQ} bytes (64 windows by default; "
        "the count is not recorded for every fixture)")
    out = ["# Evaluation on the trained fixtures (`benchmarks/eval.py`)", "",
           f"Held-out text: the first {windows} of `benchmarks/fixtures/heldout.txt` "
           "(standard-library files never seen in training); perplexity per byte (uniform: 256). "
           "Relative error: mean relative Frobenius error of the restored expert matrices, measured on the "
           "file. Expert bytes: true on-disk bytes of the expert weights (byte accounting for .rmoe, the "
           "`ffn_*_exps` tensors for GGUF). No timings.", "", "## Summary (quoted in the README)", ""]
    out += [f"- {line}" for fx in sorted({r["fixture"] for r in rows}) if (line := summary(rows, fx))]
    out.append("")
    for fx in sorted({r["fixture"] for r in rows}):
        rs = [r for r in rows if r["fixture"] == fx]
        out += [f"## {fx}", "", "| method | keep | residual keep | relative error | expert MiB | bits / expert weight "
                "| held-out ppl |", "|---|---|---|---|---|---|---|"]
        for r in rs:
            err = "" if r.get("rel_error") is None else f"{r['rel_error']:.4f}"
            out.append(f"| {r['method']} | {r['keep'] if r['keep'] is not None else ''} | "
                       f"{r['residual_keep'] if r['residual_keep'] is not None else ''} | {err} | "
                       f"{r['expert_bytes'] / 2**20:.2f} | {r['bits_per_expert_weight']:.2f} | {r['ppl']:.4f} |")
        layered = [r for r in rs if r.get("rel_error_per_layer")]
        if layered:
            n = len(layered[0]["rel_error_per_layer"])
            out += ["", "Relative error per layer (Table-1 style):", "",
                    "| method | budget | " + " | ".join(f"layer {i}" for i in range(n)) + " | overall |",
                    "|---|---|" + "---|" * (n + 1)]
            for r in layered:
                budget = f"keep {r['keep']}" if r["keep"] is not None else f"residual-keep {r['residual_keep']}"
                out.append(f"| {r['method']} | {budget} | " + " | ".join(f"{e:.4f}" for e in r["rel_error_per_layer"])
                           + f" | {r['rel_error']:.4f} |")
        out += ["", f"![perplexity against bits per expert weight](eval_{fx}.png)", ""]
    out += [how(prov).replace("## How this was made", "## How this report was made"), "## Where the rows come from", ""]
    for name, p in sources.items():
        if "command" in p:
            dirty = " (uncommitted changes)" if p.get("git_dirty") else ""
            out.append(f"- `{name}`: `{p['command']}` at commit `{p['git_commit']}`{dirty}, {p['date_utc']}, "
                       f"{p['cpu']}, torch threads {p['torch_threads']}; "
                       + ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v))
        else:
            out.append(f"- `{name}`: written before provenance was recorded (last committed in "
                       f"`{p.get('last_commit')}`); rerun `python benchmarks/eval.py` to record it.")
    return "\n".join(out) + "\n"


# one colour and marker per method family (tab10 colours)
STYLE = {"resmoe": ("tab:blue", "o"), "resmoe-svd": ("tab:orange", "s"), "resmoe-int8": ("tab:cyan", "D"),
         "prune": ("tab:red", "v"), "svd": ("tab:purple", "^"), "merge": ("tab:brown", "X"),
         "llama.cpp": ("tab:green", "P")}
X_RANGE = (1.5, 9.0)  # bits per expert weight shown at least; wider where points lie outside


def plot_points(rows: list[dict]) -> dict[str, list[tuple[float, float, str]]]:
    """Per method family, the distinct (bits, ppl, label) points: a budget that gives the same file as
    another (prune/svd keep = residual-keep, merge at any keep) appears once, with both names."""
    series: dict[str, dict[tuple[float, float], list[str]]] = {}
    for r in rows:
        m = r["method"]
        if m in ("original", "f32"):
            continue
        fam = "llama.cpp" if m in LLAMA_TYPES else m
        if fam == "llama.cpp":
            label = m
        elif r.get("keep") is not None:
            label = f"keep {r['keep']:g}"
        else:
            label = f"rk {r['residual_keep']:g}"
        key = (round(r["bits_per_expert_weight"], 6), round(r["ppl"], 6))
        names = series.setdefault(fam, {}).setdefault(key, [])
        if label not in names:
            names.append(label)
    return {fam: sorted((b, p, " = ".join(n)) for (b, p), n in pts.items()) for fam, pts in series.items()}


def _place_labels(ax, points: list[tuple[float, float, str, str]], fontsize: float = 7) -> None:
    """Label each (x, y, text, colour) next to its point, choosing for each the first of a few offsets
    whose box overlaps no earlier label and no marker (greedy, in display points)."""
    fig = ax.figure
    scale = 72.0 / fig.dpi                              # display pixels to points
    xy = [ax.transData.transform((x, y)) * scale for x, y, _, _ in points]
    markers = [(px - 5, py - 5, px + 5, py + 5) for px, py in xy]
    placed: list[tuple[float, float, float, float]] = []
    offsets = [(5, 4), (5, -12), (-5, 4), (-5, -12), (5, 13), (5, -21), (-5, 13), (-5, -21)]

    def free(box) -> bool:
        return not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                       for b in placed + markers)

    for (x, y, text, color), (px, py) in zip(points, xy):
        w, h = 0.55 * fontsize * len(text), fontsize
        choice = offsets[0]
        for dx, dy in offsets:
            x0 = px + dx if dx > 0 else px + dx - w
            if free((x0, py + dy, x0 + w, py + dy + h)):
                choice = (dx, dy)
                break
        dx, dy = choice
        x0 = px + dx if dx > 0 else px + dx - w
        placed.append((x0, py + dy, x0 + w, py + dy + h))
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, color=color,
                    ha="left" if dx > 0 else "right", va="bottom")


def plot(rows: list[dict], fixture: str, path: Path) -> None:
    """Perplexity against bits per expert weight: one colour and marker per method, every point
    labelled, linear axes over the compressed range; the uncompressed rows as notes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["fixture"] == fixture]
    series = plot_points(rs)
    ref = {r["method"]: r for r in rs if r["method"] in ("original", "f32")}
    base = ref["original"]["ppl"] if "original" in ref else min(p for pts in series.values() for _, p, _ in pts)
    bits = [b for pts in series.values() for b, _, _ in pts]
    x0, x1 = min(X_RANGE[0], min(bits) - 0.3), max(X_RANGE[1], max(bits) + 0.6)
    # linear y over the useful range (points within 2x the original's perplexity); worse ones are listed
    y1 = 1.04 * max(p for pts in series.values() for _, p, _ in pts if p <= 2 * base)
    y0 = base - 0.06 * (y1 - base)
    fig, ax = plt.subplots(figsize=(11, 6.5))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    notes = []
    if "original" in ref:
        o = ref["original"]
        ax.axhline(o["ppl"], color="grey", lw=0.8, ls="--")
        notes.append(f"original ({o['bits_per_expert_weight']:.0f} bits per expert weight): ppl {o['ppl']:.3f} "
                     "(dashed line)")
    if "f32" in ref:
        notes.append(f"llama.cpp f32 ({ref['f32']['bits_per_expert_weight']:.0f} bits): ppl {ref['f32']['ppl']:.3f}")
    off_top, labels = [], []
    for fam, pts in series.items():
        color, marker = STYLE.get(fam, ("black", "*"))
        inside = [(b, p, lab) for b, p, lab in pts if p <= y1]
        ax.plot([b for b, _, _ in inside], [p for _, p, _ in inside], ls="-" if len(inside) > 1 else "none",
                lw=1, color=color, marker=marker, ms=7, label=fam, alpha=0.9)
        labels += [(b, p, lab, color) for b, p, lab in inside]
        for b, p, lab in pts:
            if p > y1:
                off_top.append((b, p, lab, fam, color, marker))
                ax.plot([b], [y1], marker=marker, color=color, ms=7, clip_on=False, mfc="none")
    _place_labels(ax, labels)
    if off_top:
        notes.append("off scale (open markers on the top edge):")
        notes += [f"  {fam} {lab}: ppl {p:.1f} at {b:.1f} bits" for b, p, lab, fam, _, _ in sorted(off_top)]
    if notes:
        ax.text(0.01, 0.975, "\n".join(notes), transform=ax.transAxes, fontsize=7, va="top", color="dimgrey",
                bbox=dict(boxstyle="round", fc="white", ec="lightgrey", alpha=0.9))
    ax.set_xlabel("bits per expert weight (on disk)")
    ax.set_ylabel("held-out perplexity per byte (lower is better)")
    ax.set_title(f"{fixture}: perplexity against size (rk = residual-keep)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# what a full run imports -> what provides it (pyproject extras, or a package)
NEEDS = {"matplotlib": "bench", "transformers": "hf", "gguf": "export", "llama_cpp": "llama-cpp-python"}


def missing_requirements(report_only: bool) -> str | None:
    """One line naming the missing modules and the pip install that provides them, or None."""
    import importlib.util

    need = ["matplotlib"] if report_only else list(NEEDS)
    miss = [m for m in need if importlib.util.find_spec(m) is None]
    if not miss:
        return None
    extras = sorted({NEEDS[m] for m in miss if m != "llama_cpp"})
    cmd = "pip install" + (f' -e ".[{",".join(extras)}]"' if extras else "") + (
        " llama-cpp-python" if "llama_cpp" in miss else "")
    return f"benchmarks/eval.py needs {', '.join(miss)}: run `{cmd}` first"


def read_results(path: Path) -> tuple[list[dict], dict | None]:
    """(rows, provenance) of a per-fixture results file; files written before provenance was recorded
    are a bare list of rows."""
    data = json.loads(path.read_text())
    return (data, None) if isinstance(data, list) else (data["rows"], data["provenance"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=64, help=f"held-out windows of {SEQ} bytes")
    ap.add_argument("--fixture", default=None, help="one fixture (default: all)")
    ap.add_argument("--report-only", action="store_true", help="rebuild eval.json, EVAL.md and the plots from "
                    "the per-fixture results/eval_<NAME>.json without evaluating")
    a = ap.parse_args(argv)
    problem = missing_requirements(a.report_only)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    from provenance import collect, last_commit

    prov = collect(("torch", "transformers", "numpy", "gguf", "llama_cpp"), seq=SEQ, timing_runs=None,
                   **({} if a.report_only else {"windows": a.windows}))
    warnings.simplefilter("ignore")
    fixtures = sorted(p for p in FIXTURES.iterdir() if (p / "train.json").exists())
    if a.fixture:
        fixtures = [p for p in fixtures if p.name == a.fixture]
    if a.report_only:
        fixtures = []
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for fx in fixtures:
            part = evaluate(fx, a.windows, Path(tmp))
            (RESULTS / f"eval_{fx.name}.json").write_text(
                json.dumps({"provenance": prov, "rows": part}, indent=1) + "\n")
    # eval.json, EVAL.md and the plots cover every fixture evaluated so far (one file per fixture)
    rows, sources = [], {}
    for f in sorted(RESULTS.glob("eval_*.json")):
        part, fprov = read_results(f)
        rows += part
        sources[f.name] = fprov or {"provenance": "not recorded", "last_commit": last_commit(f)}
    readme = [line for fx in sorted({r["fixture"] for r in rows}) if (line := summary(rows, fx))]
    (RESULTS / "eval.json").write_text(json.dumps({"provenance": prov, "sources": sources, "readme": readme,
                                                   "rows": rows}, indent=1) + "\n")
    (RESULTS / "EVAL.md").write_text(markdown(rows, prov, sources))
    for fx in {r["fixture"] for r in rows}:
        plot(rows, fx, RESULTS / f"eval_{fx}.png")
    print((RESULTS / "EVAL.md").read_text())
    if LLAMA_FAILURES:
        print("llama.cpp failed on (no row written for these):\n" + "\n".join(LLAMA_FAILURES), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
