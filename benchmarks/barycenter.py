"""Our exact-assignment Wasserstein barycenter against POT's ``free_support_barycenter``.

The reference is ResMoE's call: ``ot.lp.free_support_barycenter`` with every expert's design
matrix (n neurons x d = 3 * hidden) a uniform measure, ``X_init`` = expert 0,
``numItermax=100``, default ``stopThr``, on float32 arrays (the experts' dtype; numpy has no
bf16). POT's time is that call alone. Both objectives are measured the same way, outside the
timers: every expert aligned exactly (optimal assignment) to the returned barycenter,
(1/E) sum_k (1/n) sum_i ||b_i - W_k[p_k[i]]||^2 in float64.

Data: "upcycled" experts are one base design matrix with its neurons permuted per expert plus
Gaussian noise (the structure of Mixtral-style upcycled models); "random" experts are
independent Gaussian matrices (no shared structure: the worst case for the assignments).
Shapes: (a) fine-grained, 64 experts with small hidden sizes; (b) Mixtral-like, 8 experts with
n = 3.5 * hidden, scaling n. Times are the median of 3 runs, with their range.

    python benchmarks/barycenter.py [--quick] [--max-n N] [--noise S]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from provenance import collect, markdown, repeat, spread

from converters.encoders.barycenter import aligned_objective, pot_free_support, wasserstein_barycenter

RESULTS = Path(__file__).parent / "results"
TARGET = 20.0
FINE = [(64, 256, 128), (64, 512, 192)]                  # (E, n, hidden)
MIXTRAL_N = (256, 512, 1024, 2048, 4096)


def experts(kind: str, e: int, n: int, d: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return (rng.standard_normal((e, n, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    base = rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d)
    out = np.empty((e, n, d), dtype=np.float32)
    for k in range(e):
        out[k] = base[rng.permutation(n)] + noise * rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d)
    return out


def one(shape: str, kind: str, e: int, n: int, hidden: int, noise: float, seed: int, device: str = "cpu") -> dict:
    d = 3 * hidden
    w = experts(kind, e, n, d, noise, seed)
    wt = torch.from_numpy(w).to(device)
    t_ours, res = repeat(lambda: wasserstein_barycenter(wt))
    info: dict = {}
    t_pot, x_pot = repeat(lambda: pot_free_support(w, info=info))
    pot_obj = aligned_objective(x_pot, w)                   # outside the timer, as ours is measured
    pot, ours = spread(t_pot), spread(t_ours)
    row = {
        "shape": shape, "kind": kind, "E": e, "n": n, "hidden": hidden, "d": d,
        "pot_s": pot["median"], "ours_s": ours["median"], "speedup": pot["median"] / ours["median"],
        "pot_s_spread": pot, "ours_s_spread": ours,
        "speedup_range": [pot["min"] / ours["max"], pot["max"] / ours["min"]],
        "pot_objective": pot_obj, "ours_objective": res.objective,
        "pot_iterations": info["iterations"], "ours_iterations": res.iterations,
        "ours_solver_calls": res.solver_calls, "assignments": e * res.iterations,
        "pot_emd_not_converged": info["emd_not_converged"],
    }
    row["objective_ok"] = res.objective <= pot_obj * (1 + 1e-9)
    return row


def run(quick: bool, max_n: int, noise: float, device: str = "cpu") -> dict:
    prov = collect(("torch", "numpy", "scipy", "ot"),
                   device=device if device == "cpu" else torch.cuda.get_device_name(device))
    torch.manual_seed(0)
    wasserstein_barycenter(torch.from_numpy(experts("random", 4, 32, 24, noise, 0)).to(device))  # warm-up
    pot_free_support(experts("random", 2, 8, 6, noise, 0))
    jobs = []
    fine = FINE[:1] if quick else FINE
    for e, n, h in fine:
        for kind in ("upcycled", "random"):
            jobs.append(("fine-grained", kind, e, n, h))
    for n in MIXTRAL_N:
        if n > max_n:
            continue
        for kind in ("upcycled", "random"):
            jobs.append(("Mixtral-like", kind, 8, n, round(n / 3.5)))
    rows = []
    for i, (shape, kind, e, n, h) in enumerate(jobs):
        row = one(shape, kind, e, n, h, noise, seed=1000 + i, device=device)
        rows.append(row)
        print(f"{shape:13s} {kind:9s} E={e:3d} n={n:5d} d={3 * h:5d}  POT {row['pot_s']:8.2f}s  "
              f"ours {row['ours_s']:7.3f}s  x{row['speedup']:5.1f}  obj POT {row['pot_objective']:.6f} "
              f"ours {row['ours_objective']:.6f}  it {row['pot_iterations']}/{row['ours_iterations']}", flush=True)
    return {"provenance": prov, "noise": noise, "target_speedup": TARGET, "rows": rows,
            "readme": readme_sentence(rows, prov)}


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == shape]
        lo, hi = min(r["speedup"] for r in rs), max(r["speedup"] for r in rs)
        met = [r for r in rs if r["speedup"] >= TARGET]
        state = "met" if len(met) == len(rs) else ("partly met" if met else "NOT met")
        out.append(f"- **{shape}: {TARGET:.0f}x target {state}** - speedups {lo:.1f}x to {hi:.1f}x "
                   f"({len(met)} of {len(rs)} rows at or above {TARGET:.0f}x); objective equal or lower than "
                   f"POT's in {sum(r['objective_ok'] for r in rs)} of {len(rs)} rows.")
    return out


INTRO = (
    "POT as ResMoE calls it: `ot.lp.free_support_barycenter`, X_init = expert 0, numItermax=100, default "
    "stopThr, float32 inputs. Ours: `converters.encoders.barycenter.wasserstein_barycenter` (same start, "
    "exact LAP per expert per iteration, float32 similarities, float64 objective). Objective: mean over "
    "experts and neurons of ||b_i - W_k[p_k[i]]||^2 with every expert aligned exactly to the returned "
    "barycenter, computed the same way for both and outside the timers (POT's seconds are "
    "`ot.lp.free_support_barycenter` alone). Seconds: median of 3 runs; the speedup range pairs the "
    "slowest run of one with the fastest of the other. "
    "Upcycled experts: one base permuted per expert + Gaussian noise of {noise:g} x the base's scale; "
    "random: independent Gaussian experts."
)
OBJECTIVES = (
    "Objectives: equal to POT's wherever POT solved every OT problem exactly: from the same start both run "
    "the same fixed-point iteration (POT with network simplex, ours with an exact linear assignment per "
    "expert), so they reach the same fixed point. Where POT's `ot.emd` stopped at its default "
    "numItermax=100000 before optimality (last column: number of such calls, each with a warning), POT's "
    "transport plans are not optimal and its barycenter is worse; ours stays exact."
)
BOUNDS = [
    ("Per expert and iteration POT computes a float32 cost matrix (one n x n x d matmul), runs network "
     "simplex, and multiplies the dense n x n plan by the expert (a second n x n x d matmul). Ours computes "
     "one n x n x d float32 similarity matmul (none for the starting expert in the first iteration: its "
     "identity alignment has distance 0), a row argmax, and calls the LAP solver only when the argmax is "
     "not already a permutation."),
    ("Upcycled experts: every assignment is settled by the argmax shortcut (0 solver calls), so ours is "
     "bound by the similarity matmuls: two full passes (align to expert 0, then confirm the fixed point), "
     "the same two iterations POT needs. POT's own per-iteration cost is about two matmuls plus a network "
     "simplex on an easy matrix, which caps any method that computes exact float32 similarities near what "
     "is measured here; 20x on this CPU would need the similarities several times cheaper than one float32 "
     "GEMM."),
    ("Random experts: the first iteration needs a full LAP per expert on an unstructured matrix (scipy's "
     "`linear_sum_assignment`); later iterations recompute only the "
     "barycenter rows that moved, and their LAPs are near-permutations."),
    ("On a GPU the matmuls, argmaxes and incremental updates run on the device and only solver calls "
     "(none for upcycled experts) go to the CPU, while POT stays on the CPU; not measured here."),
]


def report(res: dict, png: str) -> str:
    rows = res["rows"]
    lines = [
        "# Barycenter: exact assignments vs POT's free_support_barycenter",
        "",
        INTRO.format(noise=res["noise"]),
        "",
        f"In the README: {res['readme']}",
        "",
        "## Target (>= 20x faster, equal or lower objective)",
        "",
        *verdicts(rows),
        "",
        "## Results",
        "",
        ("| shape | data | E | n | d | POT s (range) | ours s (range) | speedup (range) | POT objective "
         "| ours objective | POT iters | ours iters | ours LAP solver calls | POT emd not converged |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p, o, (lo, hi) = r["pot_s_spread"], r["ours_s_spread"], r["speedup_range"]
        lines.append(
            f"| {r['shape']} | {r['kind']} | {r['E']} | {r['n']} | {r['d']} "
            f"| {p['median']:.3f} ({p['min']:.3f}-{p['max']:.3f}) | {o['median']:.3f} ({o['min']:.3f}-{o['max']:.3f}) "
            f"| {r['speedup']:.1f}x ({lo:.1f}-{hi:.1f}) | {r['pot_objective']:.6f} | {r['ours_objective']:.6f} "
            f"| {r['pot_iterations']} "
            f"| {r['ours_iterations']} | {r['ours_solver_calls']}/{r['assignments']} | {r['pot_emd_not_converged']} |")
    lines += ["", OBJECTIVES, "", "## What bounds the speedup", ""]
    lines += [f"- {b}" for b in BOUNDS]
    lines += ["", f"![time and speedup]({png})", "", markdown(res["provenance"])]
    return "\n".join(lines)


def readme_sentence(rows: list[dict], prov: dict) -> str:
    """The README's sentence about the barycenter, from the rows."""
    ok = sum(r["objective_ok"] for r in rows)
    better = sum(r["ours_objective"] < r["pot_objective"] * (1 - 1e-9) for r in rows)
    lower = f" ({better} lower)" if better else ""
    obj = (f"matches or beats POT's objective in all {len(rows)} cases{lower}" if ok == len(rows)
           else f"matches or beats POT's objective in {ok} of {len(rows)} cases")
    lo, hi = min(r["speedup"] for r in rows), max(r["speedup"] for r in rows)
    return (f"The barycenter, by exact assignments, {obj} and is {lo:.1f}-{hi:.1f}x faster than "
            f"`ot.lp.free_support_barycenter` alone on {prov['cpus_usable']} CPU cores (median of 3 runs)")


def print_table(rows: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:                                   # pragma: no cover
        return
    t = Table(title="barycenter: POT vs ours")
    for col in ("shape", "data", "E", "n", "d", "POT s", "ours s", "speedup", "POT obj", "ours obj",
                "POT it", "ours it", "solver calls", "emd not conv."):
        t.add_column(col, justify="left" if col in ("shape", "data") else "right")
    for r in rows:
        t.add_row(r["shape"], r["kind"], str(r["E"]), str(r["n"]), str(r["d"]), f"{r['pot_s']:.3f}",
                  f"{r['ours_s']:.3f}", f"{r['speedup']:.1f}x", f"{r['pot_objective']:.6f}",
                  f"{r['ours_objective']:.6f}", str(r["pot_iterations"]), str(r["ours_iterations"]),
                  f"{r['ours_solver_calls']}/{r['assignments']}", str(r["pot_emd_not_converged"]))
    Console(width=200).print(t)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for kind, color in (("upcycled", "tab:blue"), ("random", "tab:orange")):
        rs = [r for r in rows if r["shape"] == "Mixtral-like" and r["kind"] == kind]
        if not rs:
            continue
        ns = [r["n"] for r in rs]
        ax1.plot(ns, [r["pot_s"] for r in rs], "o--", color=color, label=f"POT, {kind}")
        ax1.plot(ns, [r["ours_s"] for r in rs], "s-", color=color, label=f"ours, {kind}")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("n (neurons per expert), d = 3 * round(n / 3.5)")
    ax1.set_ylabel("seconds")
    ax1.set_title("Mixtral-like layer, 8 experts")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    labels = [f"{'fine' if r['shape'] == 'fine-grained' else 'mix'} {r['kind'][:3]} n={r['n']}" for r in rows]
    colors = ["tab:blue" if r["kind"] == "upcycled" else "tab:orange" for r in rows]
    ax2.bar(range(len(rows)), [r["speedup"] for r in rows], color=colors)
    ax2.axhline(res["target_speedup"], color="red", linestyle="--", label=f"target {res['target_speedup']:.0f}x")
    ax2.set_xticks(range(len(rows)))
    ax2.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax2.set_ylabel("speedup over POT (x)")
    ax2.set_title("speedup (blue: upcycled, orange: random)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one fine-grained shape, n <= 1024; writes *_quick files")
    ap.add_argument("--max-n", type=int, default=4096, help="largest Mixtral-like n (default 4096)")
    ap.add_argument("--noise", type=float, default=1.0, help="noise scale of the upcycled experts (default 1.0)")
    ap.add_argument("--device", default="cpu", help="where ours runs: cpu or cuda (POT always runs on the CPU); "
                    "results for cuda go to *_cuda files")
    args = ap.parse_args()
    max_n = min(args.max_n, 1024) if args.quick else args.max_n
    res = run(args.quick, max_n, args.noise, args.device)
    print_table(res["rows"])
    suffix = ("_quick" if args.quick else "") + ("" if args.device == "cpu" else "_cuda")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"barycenter{suffix}.json").write_text(json.dumps(res, indent=2))
    (RESULTS / f"BARYCENTER{suffix.upper()}.md").write_text(report(res, f"barycenter{suffix}.png"))
    plot(res, RESULTS / f"barycenter{suffix}.png")
    print("\n".join(verdicts(res["rows"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
