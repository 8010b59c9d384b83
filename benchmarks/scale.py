"""Bounded memory per layer: one MoE layer with DeepSeek-V3's expert shapes, E experts, peak RSS and time.

Writes a synthetic single-layer Mixtral-format checkpoint (bf16, *upcycled*: one base expert with its
neurons permuted per expert plus 20% multiplicative noise) whose experts have DeepSeek-V3's shapes
(hidden 7168, expert intermediate 2048: 88 MB per expert in bf16; attention shrunk to one 128-wide head so
that the experts dominate), for each E, and converts it with resmoe in a fresh process (experts streamed
from the mapped checkpoint, ``converters/streamed.py``), recording that process's peak RSS, the time per
barycenter iteration and per expert, and the encoding time. ``--in-memory E`` also converts those E
experts with the in-memory path for comparison. Results: benchmarks/results/SCALE.md and scale.json,
with a projection for a whole DeepSeek-V3 (58 MoE layers of 256 experts) on this CPU.

    python benchmarks/scale.py [--experts 8 16 32 64] [--in-memory 8] [--device cpu]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import collect, markdown

RESULTS = Path(__file__).parent / "results"
HIDDEN, INTER = 7168, 2048  # DeepSeek-V3: hidden_size, moe_intermediate_size
DEEPSEEK_LAYERS, DEEPSEEK_EXPERTS = 58, 256


def write_layer(d: Path, experts: int, seed: int = 0) -> int:
    """The synthetic checkpoint, written one expert at a time (memory: the base and one expert)."""
    import ml_dtypes
    import numpy as np
    import torch

    from resmoe_format.stream import StreamingWriter

    d.mkdir(parents=True)
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": HIDDEN,
           "intermediate_size": INTER, "num_hidden_layers": 1, "num_local_experts": experts,
           "num_experts_per_tok": 8, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 128,
           "vocab_size": 256, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e4,
           "tie_word_embeddings": False, "hidden_act": "silu", "dtype": "bfloat16"}
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    g = torch.Generator().manual_seed(seed)

    def bf16(t: torch.Tensor) -> np.ndarray:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)

    w = StreamingWriter(d / "model.safetensors")
    total = 0

    def put(name: str, t: torch.Tensor) -> None:
        nonlocal total
        a = bf16(t)
        w.put(name, a)
        total += a.nbytes

    put("model.embed_tokens.weight", torch.randn(256, HIDDEN, generator=g) * 0.02)
    put("lm_head.weight", torch.randn(256, HIDDEN, generator=g) * HIDDEN ** -0.5)
    put("model.norm.weight", torch.ones(HIDDEN))
    pre = "model.layers.0"
    for p, shape in (("q", (128, HIDDEN)), ("k", (128, HIDDEN)), ("v", (128, HIDDEN)), ("o", (HIDDEN, 128))):
        put(f"{pre}.self_attn.{p}_proj.weight", torch.randn(*shape, generator=g) * HIDDEN ** -0.5)
    put(f"{pre}.input_layernorm.weight", torch.ones(HIDDEN))
    put(f"{pre}.post_attention_layernorm.weight", torch.ones(HIDDEN))
    put(f"{pre}.block_sparse_moe.gate.weight", torch.randn(experts, HIDDEN, generator=g) * HIDDEN ** -0.5)
    base = {"w1": torch.randn(INTER, HIDDEN, generator=g) * HIDDEN ** -0.5,
            "w3": torch.randn(INTER, HIDDEN, generator=g) * HIDDEN ** -0.5,
            "w2": torch.randn(INTER, HIDDEN, generator=g) * INTER ** -0.5}  # neuron-first until stored
    for e in range(experts):
        perm = torch.randperm(INTER, generator=g)
        for name, b in base.items():
            v = b[perm] * (1 + 0.2 * torch.randn(b.shape, generator=g))
            put(f"{pre}.block_sparse_moe.experts.{e}.{name}.weight", v.T if name == "w2" else v)
    w.commit({"format": "pt"})
    return total


CHILD = """
import json, resource, sys, time
from converters.convert import ConvertOptions, convert
t = time.perf_counter()
rep = convert(sys.argv[1], sys.argv[2], ConvertOptions(stream_experts=sys.argv[3] == "1", device=sys.argv[4]),
              progress=False)
rep["wall_seconds"] = time.perf_counter() - t
rep["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
json.dump(rep, open(sys.argv[5], "w"))
"""
BASELINE = """
import resource, sys
import converters.convert, converters.streamed
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def run(src: Path, out: Path, streamed: bool, device: str) -> dict:
    rep_file = out.with_suffix(".json")
    subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), "1" if streamed else "0", device,
                    str(rep_file)], check=True)
    rep = json.loads(rep_file.read_text())
    lay = rep["layers"][0]
    st = lay.get("streamed", {})
    errs = [e for m in lay["matrices"].values() for e in m["rel_error"]]
    row = {"experts": lay["num_experts"], "streamed": streamed, "peak_rss_bytes": rep["peak_rss_bytes"],
           "wall_seconds": rep["wall_seconds"], "layer_seconds": lay["seconds"],
           "barycenter_iterations": lay["barycenter"]["iterations"], "objective": lay["barycenter"]["objective"],
           "iteration_seconds": st.get("iteration_seconds"), "encode_seconds": st.get("encode_seconds"),
           "expert_reads": st.get("expert_reads"), "file_bytes": rep["summary"]["file_bytes"],
           "expert_bytes_fraction": rep["summary"]["expert_bytes_fraction"], "rel_error_mean": sum(errs) / len(errs)}
    if streamed:
        its = row["iteration_seconds"]
        row["seconds_per_expert_iteration"] = sum(its) / (len(its) * row["experts"])
        row["encode_seconds_per_expert"] = row["encode_seconds"] / row["experts"]
    row["sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink(missing_ok=True)
    return row


def lap_seconds(n: int = INTER) -> float:
    """scipy's exact assignment on one n x n float64 random cost matrix (what a non-upcycled expert needs
    per iteration when the argmax shortcut fails)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    c = np.random.default_rng(0).random((n, n))
    t = time.perf_counter()
    linear_sum_assignment(c)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--in-memory", type=int, nargs="*", default=[8], help="also convert these E in memory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tmp", default=None, help="scratch directory (default: the system's)")
    ap.add_argument("--render", action="store_true", help="only rewrite SCALE.md and the README sentence from "
                    "results/scale.json")
    ap.add_argument("--note", help="with --render: a note on the conditions of the run, kept in the results")
    a = ap.parse_args()
    if a.render:
        doc = json.loads((RESULTS / "scale.json").read_text())
        if a.note is not None:
            doc["note"] = a.note
        save(doc)
        return 0
    import torch

    prov = collect(("numpy", "torch", "scipy"), timing_runs=1, gpu="none lent to this session: CPU only" if not
                   torch.cuda.is_available() else torch.cuda.get_device_name(0))
    baseline = int(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                                  check=True).stdout)
    rows = []
    for e in a.experts:
        tmp = Path(tempfile.mkdtemp(dir=a.tmp, prefix="scale-"))
        try:
            t = time.perf_counter()
            nbytes = write_layer(tmp / "src", e)
            print(f"E={e}: wrote {nbytes / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
            for streamed in ([True, False] if e in a.in_memory else [True]):
                row = run(tmp / "src", tmp / "o.rmoe", streamed, a.device)
                row["source_bytes"] = nbytes
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    lap = lap_seconds()
    big = [r for r in rows if r["streamed"]][-1]
    per_it, per_enc = big["seconds_per_expert_iteration"], big["encode_seconds_per_expert"]
    iters = big["barycenter_iterations"]

    def project(iterations: int, lap_each: float = 0.0) -> float:
        return DEEPSEEK_LAYERS * DEEPSEEK_EXPERTS * (iterations * (per_it + lap_each) + per_enc)

    projection = {"from_experts": big["experts"], "layers": DEEPSEEK_LAYERS, "experts": DEEPSEEK_EXPERTS,
                  "upcycled_hours": project(iters) / 3600,
                  "ten_iterations_with_solver_hours": project(10, lap) / 3600, "lap_seconds": lap}
    doc = {"provenance": prov, "baseline_rss_bytes": baseline, "rows": rows, "projection": projection}
    save(doc)
    return 0


def save(doc: dict) -> None:
    """scale.json (with the README's sentence) and SCALE.md."""
    doc["readme"] = readme(doc)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / "SCALE.md").write_text(render(doc))
    print((RESULTS / "SCALE.md").read_text())


def readme(doc: dict) -> str:
    """The README's figures (benchmarks/readme_figures.py copies them)."""
    gib = 2 ** 30
    streamed = [r for r in doc["rows"] if r["streamed"]]
    memory = [r for r in doc["rows"] if not r["streamed"]]
    peaks = [r["peak_rss_bytes"] / gib for r in streamed]
    last = streamed[-1]
    text = (f"on one synthetic upcycled layer with DeepSeek-V3's expert shapes (bf16), peak RSS "
            f"{min(peaks):.2f}-{max(peaks):.2f} GiB from {streamed[0]['experts']} to {last['experts']} experts "
            f"({streamed[0]['source_bytes'] / 1e9:.1f} to {last['source_bytes'] / 1e9:.1f} GB of experts)")
    if memory:
        text += (f", where the in-memory path peaks at {memory[0]['peak_rss_bytes'] / gib:.2f} GiB with "
                 f"{memory[0]['experts']}")
    return (text + f"; {last['seconds_per_expert_iteration']:.1f} s per expert per barycenter iteration and "
            f"{last['encode_seconds_per_expert']:.1f} s per expert to encode on 2 shared CPU cores, so a whole "
            f"DeepSeek-V3 (58 layers of 256 experts) would take about {doc['projection']['upcycled_hours']:.0f} "
            f"to {doc['projection']['ten_iterations_with_solver_hours']:.0f} hours in one process (no GPU was lent "
            f"to this session)")


def render(doc: dict) -> str:
    gib = 2 ** 30
    rows, p = doc["rows"], doc["projection"]
    lines = ["# One DeepSeek-V3-shaped MoE layer in bounded memory", "",
             "A synthetic single-layer checkpoint with DeepSeek-V3's expert shapes (hidden 7168, expert intermediate "
             "2048, bf16: 88 MB per expert), upcycled (one base expert, neurons permuted per expert, 20% noise), "
             "converted with `resmoe` (`--keep 0.25`) in a fresh process per row. *Streamed* is the bounded-memory "
             "path (`converters/streamed.py`: the barycenter iteration, the residuals and their encoding read one "
             "expert at a time from the memory-mapped checkpoint); *in memory* the path for small layers (every "
             "expert in float32 at once). Peak RSS is the converting process's `ru_maxrss`; a process that only "
             f"imports the converter peaks at {doc['baseline_rss_bytes'] / gib:.2f} GiB.", "",
             "| experts | path | source GB | peak RSS GiB | wall s | barycenter iterations | s per expert per "
             "iteration | encode s per expert | expert reads | stored / source | rel. error mean |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_it = f"{r['seconds_per_expert_iteration']:.2f}" if r.get("seconds_per_expert_iteration") else ""
        per_enc = f"{r['encode_seconds_per_expert']:.2f}" if r.get("encode_seconds_per_expert") else ""
        lines.append(f"| {r['experts']} | {'streamed' if r['streamed'] else 'in memory'} | "
                     f"{r['source_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / gib:.2f} | {r['wall_seconds']:.0f} | "
                     f"{r['barycenter_iterations']} | {per_it} | {per_enc} | {r['expert_reads'] or ''} | "
                     f"{r['expert_bytes_fraction']:.3f} | {r['rel_error_mean']:.4f} |")
    streamed = [r for r in rows if r["streamed"]]
    peaks = [r["peak_rss_bytes"] / gib for r in streamed]
    pairs = [(a, b) for a in streamed for b in rows if not b["streamed"] and b["experts"] == a["experts"]]
    if pairs:
        same = all(a["sha256"] == b["sha256"] for a, b in pairs)
        lines += ["", f"Streamed and in memory, the files are {'byte for byte the same' if same else 'DIFFERENT'} "
                  f"({', '.join(str(a['experts']) for a, _ in pairs)} experts)."]
    lines += ["", f"Streamed, the peak RSS is {min(peaks):.2f}-{max(peaks):.2f} GiB from {streamed[0]['experts']} to "
              f"{streamed[-1]['experts']} experts (target: flat in the number of experts and under 3 GiB: "
              f"{'met' if max(peaks) < 3 else 'missed'}).", "",
              "## Projection for a whole DeepSeek-V3 on this CPU", "",
              f"58 MoE layers x 256 experts, from the {p['from_experts']}-expert row's time per expert: upcycled-like "
              f"experts ({streamed[-1]['barycenter_iterations']} iterations, no assignment solver): "
              f"**{p['upcycled_hours']:.0f} hours**; experts that need 10 iterations with scipy's exact assignment "
              f"every time ({p['lap_seconds']:.2f} s per 2048 x 2048 solve measured here): "
              f"**{p['ten_iterations_with_solver_hours']:.0f} hours**, on one process; `--workers N` or torchrun "
              f"divide it by the number of ranks (layers are independent), memory per rank as above.", "",
              "No GPU was lent to this session: no GPU measurement was made (the CUDA code path, `--device cuda`, "
              "is exercised only on CPU by the tests; benchmarks/barycenter.py --device cuda stays to be run).", ""]
    if doc.get("note"):
        lines += [f"Note: {doc['note']}", ""]
    return "\n".join(lines) + "\n" + markdown(doc["provenance"])


if __name__ == "__main__":
    raise SystemExit(main())
