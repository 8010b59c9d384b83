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
    import llama_cpp

    m = llama_cpp.Llama(str(path), logits_all=True, n_ctx=SEQ + 8, n_batch=SEQ + 8, verbose=False)
    nll, n = 0.0, 0
    for i in range(0, ids.size - 1, SEQ):
        window = ids[i:i + SEQ + 1]
        m.reset()
        m.eval(window[:-1].tolist())
        logits = np.array(m.scores[:len(window) - 1])
        nll += nll_from_logits(logits, window[1:])
        n += len(window) - 1
    return math.exp(nll / n)


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
    f32 = export_gguf(lossless, tmp / f"{name}_f32.gguf", "f32")
    rows.append({"fixture": name, "method": "f32", "keep": None, "residual_keep": None,
                 "expert_bytes": expert_bytes_gguf(f32), "bits_per_expert_weight": 8 * expert_bytes_gguf(f32) / weights,
                 "ppl": llama_ppl(f32, ids)})
    for t in LLAMA_TYPES:
        g = export_gguf(lossless, tmp / f"{name}_{t}.gguf", t)
        eb = expert_bytes_gguf(g)
        rows.append({"fixture": name, "method": t, "keep": None, "residual_keep": None, "expert_bytes": eb,
                     "bits_per_expert_weight": 8 * eb / weights, "ppl": llama_ppl(g, ids)})
        print(f"{name}: llama.cpp {t}: {rows[-1]['bits_per_expert_weight']:.2f} bits/weight, "
              f"ppl {rows[-1]['ppl']:.4f}", flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    out = ["# Evaluation on the trained fixtures (`benchmarks/eval.py`)", "",
           f"Held-out text: the first {meta['windows']} x {SEQ} bytes of `benchmarks/fixtures/heldout.txt` "
           "(standard-library files never seen in training); perplexity per byte (uniform: 256). "
           "Relative error: mean relative Frobenius error of the restored expert matrices, measured on the "
           "file. Expert bytes: true on-disk bytes of the expert weights (byte accounting for .rmoe, the "
           "`ffn_*_exps` tensors for GGUF).", ""]
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
    return "\n".join(out) + "\n"


def plot(rows: list[dict], fixture: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["fixture"] == fixture]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for r in rs:
        label = r["method"] if r["method"] not in LLAMA_TYPES + ("f32",) else "llama.cpp"
        label += " (residual-keep)" if r.get("residual_keep") is not None else ""
        groups.setdefault(label, []).append(r)
    for label, g in groups.items():
        g = sorted(g, key=lambda r: r["bits_per_expert_weight"])
        ax.plot([r["bits_per_expert_weight"] for r in g], [r["ppl"] for r in g], "o-" if len(g) > 1 else "o",
                label=label)
    ax.set_xlabel("bits per expert weight (on disk)")
    ax.set_ylabel("held-out perplexity per byte")
    ax.set_yscale("log")
    ax.set_title(fixture)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=64, help=f"held-out windows of {SEQ} bytes")
    ap.add_argument("--fixture", default=None, help="one fixture (default: all)")
    ap.add_argument("--report-only", action="store_true", help="rebuild eval.json, EVAL.md and the plots from "
                    "the per-fixture results/eval_<NAME>.json without evaluating")
    a = ap.parse_args(argv)
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
            (RESULTS / f"eval_{fx.name}.json").write_text(json.dumps(part, indent=1) + "\n")
    # eval.json, EVAL.md and the plots cover every fixture evaluated so far (one file per fixture)
    rows = [r for f in sorted(RESULTS.glob("eval_*.json")) for r in json.loads(f.read_text())]
    meta = {"windows": a.windows, "seq": SEQ, "torch_threads": torch.get_num_threads()}
    (RESULTS / "eval.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "EVAL.md").write_text(markdown(rows, meta))
    for fx in {r["fixture"] for r in rows}:
        plot(rows, fx, RESULTS / f"eval_{fx}.png")
    print((RESULTS / "EVAL.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
