"""EVAL.md and the per-fixture plots of ``eval.py``, entirely from the rows, the targets and the provenance."""
from __future__ import annotations

from pathlib import Path

import targets

#: family -> (colour, marker, legend label)
STYLE = {"resmoe": ("tab:blue", "o", "resmoe --bits (data-free)"),
         "resmoe-cal": ("tab:purple", "s", "resmoe --bits --calibration"),
         "quant": ("tab:cyan", "D", "--method quant (no base)"),
         "resmoe-sparse": ("tab:gray", "x", "resmoe --bits --sparse-residuals"),
         "resmoe-cal-sparse": ("tab:brown", "*", "resmoe --bits --calibration --sparse-residuals"),
         "resmoe-lowrank": ("tab:olive", "<", "resmoe --bits --lowrank-residuals"),
         "resmoe-cal-lowrank": ("tab:pink", ">", "resmoe --bits --calibration --lowrank-residuals"),
         "d2moe": ("black", "h", "d2moe --keep (Fisher base, whitened low-rank deltas)"),
         "d2moe-sharev": ("dimgray", "H", "d2moe --keep --share-v"),
         "d2moe-prune": ("silver", "d", "d2moe --keep --prune-base 0.2"),
         "d2moe-bits": ("sienna", "8", "d2moe --bits (k-quant base and factors)"),
         "resmoe-svd": ("darkblue", "1", "resmoe --keep --residual svd"),
         "resmoe-prune": ("steelblue", "2", "resmoe --keep (pruned residuals)"),
         "llama.cpp": ("tab:green", "P", "llama.cpp k-quants"),
         "hqq": ("tab:orange", "^", "HQQ"),
         "gptq": ("tab:red", "v", "GPTQ (llm-compressor)")}

INTRO = """\
Held-out text: {windows} of `benchmarks/fixtures/heldout.txt` (standard-library files never seen in
training), each window evaluated from an empty context; perplexity per byte (uniform: 256).
**KLD**: mean KL divergence of the next-byte distribution from the original model's, over every
predicted byte; the reference for every row is the original model in float32 in torch, so the
llama.cpp rows also carry llama.cpp's own difference from torch, which the `f32` row (the
unquantized GGUF) measures. **Same top**: fraction of positions whose most likely next byte is the
original's. **Bits / expert weight**: 8 x stored expert bytes / expert weights, the stored bytes
being the `.rmoe` byte accounting (`resmoe-inspect`: base, permutations, codes, scales, indices),
the GGUF's `ffn_*_exps` tensors, HQQ's packed codes with fp16 scales and zeros, and the tensors of
compressed-tensors' `pack-quantized` format for GPTQ (packed codes and zero points, fp16 scales).
Only expert weights are quantized by the resmoe, quant, HQQ and GPTQ rows; the llama.cpp presets
quantize attention and embeddings too (their expert bytes are counted alone).

Families: `resmoe` (`resmoe-convert --bits B`, data-free), `resmoe-cal` (the same with
`--calibration benchmarks/fixtures/calibration.txt`), `quant` (`--method quant --bits B`: the same
quantizer and allocator without a base), `resmoe-sparse` and `resmoe-cal-sparse` (`resmoe` and
`resmoe-cal` with `--sparse-residuals`: sparse residuals among the allocator's choices),
`resmoe-lowrank` and `resmoe-cal-lowrank` (the same with `--lowrank-residuals`); `d2moe`
(`--method d2moe --keep F --calibration`: Fisher-weighted base, whitened low-rank deltas in the
source dtype; the d2moe families calibrate on the first 16 KiB of `calibration.txt`, 64 windows, to
bound the Fisher pass's time, with `--allow-unrouted-experts`: qwen3_moe_fine has experts no text
routes to), `d2moe-bits` (`--method d2moe --bits B`, B = 2.5, 3, 4),
`d2moe-sharev` (`d2moe` with `--share-v`), `d2moe-prune` (with `--prune-base 0.2`, the reference's
default ratio), `resmoe-svd` (`--keep F --residual svd`) and `resmoe-prune` (`--keep F`), at the
paper's 40-60% compression (F = 0.4, 0.5, 0.6); all run in the torch runtime (materialize, float32);
`llama.cpp` (the original exported to GGUF and quantized by llama.cpp's quantizer, run in
llama.cpp); `hqq` (package `hqq`, groups of 64, data-free) and `gptq` (package `llmcompressor`,
GPTQ on the expert projections only, groups of 64, asymmetric, calibrated on `calibration.txt`:
64 KiB of the fixtures' training files, none of them held out), both run in the torch runtime.
Time to make: seconds to convert or quantize (the llama.cpp rows: export and quantize)."""


def _windows(rows: list[dict]) -> str:
    tokens = {r["tokens"] for r in rows}
    if len(tokens) != 1:
        return "windows of 256 bytes (the rows do not all cover the same bytes)"
    n = tokens.pop()
    return f"{-(-n // 256)} windows of 256 bytes ({n} predicted bytes)"


def table(rows: list[dict]) -> list[str]:
    orig = next((r for r in rows if r["family"] == "original"), None)
    out = ["| family | setting | bits / expert weight | expert MiB | held-out ppl | vs original | mean KLD "
           "| same top | time to make (s) |", "|---|---|---|---|---|---|---|---|---|"]
    order = ["original", *STYLE]
    for r in sorted(rows, key=lambda r: (order.index(r["family"]), targets.bits(r))):
        rel = f"{r['ppl'] / orig['ppl'] - 1:+.2%}" if orig else ""
        flag = " (over budget)" if r.get("over_budget") else ""
        out.append(f"| {r['family']} | {r['setting']}{flag} | {targets.bits(r):.3f} | {r['expert_bytes'] / 2**20:.2f} "
                   f"| {r['ppl']:.4f} | {rel} | {r['kld']:.5f} | {r['same_top']:.2%} | {r['seconds_to_make']:g} |")
    return out


def markdown(rows: list[dict], checks: list[dict], prov: dict, sources: dict) -> str:
    """EVAL.md; ``sources``: per results file, the provenance of its run and of the runs its kept rows came from."""
    from provenance import markdown as how

    out = ["# Evaluation on the trained fixtures (`benchmarks/eval.py`)", "",
           INTRO.format(windows=_windows(rows)), "", "## Targets (computed from the rows below)", ""]
    for c in checks:
        out.append(f"- `{c['fixture']}`, {c['target']}: **{targets.verdict(c)}**. {c['detail']}.")
    if not checks:
        out.append("- no fixture with targets was evaluated")
    for fx in sorted({r["fixture"] for r in rows}):
        out += ["", f"## {fx}", "", *table([r for r in rows if r["fixture"] == fx]), "",
                f"![perplexity and KL divergence against bits per expert weight](eval_{fx}.png)"]
    out += d2moe_section(d2moe_comparison(rows))
    out += ["", how(prov).replace("## How this was made", "## How this report was made"),
            "## Where the rows come from", ""]
    for fname, provs in sources.items():
        for i, p in enumerate(provs):
            dirty = " (uncommitted changes)" if p.get("git_dirty") else ""
            what = "rows of the families not in that run: " if i else ""
            out.append(f"- `{fname}`: {what}`{p['command']}` at commit `{p['git_commit']}`{dirty}, {p['date_utc']}, "
                       f"{p['cpu']}, torch threads {p['torch_threads']}; "
                       + ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v))
    return "\n".join(out) + "\n"


def plot(rows: list[dict], fixture: str, path: Path) -> None:
    """Two panels against bits per expert weight: perplexity (linear, worse points on the top edge) and
    mean KLD (log): per family its points and its frontier line; the original and llama.cpp f32 as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["fixture"] == fixture]
    orig = next((r for r in rs if r["family"] == "original"), None)
    f32 = next((r for r in rs if r["family"] == "llama.cpp" and r["setting"] == "f32"), None)
    pts = {f: [r for r in rs if r["family"] == f and not (f == "llama.cpp" and r["setting"] == "f32")] for f in STYLE}
    pts = {f: v for f, v in pts.items() if v}
    every = [r for v in pts.values() for r in v]
    if not every:
        return
    base = orig["ppl"] if orig else min(r["ppl"] for r in every)
    top = min(max(r["ppl"] for r in every), 1.5 * base)
    top = base + 1.08 * (top - base) if top > base else base * 1.01
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6.5))
    for fam, v in pts.items():
        color, marker, label = STYLE[fam]
        for ax, key in ((ax1, "ppl"), (ax2, "kld")):
            front = targets.frontier(v, key)
            ys = [min(r[key], top) if key == "ppl" else max(r[key], 1e-7) for r in v]
            ax.scatter([targets.bits(r) for r in v], ys, color=color, marker=marker, s=36, alpha=0.6,
                       facecolors=["none" if key == "ppl" and r["ppl"] > top else color for r in v])
            fy = [r[key] for r in front] if key == "kld" else [min(r["ppl"], top) for r in front]
            ax.plot([targets.bits(r) for r in front], [max(y, 1e-7) for y in fy], color=color, lw=1.3, label=label)
        if fam == "llama.cpp":
            for r in v:
                if r["ppl"] <= top:
                    ax1.annotate(r["setting"], (targets.bits(r), r["ppl"]), xytext=(4, 4), textcoords="offset points",
                                 fontsize=7, color=color)
    if orig:
        ax1.axhline(orig["ppl"], color="grey", ls="--", lw=0.8, label=f"original (bf16): {orig['ppl']:.3f}")
    if f32:
        ax2.axhline(max(f32["kld"], 1e-7), color="tab:green", ls=":", lw=0.8,
                    label=f"llama.cpp f32 vs torch (runtime floor): {f32['kld']:.1e}")
    low = min(base, *(r["ppl"] for r in every))
    ax1.set_ylim(low - 0.04 * (top - low), top)
    ax1.set_ylabel("held-out perplexity per byte (open markers on the top edge: off scale)")
    ax2.set_yscale("log")
    ax2.set_ylabel("mean KL divergence from the original (nats per byte)")
    for ax in (ax1, ax2):
        ax.set_xlabel("bits per expert weight (stored)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{fixture}: quality against size; lines join each family's frontier (lower-left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: the families D²-MoE is compared with at equal --keep, and the quantized ones it is compared with at equal bytes
KEEP_PEERS = ("resmoe-svd", "resmoe-prune")
D2MOE = ("d2moe", "d2moe-sharev", "d2moe-prune")
QUANTIZED = ("resmoe", "resmoe-cal", "quant", "resmoe-lowrank", "resmoe-cal-lowrank", "llama.cpp", "hqq", "gptq")
#: the paper's claim: more than 13% better than other compressors at equal compression
CLAIM = 0.13


def d2moe_comparison(rows: list[dict]) -> list[dict]:
    """Per fixture and --keep: the d2moe rows against resmoe's at the same keep, and every d2moe row (keep and
    --bits) against the best quantized row at equal or fewer bits. ``gain``: the share of the best resmoe row's
    perplexity increase over the original that d2moe avoids (the paper's "> 13% better", read on perplexity)."""
    out = []
    for fx in sorted({r["fixture"] for r in rows if r["family"] in D2MOE + ("d2moe-bits",)}):
        rs = [r for r in rows if r["fixture"] == fx]
        orig = next((r for r in rs if r["family"] == "original"), None)
        if orig is None:
            continue
        for r in sorted((r for r in rs if r["family"] in D2MOE + ("d2moe-bits",)),
                        key=lambda r: (r["family"], targets.bits(r))):
            c = {"fixture": fx, "family": r["family"], "setting": r["setting"], "bits": targets.bits(r),
                 "ppl": r["ppl"], "kld": r["kld"], "original_ppl": orig["ppl"]}
            peers = [p for p in rs if p["family"] in KEEP_PEERS and p["setting"] == r["setting"]]
            if peers:
                best = min(peers, key=lambda p: p["ppl"])
                c.update(peer=targets.name(best), peer_ppl=best["ppl"], peer_kld=best["kld"],
                         peer_bits=targets.bits(best),
                         gain=1 - (r["ppl"] - orig["ppl"]) / (best["ppl"] - orig["ppl"])
                         if best["ppl"] > orig["ppl"] else None)
            q = targets.best(rs, QUANTIZED, targets.bits(r))
            if q is not None:
                c.update(quantized=targets.name(q), quantized_ppl=q["ppl"], quantized_kld=q["kld"],
                         quantized_bits=targets.bits(q))
            out.append(c)
    return out


def d2moe_section(comparison: list[dict]) -> list[str]:
    """EVAL.md's D²-MoE section from :func:`d2moe_comparison`."""
    if not comparison:
        return []
    out = ["", "## D²-MoE against resmoe at equal `--keep` and against the quantized rows at equal bytes", "",
           "`vs resmoe`: the best of `resmoe-svd` and `resmoe-prune` at the same `--keep`, and the share of its "
           "perplexity increase over the original that the d2moe row avoids (the paper claims more than "
           f"{CLAIM:.0%} better than other compressors at equal compression). `best quantized`: the "
           "lowest-perplexity row of any quantized family (resmoe and quant `--bits`, llama.cpp, HQQ, GPTQ) at "
           "equal or fewer bits per expert weight.", "",
           "| fixture | d2moe row | bits | ppl | KLD | vs resmoe (same keep) | ppl | share of its increase avoided "
           "| best quantized at <= bits | ppl |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in comparison:
        gain = f"{c['gain']:+.1%}" if c.get("gain") is not None else ""
        out.append(f"| {c['fixture']} | {c['family']} {c['setting']} | {c['bits']:.3f} | {c['ppl']:.4f} | "
                   f"{c['kld']:.5f} | {c.get('peer', '')} | {c['peer_ppl']:.4f} | {gain} | " if "peer" in c else
                   f"| {c['fixture']} | {c['family']} {c['setting']} | {c['bits']:.3f} | {c['ppl']:.4f} | "
                   f"{c['kld']:.5f} | | | | ")
        out[-1] += (f"{c['quantized']} ({c['quantized_bits']:.3f} bits) | {c['quantized_ppl']:.4f} |"
                    if "quantized" in c else "| |")
    out += ["", *d2moe_findings(comparison)]
    return out


def d2moe_findings(comparison: list[dict]) -> list[str]:
    """Plain sentences: where the claim holds and where it does not, and the equal-bytes verdict."""
    lines = []
    for fx in sorted({c["fixture"] for c in comparison}):
        cs = [c for c in comparison if c["fixture"] == fx and c["family"] == "d2moe" and c.get("gain") is not None]
        if cs:
            held = [c for c in cs if c["gain"] >= CLAIM]
            lines.append(f"- `{fx}`: plain d2moe avoids "
                         + ", ".join(f"{c['gain']:.0%} at {c['setting']}" for c in cs)
                         + f" of the best resmoe row's perplexity increase: the {CLAIM:.0%} claim "
                         + ("holds at every budget" if len(held) == len(cs) else
                            "holds at none of the budgets" if not held else
                            f"holds at {', '.join(c['setting'] for c in held)} only") + ".")
        for fam, flag in (("d2moe-sharev", "`--share-v`"), ("d2moe-prune", "`--prune-base`")):
            plain = {p["setting"]: p for p in comparison if p["fixture"] == fx and p["family"] == "d2moe"}
            pairs = [(c, plain[c["setting"]]) for c in comparison
                     if c["fixture"] == fx and c["family"] == fam and c["setting"] in plain]
            if pairs:
                better = sum(c["ppl"] < p["ppl"] for c, p in pairs)
                lines.append(f"- `{fx}`: {flag} against plain d2moe at the same keep, perplexity "
                             + ", ".join(f"{c['ppl']:.4f} against {p['ppl']:.4f} at {c['setting']}" for c, p in pairs)
                             + f": lower in {better} of {len(pairs)}.")
        beaten = [c for c in comparison if c["fixture"] == fx and "quantized" in c and c["quantized_ppl"] <= c["ppl"]]
        every = [c for c in comparison if c["fixture"] == fx and "quantized" in c]
        if every:
            lines.append(f"- `{fx}`: at equal or fewer bytes a quantized row has perplexity at or below the d2moe "
                         f"row in {len(beaten)} of {len(every)} cases"
                         + (f" (e.g. {beaten[0]['quantized']} at {beaten[0]['quantized_bits']:.2f} bits: "
                            f"{beaten[0]['quantized_ppl']:.4f} against {beaten[0]['family']} {beaten[0]['setting']} "
                            f"at {beaten[0]['bits']:.2f} bits: {beaten[0]['ppl']:.4f})" if beaten else "") + ".")
    return lines
