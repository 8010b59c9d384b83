"""Torch runtime benchmark: memory and tokens per second per mode against the dense model.

Writes a synthetic upcycled Mixtral-format checkpoint (hub names, float32), converts it with
resmoe-convert at several budgets, and for each (file, mode) starts three fresh processes, one
after the other, that each load the model with ``resmoe_format.torch.load_model`` and record:

- resident memory (RSS) after load, and the peak while loading;
- the peak while running (VmHWM reset after load through /proc/self/clear_refs);
- prefill tokens/s (batch 1 and 8, 128 tokens) and decode tokens/s (batch 1 and 8, 32 steps
  with the KV cache), on the CPU with torch's default thread count;
- in fused mode, the bytes it holds per kind (barycenters, CSR values and indices, ...).

A file converted with ``--bits`` (k-quant barycenters and residuals, spec 5.10) runs in
materialize mode (experts dequantized once, at load) and in fused mode (records held packed,
dequantized on the fly in every forward pass).

Every figure is the median of the three processes; the runs are kept. The dense baseline is
the source checkpoint loaded with transformers' ``from_pretrained`` (its experts
implementation is recorded). Results: benchmarks/results/runtime.{json,md,png}, all generated.

    python benchmarks/runtime.py [--quick] [--hidden 1024 --inter 3584 --layers 4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import RUNS, collect, markdown, spread, within_noise

RESULTS = Path(__file__).parent / "results"
PREFILL = 128
DECODE = 32
#: the k-quant file: resmoe-convert --bits KQUANT_BITS
KQUANT_BITS = 3.0
KQUANT = f"resmoe --bits {KQUANT_BITS:g}"
#: --only-bf16: the file whose bitmap records fused and lazy mode read in place, and lazy mode's cache sizes (% of the
#: experts' records)
BITMAP = "resmoe keep 0.25 --delta-format bitmap"
LAZY_CACHE = (100, 50, 25)
#: bytes of benchmarks/fixtures/calibration.txt the d2moe files calibrate on (--only-d2moe)
D2MOE_CALIBRATION = 8192


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


def fused_bytes(model) -> dict:
    """Bytes a fused model holds, per kind: non-expert parameters, barycenters, CSR parts, other residuals
    (k-quant records: their packed bytes, counted under barycenters or other residuals)."""
    from resmoe_format.torch.experts import CompressedExperts, FusedExperts
    from resmoe_format.torch.residuals import SparseResidual, held_nbytes

    out = {"non_expert": 0, "barycenters": 0, "csr_values": 0, "csr_col_indices": 0, "csr_row_pointers": 0,
           "other_residuals": 0, "csr_entries": 0}
    inside = set()
    for mod in model.modules():
        if isinstance(mod, CompressedExperts):
            inside.update(id(p) for p in mod.parameters())
        if not isinstance(mod, FusedExperts):
            continue
        out["barycenters"] += sum(held_nbytes(t) for t in (mod.base_in, mod.base_out) if t is not None)
        for op in [op for ops in mod.in_ops for _, _, op in ops] + [op for op in mod.out_ops if op is not None]:
            if isinstance(op, SparseResidual):
                for part, t in op.parts().items():
                    out[f"csr_{'col_indices' if part == 'indices' else part}"] += t.numel() * t.element_size()
                out["csr_entries"] += op.entries()
            else:
                out["other_residuals"] += op.nbytes()
    out["non_expert"] = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in inside)
    return out


def child(kind: str, path: str, mode: str, vocab: int, out: str, dtype: str = "fp32") -> None:
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

        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    else:
        from resmoe_format.torch import load_model

        mode, _, cache = mode.partition(":")  # "lazy:BYTES" sets cache_bytes
        model = load_model(path, mode=mode, dtype=dtype, cache_bytes=int(cache) if cache else None)
    load_s = time.perf_counter() - t0
    rss_load, peak_load = _rss()
    _reset_peak()
    res = {"load_s": load_s, "rss_after_load": rss_load, "peak_load": peak_load,
           "experts_implementation": getattr(model.config, "_experts_implementation", None)}
    if mode == "fused":
        res["fused_bytes"] = fused_bytes(model)
    with torch.inference_mode():
        for batch in (1, 8):
            ids = torch.randint(3, vocab, (batch, PREFILL))
            model(ids[:, :8])  # warm-up
            t = time.perf_counter()
            out_ = model(ids, use_cache=True)
            res[f"prefill_b{batch}"] = batch * PREFILL / (time.perf_counter() - t)
            pkv = out_.cache
            nxt = out_.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(DECODE):
                o = model(nxt, cache=pkv, use_cache=True)
                pkv, nxt = o.cache, o.logits[:, -1:].argmax(-1)
            res[f"decode_b{batch}"] = batch * DECODE / (time.perf_counter() - t)
    res["peak_run"] = _rss()[1]
    if mode == "lazy":
        from resmoe_format.torch import cache_stats

        res["cache"] = cache_stats(model)
    if mode == "fused":
        from resmoe_format.torch import native

        res["native_kernels"] = {"available": native.available(), "avx512": native.uses_avx512(),
                                 "dpbf16": native.uses_dpbf16(), "reason": native.unavailable_reason()}
    Path(out).write_text(json.dumps(res))


def run_once(kind: str, path: Path, mode: str, vocab: int, dtype: str = "fp32") -> dict:
    """One fresh process's measurements."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, "--child", kind, str(path), mode, str(vocab), f.name, dtype],
                       check=True)
        return json.loads(Path(f.name).read_text())


def aggregate(results: list[dict]) -> dict:
    """Every numeric figure of several runs as its median, with its spread."""
    out = dict(results[-1])
    for k, v in results[-1].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in results)
            out[f"{k}_spread"] = spread([r[k] for r in results])
    return out


def run_child(kind: str, path: Path, mode: str, vocab: int, runs: int = RUNS, dtype: str = "fp32") -> dict:
    """``runs`` fresh processes: every numeric figure as its median, with all runs under ``"runs"``."""
    return aggregate([run_once(kind, path, mode, vocab, dtype) for _ in range(runs)])


def expert_records(path: Path, dtype: str) -> int:
    """Bytes every expert's residual operators hold in memory (as fused mode builds them): what lazy mode's cache
    holds (the barycenter stays resident), the 100% of its cache sizes."""
    from resmoe_format.torch import FusedExperts, load_model
    from resmoe_format.torch.experts import ops_nbytes

    model = load_model(path, mode="fused", dtype=dtype)
    return sum(ops_nbytes(mod._ops(e)) for mod in model.modules() if isinstance(mod, FusedExperts)
               for e in range(mod.num_experts))


def file_bytes(path: Path) -> dict:
    """Byte accounting of a .rmoe file: expert bytes, bits per expert weight and the categories fused mode
    re-encodes."""
    import resmoe_format
    from resmoe_format.accounting import account

    with resmoe_format.open(path) as r:
        acc = account(r)
    return {"expert_bytes": acc.expert_bytes, "expert_bits": acc.bits_per_expert_weight(),
            **{f"file_{c}": acc.bytes[c] for c in ("barycenters", "residual_values", "residual_indices", "scales")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="a small model, to check the script runs")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=3584)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--only-d2moe", action="store_true",
                    help="only the dense model, d2moe --keep 0.5 (plain; --share-v --prune-base 0.2) and resmoe at "
                         "the same --keep (pruned and svd residuals), fused; results go to runtime_d2moe.json, "
                         "RUNTIME_D2MOE.md and runtime_d2moe.png")
    ap.add_argument("--only-kquant", action="store_true",
                    help=f"only the dense model and the {KQUANT} file (materialize and fused); results go to "
                         f"runtime_kquant.json, RUNTIME_KQUANT.md and runtime_kquant.png")
    ap.add_argument("--only-bf16", action="store_true",
                    help="issue 18's figures: a bf16 source and bf16 compute; dense, resmoe --keep 0.25 (default "
                         "delta format and --delta-format bitmap, read in place) materialize/fused/lazy with caches "
                         "of 100, 50 and 25%% of the experts' operators in memory, --residual-keep 0.25 fused, "
                         f"{KQUANT} materialize/fused (unless --skip-kquant); results go to runtime_bf16.json, "
                         "RUNTIME_BF16.md and runtime_bf16.png")
    ap.add_argument("--skip-kquant", action="store_true",
                    help=f"leave the {KQUANT} file out (its conversion takes long; --only-kquant measures it alone)")
    ap.add_argument("--runs", type=int, default=RUNS, help=f"fresh processes per row, their median reported "
                                                             f"(default {RUNS})")
    ap.add_argument("--files", metavar="DIR",
                    help="keep the converted files in DIR and reuse those already there (same model shape and dtype: "
                         "the synthetic source is seeded); the report lists the reused ones")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild RUNTIME*.md from the runtime*.json the same flags wrote (no measurement)")
    a = ap.parse_args(argv)
    suffix = ("_quick" if a.quick else "") + ("_kquant" if a.only_kquant else "") + ("_d2moe" if a.only_d2moe else "") \
        + ("_bf16" if a.only_bf16 else "")
    write_report = report_bf16 if a.only_bf16 else report
    if a.report_only:
        res = json.loads((RESULTS / f"runtime{suffix}.json").read_text())
        if a.only_bf16:
            res["readme"] = [line[2:] for line in bf16_targets(res)]
            (RESULTS / f"runtime{suffix}.json").write_text(json.dumps(res, indent=1) + "\n")
        (RESULTS / f"RUNTIME{suffix.upper()}.md").write_text(write_report(res, f"runtime{suffix}.png"))
        return 0
    if a.child:
        kind, path, mode, vocab, out, dtype = a.child
        child(kind, path, mode, int(vocab), out, dtype)
        return 0
    if a.quick:
        a.hidden, a.inter, a.layers = 128, 448, 2
    import torch

    prov = collect(("torch", "transformers", "numpy", "scipy"))
    prov["timing_runs"] = a.runs
    from converters.convert import ConvertOptions, convert
    from converters.example import write_mixtral_checkpoint

    variants = {"resmoe keep 0.25": ConvertOptions(keep=0.25),
                "resmoe residual-keep 0.25": ConvertOptions(residual_keep=0.25),
                "resmoe-svd keep 0.25": ConvertOptions(keep=0.25, residual="svd"),
                KQUANT: ConvertOptions(bits=KQUANT_BITS)}
    modes = {"resmoe keep 0.25": ("materialize", "lazy", "lazy, cache = all experts", "fused"),
             KQUANT: ("materialize", "fused")}
    if a.only_kquant:
        variants = {KQUANT: variants[KQUANT]}
    if a.skip_kquant:
        del variants[KQUANT]
    dtype = "bf16" if a.only_bf16 else "fp32"
    if a.only_bf16:
        variants = {"resmoe keep 0.25": ConvertOptions(keep=0.25),
                    BITMAP: ConvertOptions(keep=0.25, delta_format="bitmap"),
                    "resmoe residual-keep 0.25": ConvertOptions(residual_keep=0.25)}
        if not a.skip_kquant:
            variants[KQUANT] = ConvertOptions(bits=KQUANT_BITS)
        modes = {"resmoe keep 0.25": ("materialize", "fused"),
                 BITMAP: ("fused",) + tuple(f"lazy, cache {p}%" for p in LAZY_CACHE),
                 KQUANT: ("materialize", "fused")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.only_d2moe:
            cal = Path(tmp) / "calibration.txt"
            cal.write_bytes((Path(__file__).parent / "fixtures" / "calibration.txt").read_bytes()[:D2MOE_CALIBRATION])
            variants = {"d2moe keep 0.5": ConvertOptions(method="d2moe", keep=0.5, calibration=str(cal)),
                        "d2moe keep 0.5 --share-v --prune-base 0.2": ConvertOptions(
                            method="d2moe", keep=0.5, calibration=str(cal), share_v=True, prune_base=0.2),
                        "resmoe keep 0.5": ConvertOptions(keep=0.5),
                        "resmoe-svd keep 0.5": ConvertOptions(keep=0.5, residual="svd")}
            modes = {"d2moe keep 0.5": ("materialize", "fused")}
        src = Path(tmp) / "src"
        dense_bytes = write_mixtral_checkpoint(src, a.layers, a.hidden, a.inter, a.experts, vocab=a.vocab,
                                               dtype=torch.bfloat16 if a.only_bf16 else torch.float32)
        if a.only_d2moe:
            from converters.example import write_byte_tokenizer

            write_byte_tokenizer(src)
        expert_dense = a.layers * a.experts * 3 * a.hidden * a.inter * (2 if a.only_bf16 else 4)
        print(f"dense checkpoint: {dense_bytes / 2**20:.0f} MiB, experts {expert_dense / 2**20:.0f} MiB", flush=True)
        baseline = run_child("baseline", src, "none", a.vocab, runs=a.runs)["rss"]
        # every file first, then the timings in rounds (each round runs every row once, in table order), so that a
        # slower or faster spell of the machine falls on all rows alike rather than on one
        jobs = [({"variant": "dense", "mode": "dense", "file_bytes": dense_bytes, "expert_bytes": expert_dense},
                 ("dense", src, "dense"))]
        for name, opts in variants.items():
            f = Path(tmp) / f"{len(jobs)}.rmoe"
            if a.files:  # kept, and reused when this model's file is already there (the source is seeded)
                slug = "".join(c if c.isalnum() else "_" for c in name)
                f = Path(a.files) / f"{slug}-{a.layers}x{a.hidden}x{a.inter}x{a.experts}-{dtype}.rmoe"
                f.parent.mkdir(parents=True, exist_ok=True)
            if f.exists():
                prov.setdefault("reused_files", []).append(f"{name}: {f.name}")
            else:
                convert(src, f, opts, progress=False)
            everything = f"lazy:{expert_dense}"  # a cache that holds every expert: no eviction
            records = expert_records(f, dtype)
            for label in modes.get(name, ("fused",)):
                mode = everything if label == "lazy, cache = all experts" else label
                if label.startswith("lazy, cache ") and label.endswith("%"):
                    mode = f"lazy:{int(records * int(label[len('lazy, cache '):-1]) / 100)}"
                jobs.append(({"variant": name, "mode": label, "file_bytes": f.stat().st_size,
                              "expert_records": records, **file_bytes(f)}, ("rmoe", f, mode)))
        results: list[list[dict]] = [[] for _ in jobs]
        for i in range(a.runs):
            for (static, (kind, path, mode)), res in zip(jobs, results):
                res.append(run_once(kind, path, mode, a.vocab, dtype))
                print(f"round {i + 1}/{a.runs}", static["variant"], static["mode"],
                      {k: round(res[-1][k], 1) for k in ("decode_b1", "decode_b8")}, flush=True)
        rows = [{**static, **aggregate(res)} for (static, _), res in zip(jobs, results)]
        prov["dense_experts_implementation"] = rows[0]["experts_implementation"]
        prov["timing_order"] = f"interleaved: {a.runs} rounds, each runs every row once in table order"
    meta = {"hidden": a.hidden, "inter": a.inter, "layers": a.layers, "experts": a.experts, "top_k": 2,
            "vocab": a.vocab, "dtype": dtype, "prefill_tokens": PREFILL, "decode_steps": DECODE,
            "baseline_rss": baseline, "dense_bytes": dense_bytes, "expert_dense_bytes": expert_dense}
    res = {"provenance": prov, "meta": meta, "rows": rows}
    if a.only_bf16:
        res["readme"] = [line[2:] for line in bf16_targets(res)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"runtime{suffix}.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(rows, RESULTS / f"runtime{suffix}.png")
    (RESULTS / f"RUNTIME{suffix.upper()}.md").write_text(write_report(res, f"runtime{suffix}.png"))
    print((RESULTS / f"RUNTIME{suffix.upper()}.md").read_text())
    return 0


MIB = 2 ** 20


def _rng(r: dict, key: str, fmt: str = ".1f") -> str:
    s = r[f"{key}_spread"]
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def table(rows: list[dict]) -> str:
    head = ("| variant | mode | expert MiB on disk | RSS after load MiB | peak running MiB | prefill b1 tok/s | "
            "prefill b8 | decode b1 tok/s (range) | decode b8 (range) |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(
        f"| {r['variant']} | {r['mode']} | {r['expert_bytes'] / MIB:.0f} | {r['rss_after_load'] / MIB:.0f} | "
        f"{r['peak_run'] / MIB:.0f} | {r['prefill_b1']:.0f} | {r['prefill_b8']:.0f} | {_rng(r, 'decode_b1')} | "
        f"{_rng(r, 'decode_b8')} |" for r in rows)


def _versus(r: dict, ref: dict, key: str, name: str = "dense") -> str:
    """'a against b tokens/s, Nx, faster than <name>', 'within noise of' when the runs' ranges overlap."""
    ratio = r[key] / ref[key]
    noise = within_noise(r[f"{key}_spread"], ref[f"{key}_spread"])
    word = "faster than" if ratio > 1 else "slower than"
    if noise:  # the median's verdict stands; the ranges say how far single runs spread
        a, b = r[f"{key}_spread"], ref[f"{key}_spread"]
        word = (f"the runs' ranges overlapping ({a['min']:.1f}-{a['max']:.1f} against {b['min']:.1f}-{b['max']:.1f}), "
                f"within noise of")
    return f"{r[key]:.1f} against {ref[key]:.1f} tokens/s, {ratio:.2f}x, {word} {name}"


def report(res: dict, png: str) -> str:
    """RUNTIME.md, entirely from the measurements in ``res``."""
    m, rows, prov = res["meta"], res["rows"], res["provenance"]
    dense = rows[0]
    base = m["baseline_rss"]
    e = m["experts"]
    find = {(r["variant"], r["mode"]): r for r in rows}
    lines = [
        "# Torch runtime: memory and speed per mode (`benchmarks/runtime.py`)", "",
        f"Model: synthetic upcycled Mixtral (hub tensor names, float32): hidden {m['hidden']}, intermediate "
        f"{m['inter']}, {e} experts, top-{m['top_k']}, {m['layers']} layers, vocabulary {m['vocab']}; "
        f"{m['dense_bytes'] / MIB:.0f} MiB of weights, {m['expert_dense_bytes'] / MIB:.0f} MiB of them experts. "
        f"Converted with `resmoe-convert` ({', '.join(dict.fromkeys(r['variant'] for r in rows[1:]))}); every mode "
        "runs in float32 on the CPU. Dense baseline: "
        f"the source checkpoint loaded with transformers' `from_pretrained` (experts implementation "
        f"`{dense.get('experts_implementation')}`). Each row is the median of {prov['timing_runs']} fresh processes "
        f"(decode with the range of the runs). Prefill: {m['prefill_tokens']} tokens per sequence; decode: "
        f"{m['decode_steps']} steps with the KV cache; tokens/s count all sequences of the batch. Memory is VmRSS "
        "after load and VmHWM "
        f"while running (reset after load). The interpreter with torch and transformers imported, and no model, "
        f"is {base / MIB:.0f} MiB.", "",
        table(rows), "",
    ]
    keeps = ("resmoe keep 0.25", "fused") in find
    if keeps:
        lines += [f"(`--keep 0.25` stores 25% of the expert parameters in total: the barycenter is 1/{e}, so each "
                  f"residual keeps {0.25 - 1 / e:.1%}. `--residual-keep 0.25` is the paper's convention: residuals "
                  f"keep 25% and the barycenter comes on top, {0.25 + 1 / e:.1%} in total.)", ""]
    lines += [f"![memory and decode speed per mode]({png})", ""]
    if prov.get("torch_threads") == 1:
        load = prov.get("load_avg_1min_at_start")
        lines += ["Every process ran with one torch thread (`OMP_NUM_THREADS=1`)"
                  + (f"; the 1-minute load average at the start was {load:.1f} on "
                     f"{prov.get('cpus_usable', prov.get('cpus'))} CPUs: other work, run at the lowest priority, "
                     "shared the machine, and one thread per process keeps a row from waiting on a second thread "
                     "that lost its core" if load is not None and load > 1.5 else "") + ".", ""]
    if keeps:
        lines += ["## Target: fused decode at batch 1 at least as fast as dense when residuals keep <= 25%", ""]
    for variant in ("resmoe keep 0.25", "resmoe residual-keep 0.25", "resmoe-svd keep 0.25"):
        r = find.get((variant, "fused"))
        if r:
            lines.append(f"- `{variant}`, fused: {_versus(r, dense, 'decode_b1')}.")
    lines += ["", "At batch 8, fused against dense: " + "; ".join(
        f"`{v}` {_versus(r, dense, 'decode_b8')}" for (v, mode), r in find.items() if mode == "fused") + ". Fused "
        "computes the barycenter products of all tokens routed to a layer as one matmul.", ""]
    f = find.get(("resmoe keep 0.25", "fused"))
    if f and f.get("fused_bytes"):
        b = f["fused_bytes"]
        expert_mem = b["barycenters"] + b["csr_values"] + b["csr_col_indices"] + b["csr_row_pointers"] \
            + b["other_residuals"]
        idx_mem = b["csr_col_indices"] + b["csr_row_pointers"]
        per_entry_file_idx = 8 * f["file_residual_indices"] / b["csr_entries"]
        per_entry_file_val = 8 * f["file_residual_values"] / b["csr_entries"]
        lines += [
            "## Memory in fused mode (`resmoe keep 0.25`)", "",
            f"- Held above the interpreter after load: {(f['rss_after_load'] - base) / MIB:.0f} MiB; counted "
            f"tensors: {b['non_expert'] / MIB:.0f} MiB of non-expert weights, {b['barycenters'] / MIB:.0f} MiB of "
            f"barycenters, {(b['csr_values'] + idx_mem) / MIB:.0f} MiB of CSR residuals "
            f"({b['csr_entries'] / 1e6:.1f} M entries: {b['csr_values'] / MIB:.0f} MiB values, "
            f"{b['csr_col_indices'] / MIB:.0f} MiB column indices, "
            f"{b['csr_row_pointers'] / MIB:.1f} MiB row pointers), {b['other_residuals'] / MIB:.0f} MiB other "
            f"residuals; the remaining {(f['rss_after_load'] - base - b['non_expert'] - expert_mem) / MIB:.0f} MiB "
            "is heap and mapped pages not attributed to a tensor.",
            f"- Experts in memory: {expert_mem / MIB:.0f} MiB against {f['expert_bytes'] / MIB:.0f} MiB in the file "
            f"({expert_mem / f['expert_bytes']:.2f}x). Per CSR entry the file stores "
            f"{per_entry_file_val:.1f} bits of value and {per_entry_file_idx:.1f} bits of index; memory holds "
            f"{8 * b['csr_values'] / b['csr_entries']:.0f} bits of value and "
            f"{8 * idx_mem / b['csr_entries']:.1f} bits of index (bitmap words or uint16 columns, int64 row offsets; "
            "int32 CSR without the compiled kernels). Of the "
            f"{(b['csr_values'] + idx_mem - f['file_residual_values'] - f['file_residual_indices']) / MIB:.0f} MiB "
            f"the CSR adds over the file, {(idx_mem - f['file_residual_indices']) / MIB:.0f} MiB are indices and "
            f"{(b['csr_values'] - f['file_residual_values']) / MIB:.0f} MiB values.", ""]
    d2 = [(v, r) for (v, mode), r in find.items() if v.startswith("d2moe") and mode == "fused"]
    if d2:
        lines += ["## D²-MoE in fused mode against dense and resmoe at the same `--keep`", "",
                  "Fused d2moe multiplies every token by the base once (by its kept channels only with "
                  "`--prune-base`) and then by each routed expert's low-rank delta (U, V held as float32 "
                  "factors; a shared V once per layer). Calibrated on the first "
                  f"{D2MOE_CALIBRATION} bytes of `benchmarks/fixtures/calibration.txt`.", ""]
        for v, r in d2 + [(v, r) for (v, mode), r in find.items() if v.startswith("resmoe") and mode == "fused"]:
            held = sum(x for k, x in r.get("fused_bytes", {}).items() if k not in ("non_expert", "csr_entries"))
            lines.append(f"- `{v}`, fused: decode b1 {_versus(r, dense, 'decode_b1')}; b8 "
                         f"{_versus(r, dense, 'decode_b8')}; RSS after load {r['rss_after_load'] / MIB:.0f} MiB "
                         f"(dense {dense['rss_after_load'] / MIB:.0f} MiB), experts held {held / MIB:.0f} MiB for "
                         f"{r['expert_bytes'] / MIB:.0f} MiB in the file.")
        lines.append("")
    kq_mat, kq_fused = find.get((KQUANT, "materialize")), find.get((KQUANT, "fused"))
    if kq_mat and kq_fused:
        held = sum(v for k, v in kq_fused["fused_bytes"].items() if k not in ("non_expert", "csr_entries"))
        lines += [f"## k-quant file (`{KQUANT}`): fused against materialize", "",
                  f"{kq_fused['expert_bits']:.2f} bits per expert weight on disk. Materialize dequantizes every "
                  "expert once, at load, into dense float32 weights; fused holds the packed codes and scales "
                  f"({held / MIB:.1f} MiB of experts in memory against {kq_fused['expert_bytes'] / MIB:.1f} MiB in "
                  "the file); at up to 8 tokens its compiled kernels decode each weight inside the products "
                  "(kquant_kernels.c), at more tokens they decode each matrix once per product and torch "
                  "multiplies.", ""]
        lines += [f"- decode at batch {n}, fused: {_versus(kq_fused, kq_mat, f'decode_b{n}', 'materialize')}."
                  for n in (1, 8)]
        lines += [f"- RSS after load: fused {kq_fused['rss_after_load'] / MIB:.0f} MiB, materialize "
                  f"{kq_mat['rss_after_load'] / MIB:.0f} MiB.", ""]
    lines += ["## Memory per mode, above the interpreter", ""]
    for r in rows:
        lines.append(f"- {r['variant']}, {r['mode']}: {(r['rss_after_load'] - base) / MIB:.0f} MiB after load, "
                     f"{(r['peak_run'] - base) / MIB:.0f} MiB peak while running.")
    lazy, lazy_all = find.get(("resmoe keep 0.25", "lazy")), find.get(("resmoe keep 0.25", "lazy, cache = all experts"))
    if lazy and lazy_all:
        def hits(r: dict) -> str:
            c = r.get("cache")
            return (f"hit rate {c['hit_rate']:.1%} over {c['uses']} uses, {c['resident_experts']} experts resident"
                    if c else "hit rate not recorded")

        lines += ["", "## Lazy", "",
                  "Lazy mode computes fused mode's products, building each expert's operators from the mapped file "
                  "the first time a token is routed to it. With the default cache: "
                  f"{_versus(lazy, dense, 'decode_b1')} "
                  f"({hits(lazy)}); with a cache of the dense experts' size: "
                  f"{_versus(lazy_all, dense, 'decode_b1')} "
                  f"({hits(lazy_all)}). Its prefill figures include building the experts the prompt is the first "
                  "to route to (the cache starts empty). RUNTIME_BF16.md measures smaller caches."]
    lines += ["", markdown(prov)]
    return "\n".join(lines) + "\n"


#: how each bf16 variant's fused records are held (RUNTIME_BF16.md's memory lines)
HELD = {"resmoe keep 0.25": "sparse records as bitmaps or uint16-column CSR of their bf16 values",
        BITMAP: "bitmap records as the file's own mapped bytes",
        KQUANT: "k-quant records as their packed codes, one byte per group scale and offset code and their float16 "
                "super-block scales"}


def bf16_targets(res: dict) -> list[str]:
    """RUNTIME_BF16.md's target lines (also README's ``figures:runtime_bf16`` block)."""
    m, rows = res["meta"], res["rows"]
    dense = rows[0]
    find = {(r["variant"], r["mode"]): r for r in rows}
    lines: list[str] = []

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    for v in ("resmoe keep 0.25", BITMAP):
        r = find.get((v, "fused"))
        if r:
            lines.append(f"- fused decode at batch 1 >= 1.0x dense at `--keep 0.25` (`{v}`): "
                         f"{_versus(r, dense, 'decode_b1')}: {verdict(r['decode_b1'] >= dense['decode_b1'])}.")
    for v in ("resmoe keep 0.25", BITMAP, "resmoe residual-keep 0.25"):
        r = find.get((v, "fused"))
        if r:
            lines.append(f"- fused decode at batch 8 >= 1.5x dense (`{v}`): {_versus(r, dense, 'decode_b8')}: "
                         f"{verdict(r['decode_b8'] >= 1.5 * dense['decode_b8'])}.")
    r = find.get((KQUANT, "fused"))
    if r:
        lines.append(f"- fused decode at batch 1 >= 1.3x dense at `--bits 3` or lower (`{KQUANT}`, "
                     f"{r['expert_bits']:.2f} bits per expert weight; the compiled kernels decode the packed codes "
                     f"inside the products): {_versus(r, dense, 'decode_b1')}: "
                     f"{verdict(r['decode_b1'] >= 1.3 * dense['decode_b1'])}. At batch 8: "
                     f"{_versus(r, dense, 'decode_b8')}: {verdict(r['decode_b8'] >= 1.5 * dense['decode_b8'])} "
                     "against the 1.5x target.")
    else:
        lines.append("- fused decode at batch 1 >= 1.3x dense at `--bits 3` or lower: **not measured** in this run "
                     "(`--skip-kquant`).")
    for v in ("resmoe keep 0.25", BITMAP, KQUANT):
        r = find.get((v, "fused"))
        if r and r.get("fused_bytes"):
            b = r["fused_bytes"]
            held = sum(x for k, x in b.items() if k != "csr_entries")
            bound = 1.1 * r["expert_bytes"] + b["non_expert"]
            lines.append(f"- fused resident memory <= 1.1x the expert bytes in the file plus the non-expert weights "
                         f"(`{v}`): the model holds {held / MIB:.1f} MiB of tensors "
                         f"({(held - b['non_expert']) / MIB:.1f} MiB of experts: barycenters and residual "
                         f"operators, {HELD[v]}) against "
                         f"1.1 x {r['expert_bytes'] / MIB:.1f} + {b['non_expert'] / MIB:.1f} = "
                         f"{bound / MIB:.1f} MiB ({held / bound:.3f} of the bound): {verdict(held <= bound)}. Its RSS "
                         f"after load is {(r['rss_after_load'] - m['baseline_rss']) / MIB:.0f} MiB above the "
                         f"interpreter's (dense: {(dense['rss_after_load'] - m['baseline_rss']) / MIB:.0f} MiB for "
                         f"{m['dense_bytes'] / MIB:.0f} MiB of weights).")
    lazy = [(mode, r) for (v, mode), r in find.items() if v == BITMAP and mode.startswith("lazy")]
    for mode, r in lazy:
        c = r.get("cache") or {}
        target = (f": target >= 0.5x dense {verdict(r['decode_b1'] >= 0.5 * dense['decode_b1'])}"
                  if mode.endswith(" 25%") else "")
        lines.append(f"- {mode} (`{BITMAP}`; 100% = {r['expert_records'] / MIB:.0f} MiB, the experts' operators as "
                     "fused mode holds them): decode b1 "
                     f"{_versus(r, dense, 'decode_b1')}; hit rate {c.get('hit_rate', 0):.1%} over {c.get('uses', 0)} "
                     f"uses, {c.get('resident_experts', 0)} experts resident, {c.get('build_seconds', 0):.2f} s "
                     f"building experts from the file{target}.")
    return lines


def report_bf16(res: dict, png: str) -> str:
    """RUNTIME_BF16.md (issue 18's targets), entirely from the measurements in ``res``."""
    m, rows, prov = res["meta"], res["rows"], res["provenance"]
    dense = rows[0]
    base = m["baseline_rss"]
    kern = next((r["native_kernels"] for r in rows if r.get("native_kernels")), {})
    lines = [
        "# Torch runtime in bf16: fused and lazy against dense (`benchmarks/runtime.py --only-bf16`)", "",
        f"Model: synthetic upcycled Mixtral (hub tensor names), **bf16 source, bf16 compute**: hidden {m['hidden']}, "
        f"intermediate {m['inter']}, {m['experts']} experts, top-{m['top_k']}, {m['layers']} layers, vocabulary "
        f"{m['vocab']}; {m['dense_bytes'] / MIB:.0f} MiB of weights, {m['expert_dense_bytes'] / MIB:.0f} MiB of them "
        "experts. Dense: the source loaded with transformers' `from_pretrained(dtype=torch.bfloat16)` (experts "
        f"implementation `{dense.get('experts_implementation')}`); the others `load_model(..., dtype=\"bf16\")`. "
        f"Each row is the median of {prov['timing_runs']} fresh processes (ranges in brackets); prefill "
        f"{m['prefill_tokens']} "
        f"tokens, decode {m['decode_steps']} steps with the KV cache. Fused mode's compiled kernels: "
        f"{'in use' if kern.get('available') else 'not in use (' + str(kern.get('reason')) + ')'}, AVX-512 "
        f"{'yes' if kern.get('avx512') else 'no'}, AVX512-BF16 dot products {'yes' if kern.get('dpbf16') else 'no'}.",
        "", table(rows), "", f"![memory and decode speed per mode]({png})", "", "## Targets", ""]

    lines += bf16_targets(res)
    lines += ["- Logits against materialize, bf16 and fp32 sources: pinned by tests (tests/test_runtime.py "
              "`test_every_method_and_encoding`, tests/test_native_kernels.py), within spec 6.7's bound for "
              "unrounded weights (sparse records of bf16 values are multiplied as B + D).", ""]
    kq = next((r for r in rows if r["variant"] == KQUANT and r["mode"] == "fused"), None)
    if kq and kq["decode_b1"] < 1.3 * dense["decode_b1"]:
        lines += [f"Why `{KQUANT}` misses its target: fused mode multiplies every token by the barycenter and by "
                  "each routed expert's residual, so a token touches more weights than in the dense model; the "
                  "k-quant kernels are bound by the instructions that turn codes into bf16 words and by the dot "
                  "products rather than by the bytes they read ([KQUANT_KERNELS.md](KQUANT_KERNELS.md), one product "
                  "at a time); and the rest of a decoding step (attention, norms, the layers' Python) is the same "
                  "time in both. The bytes read per token fall with the bits; the time does not fall with them.",
                  ""]
    lines += ["Routing in this synthetic model is random (every expert about equally often), so a cache of p% of the "
              "experts hits about p% of the time whatever its policy; a trained model repeats experts and hits more.",
              "", "## Memory per mode, above the interpreter", ""]
    for r in rows:
        lines.append(f"- {r['variant']}, {r['mode']}: {(r['rss_after_load'] - base) / MIB:.0f} MiB after load, "
                     f"{(r['peak_run'] - base) / MIB:.0f} MiB peak while running.")
    lines += ["", markdown(prov)]
    return "\n".join(lines) + "\n"


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
