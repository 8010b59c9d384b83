"""Torch runtime benchmark: memory and tokens per second per mode against the dense model.

Writes a synthetic upcycled Mixtral-format checkpoint (hub names, float32), converts it with
resmoe-convert at several budgets, and for each (file, mode) starts a fresh process that
loads the model with ``resmoe_format.torch.load_model`` and records:

- resident memory (RSS) after load, and the peak while loading;
- the peak while running (VmHWM reset after load through /proc/self/clear_refs);
- prefill tokens/s (batch 1 and 8, 128 tokens) and decode tokens/s (batch 1 and 8, 32 steps
  with the KV cache), on the CPU with torch's default thread count.

The dense baseline is the source checkpoint loaded with transformers' ``from_pretrained``.
Results: benchmarks/results/runtime.{json,md,png}.

    python benchmarks/runtime.py [--quick] [--hidden 1024 --inter 3584 --layers 4]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PREFILL = 128
DECODE = 32


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    vals = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            vals[k] = int(v.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def child(kind: str, path: str, mode: str, vocab: int, out: str) -> None:
    """Load one model and measure it (runs in a fresh process)."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    if kind == "baseline":  # the interpreter with torch, transformers and the runtime imported, no model
        import transformers  # noqa: F401

        import resmoe_format.torch  # noqa: F401

        Path(out).write_text(json.dumps({"rss": _rss()[0]}))
        return
    t0 = time.perf_counter()
    if kind == "dense":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    else:
        from resmoe_format.torch import load_model

        mode, _, cache = mode.partition(":")  # "lazy:BYTES" sets cache_bytes
        model = load_model(path, mode=mode, dtype="fp32", cache_bytes=int(cache) if cache else None)
    load_s = time.perf_counter() - t0
    rss_load, peak_load = _rss()
    _reset_peak()
    res = {"load_s": load_s, "rss_after_load": rss_load, "peak_load": peak_load}
    with torch.inference_mode():
        for batch in (1, 8):
            ids = torch.randint(3, vocab, (batch, PREFILL))
            model(ids[:, :8])  # warm-up
            t = time.perf_counter()
            out_ = model(ids, use_cache=True)
            res[f"prefill_b{batch}"] = batch * PREFILL / (time.perf_counter() - t)
            pkv = out_.past_key_values
            nxt = out_.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(DECODE):
                o = model(nxt, past_key_values=pkv, use_cache=True)
                pkv, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
            res[f"decode_b{batch}"] = batch * DECODE / (time.perf_counter() - t)
    res["peak_run"] = _rss()[1]
    Path(out).write_text(json.dumps(res))


def run_child(kind: str, path: Path, mode: str, vocab: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, "--child", kind, str(path), mode, str(vocab), f.name], check=True)
        return json.loads(Path(f.name).read_text())


def expert_bytes(path: Path) -> int:
    """On-disk bytes of the compressed experts (everything but passthrough tensors and files)."""
    import resmoe_format
    from resmoe_format.accounting import account

    with resmoe_format.open(path) as r:
        acc = account(r)
    return acc.expert_bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="a small model, to check the script runs")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=3584)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    a = ap.parse_args(argv)
    if a.child:
        kind, path, mode, vocab, out = a.child
        child(kind, path, mode, int(vocab), out)
        return 0
    if a.quick:
        a.hidden, a.inter, a.layers = 128, 448, 2
    import torch

    from converters.convert import ConvertOptions, convert
    from converters.example import write_mixtral_checkpoint

    variants = {"resmoe keep 0.25": ConvertOptions(keep=0.25),
                "resmoe residual-keep 0.25": ConvertOptions(residual_keep=0.25),
                "resmoe-svd keep 0.25": ConvertOptions(keep=0.25, residual="svd")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        dense_bytes = write_mixtral_checkpoint(src, a.layers, a.hidden, a.inter, a.experts, vocab=a.vocab,
                                               dtype=torch.float32)
        expert_dense = a.layers * a.experts * 3 * a.hidden * a.inter * 4
        print(f"dense checkpoint: {dense_bytes / 2**20:.0f} MiB, experts {expert_dense / 2**20:.0f} MiB", flush=True)
        baseline = run_child("baseline", src, "none", a.vocab)["rss"]
        rows.append({"variant": "dense", "mode": "dense", "file_bytes": dense_bytes, "expert_bytes": expert_dense,
                     **run_child("dense", src, "dense", a.vocab)})
        print(rows[-1], flush=True)
        for name, opts in variants.items():
            f = Path(tmp) / f"{len(rows)}.rmoe"
            convert(src, f, opts, progress=False)
            everything = f"lazy:{expert_dense}"  # a cache that holds every expert: no eviction
            for mode in (("materialize", "lazy", everything, "fused") if name == "resmoe keep 0.25" else ("fused",)):
                label = "lazy, cache = all experts" if mode == everything else mode
                rows.append({"variant": name, "mode": label, "file_bytes": f.stat().st_size,
                             "expert_bytes": expert_bytes(f), **run_child("rmoe", f, mode, a.vocab)})
                print(rows[-1], flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "hidden": a.hidden, "inter": a.inter, "layers": a.layers,
            "experts": a.experts, "top_k": 2, "vocab": a.vocab, "dtype": "fp32", "prefill_tokens": PREFILL,
            "decode_steps": DECODE, "baseline_rss": baseline}
    suffix = "_quick" if a.quick else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"runtime{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot(rows, RESULTS / f"runtime{suffix}.png")
    md = RESULTS / f"RUNTIME{suffix.upper()}.table.md"
    md.write_text(f"baseline RSS (interpreter, torch, transformers; no model): {baseline / 2**20:.0f} MiB\n\n"
                  + table(rows) + "\n")
    print(md.read_text())
    return 0


def table(rows: list[dict]) -> str:
    mib = 2 ** 20
    head = ("| variant | mode | expert MiB on disk | RSS after load MiB | peak running MiB | prefill b1 tok/s | "
            "prefill b8 | decode b1 tok/s | decode b8 |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(
        f"| {r['variant']} | {r['mode']} | {r['expert_bytes'] / mib:.0f} | {r['rss_after_load'] / mib:.0f} | "
        f"{r['peak_run'] / mib:.0f} | {r['prefill_b1']:.0f} | {r['prefill_b8']:.0f} | {r['decode_b1']:.1f} | "
        f"{r['decode_b8']:.1f} |" for r in rows)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['variant']}\n{r['mode']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    x = range(len(rows))
    axes[0].bar([i - 0.2 for i in x], [r["rss_after_load"] / 2**20 for r in rows], 0.4, label="RSS after load")
    axes[0].bar([i + 0.2 for i in x], [r["peak_run"] / 2**20 for r in rows], 0.4, label="peak while running")
    axes[0].set_ylabel("MiB")
    axes[0].legend()
    axes[1].bar([i - 0.2 for i in x], [r["decode_b1"] for r in rows], 0.4, label="decode batch 1")
    axes[1].bar([i + 0.2 for i in x], [r["decode_b8"] / 8 for r in rows], 0.4, label="decode batch 8 (per sequence)")
    axes[1].set_ylabel("tokens/s")
    axes[1].legend()
    for ax in axes:
        ax.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
