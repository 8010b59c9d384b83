"""Compressed experts (resmoe-tune-ce, spec 4.5) on the fine-grained fixture (Qwen3-MoE, top-4 of 32 experts).

Rows: the full top-4 model; top-(4 - n_ce) with the auxiliary experts dropped (every vector one: the main
experts keep their routing weights); the same with the router re-normalised over the top-(4 - n_ce) (the
model's own config with num_experts_per_tok = 4 - n_ce, a stronger baseline); and top-(4 - n_ce) with vectors
trained by ``resmoe-tune-ce`` on ``--text-bytes`` bytes of the fixtures' training files (``ce_text.py``: none of
the held-out files ``heldout.txt`` is cut from; ``--text-bytes 0``: ``fixtures/calibration.txt``), for n_ce = 1
and 2. Columns: held-out perplexity and mean KLD against the float32 source model (benchmarks/kld.py, the
windows of EVAL.md), the fraction of the perplexity gap between the dropped row and the full model that the
vectors close, prefill and decode tokens per second in materialize and fused mode on the CPU (median of
``--runs`` runs in one process, batch 1: PREFILL tokens, then DECODE steps with the KV cache), and active
expert parameters per token. The full top-4 is timed twice in materialize mode: with transformers' own experts
module (its default experts implementation, recorded) and with resmoe's compressed-experts layer at n_ce = 0,
whose few-token path (CEExperts._run_direct) the other rows also decode with.

    python benchmarks/compressed_experts.py [--steps STEPS] [--lr LR] [--objective OBJ] [--schedule S] [--files DIR]
    python benchmarks/compressed_experts.py --speed-only DIR   # re-time the trained files kept in DIR

Results: benchmarks/results/COMPRESSED_EXPERTS.md and compressed_experts.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import kld  # noqa: E402
from provenance import collect, markdown, spread  # noqa: E402

FIXTURE = HERE / "fixtures" / "qwen3_moe_fine"
CALIBRATION = HERE / "fixtures" / "calibration.txt"
RESULTS = HERE / "results"
#: the selection of the training options (what was tried, scored on the first 256 held-out windows)
SETTINGS = RESULTS / "compressed_experts_settings.txt"
PREFILL = 128
DECODE = 32
MODES = ("materialize", "fused")
#: torch threads while timing prefill and decode
SPEED_THREADS = 1
#: resmoe-tune-ce's options for both n_ce (chosen in results/compressed_experts_settings.txt)
STEPS, LR, OBJECTIVE, SCHEDULE = 720, 3e-3, "lm", "cosine"
#: bytes of training text (benchmarks/ce_text.py: the fixtures' training files only)
TEXT_BYTES = 2_000_000


def overlap(text: bytes | None = None, chunk: int = 64) -> tuple[int, int]:
    """(chunks of ``chunk`` bytes of the training text (default calibration.txt) found in heldout.txt, chunks): how
    disjoint they are."""
    from ce_text import overlap as count

    return count(CALIBRATION.read_bytes() if text is None else text, kld.HELDOUT.read_bytes(), chunk)


def log(msg: str) -> None:
    print(msg, flush=True)


def one_run(model, ids) -> tuple[float, float]:
    """(prefill tokens/s of ``ids`` (batch 1), decode tokens/s of DECODE steps with the KV cache)."""
    import torch

    with torch.inference_mode():
        t = time.perf_counter()
        out = model(ids, use_cache=True)
        pre = ids.shape[1] / (time.perf_counter() - t)
        pkv, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(DECODE):
            o = model(nxt, cache=pkv, use_cache=True)
            pkv, nxt = o.cache, o.logits[:, -1:].argmax(-1)
        return pre, DECODE / (time.perf_counter() - t)


def speeds(models: dict, vocab: int, runs: int) -> dict:
    """Name -> {"prefill", "decode"} medians over ``runs`` rounds; each round runs every model once, one after
    the other, so that a change of load on a shared machine touches all of them alike."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(SPEED_THREADS)  # two shared cores: one thread each is far less noisy than two
    g = torch.Generator().manual_seed(0)
    got = {k: ([], []) for k in models}
    for m in models.values():
        one_run(m, torch.randint(3, vocab, (1, 8), generator=g))  # warm-up
    for _ in range(runs):
        ids = torch.randint(3, vocab, (1, PREFILL), generator=g)
        for k, m in models.items():
            p, d = one_run(m, ids)
            got[k][0].append(p)
            got[k][1].append(d)
    torch.set_num_threads(threads)
    return {k: {"prefill": statistics.median(p), "decode": statistics.median(d), "prefill_runs": spread(p),
                "decode_runs": spread(d)} for k, (p, d) in got.items()}


def expert_share(path: Path, tokens: int = 64) -> list[dict]:
    """Where decode time goes: per mode and n_ce (0 and the file's), decode tokens/s and the share of it spent in
    the experts layers (forward hooks on the CEExperts modules), one thread, batch 1."""
    import torch

    from resmoe_format.torch import load_model
    from resmoe_format.torch.ce import CEExperts

    threads = torch.get_num_threads()
    torch.set_num_threads(SPEED_THREADS)
    out = []
    for mode in MODES:
        for n_ce in (0, None):
            model = load_model(path, mode, dtype="fp32", n_ce=n_ce)
            spent = [0.0]

            def pre(mod, args):
                mod._t0 = time.perf_counter()

            def post(mod, args, res, spent=spent):
                spent[0] += time.perf_counter() - mod._t0

            for mod in model.modules():
                if isinstance(mod, CEExperts):
                    mod.register_forward_pre_hook(pre)
                    mod.register_forward_hook(post)
            with torch.inference_mode():
                o = model(torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(0)), use_cache=True)
                pkv, nxt = o.cache, o.logits[:, -1:].argmax(-1)
                spent[0] = 0.0
                t = time.perf_counter()
                for _ in range(tokens):
                    o = model(nxt, cache=pkv, use_cache=True)
                    pkv, nxt = o.cache, o.logits[:, -1:].argmax(-1)
                total = time.perf_counter() - t
            out.append({"mode": mode, "n_ce": n_ce if n_ce is not None else "file", "decode": tokens / total,
                        "experts_share": spent[0] / total, "experts_ms_per_token": 1e3 * spent[0] / tokens})
            log(f"{mode} n_ce={out[-1]['n_ce']}: decode {out[-1]['decode']:.1f} tok/s, experts layers "
                f"{out[-1]['experts_share']:.0%} ({out[-1]['experts_ms_per_token']:.2f} ms/token)")
    torch.set_num_threads(threads)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=None, help="held-out windows (default all, as EVAL.md)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--objective", default=OBJECTIVE, choices=("lm", "distill", "layer"))
    ap.add_argument("--schedule", default=SCHEDULE, choices=("constant", "cosine"))
    ap.add_argument("--text-bytes", type=int, default=TEXT_BYTES, help="bytes of training text from the fixtures' "
                    f"training files (ce_text.py, seed 0; default {TEXT_BYTES}); 0: fixtures/calibration.txt")
    ap.add_argument("--files", type=Path, help="keep the trained files (and training.json) in this folder and "
                    "reuse those trained with the same options (default: a temporary folder)")
    ap.add_argument("--speed-only", type=Path, metavar="DIR", help="only re-time the files a run with --files DIR "
                    "kept, replace the speeds in the .json and rewrite the .md")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    ap.add_argument("--expert-share", type=Path, metavar="CE_RMOE",
                    help="only measure where decode time goes for a file with compressed experts (n_ce=2), add it "
                         "to the .json and rewrite the .md")
    a = ap.parse_args(argv)
    if a.expert_share:
        warnings.simplefilter("ignore")
        res = json.loads((a.out / "compressed_experts.json").read_text())
        res["decode_expert_share"] = {"file": a.expert_share.name, "provenance": collect(("torch", "transformers")),
                                      "rows": expert_share(a.expert_share)}
        (a.out / "compressed_experts.json").write_text(json.dumps(res, indent=1) + "\n")
        a.report_only = True
    if a.speed_only:
        warnings.simplefilter("ignore")
        res = json.loads((a.out / "compressed_experts.json").read_text())
        res["speed_provenance"] = collect(("torch", "transformers"), speed_threads=SPEED_THREADS, timing_runs=a.runs)
        measure(res["rows"], _files(a.speed_only), a.runs)
        res["targets"] = targets(res["rows"])
        (a.out / "compressed_experts.json").write_text(json.dumps(res, indent=1) + "\n")
        a.report_only = True
    if a.report_only:
        res = json.loads((a.out / "compressed_experts.json").read_text())
        if res.get("targets"):
            res["readme"] = readme(res)
            (a.out / "compressed_experts.json").write_text(json.dumps(res, indent=1) + "\n")
        (a.out / "COMPRESSED_EXPERTS.md").write_text(report(res))
        return 0
    warnings.simplefilter("ignore")

    import torch
    import transformers

    import resmoe_format
    from converters.tune_ce import TuneOptions, tune_ce
    from resmoe_format.compressed_experts import ones_vectors, write_with_vectors
    from resmoe_format.torch import load_model

    cfg = json.loads((FIXTURE / "config.json").read_text())
    k, layers = cfg["num_experts_per_tok"], cfg["num_hidden_layers"]
    n, hidden = cfg["moe_intermediate_size"], cfg["hidden_size"]
    expert_params = 3 * n * hidden
    text = (f"{a.text_bytes} bytes of the fixtures' training files (benchmarks/ce_text.py, seed 0)" if a.text_bytes
            else f"{CALIBRATION.name} ({CALIBRATION.stat().st_size} bytes)")
    prov = collect(("torch", "transformers", "numpy"), fixture=FIXTURE.name, top_k=k, steps=a.steps, lr=a.lr,
                   batch=a.batch, window=a.window, windows=a.windows, objective=a.objective, schedule=a.schedule,
                   seed=0, prefill_tokens=PREFILL, decode_steps=DECODE, speed_threads=SPEED_THREADS,
                   training_text=text)
    prov["timing_runs"] = a.runs
    windows = kld.heldout_windows(a.windows)
    rows: list[dict] = []
    res = {"provenance": prov, "rows": rows, "training": {}}
    a.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (a.out / "compressed_experts.json").write_text(json.dumps(res, indent=1) + "\n")
        (a.out / "COMPRESSED_EXPERTS.md").write_text(report(res))

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        text_path = CALIBRATION
        if a.text_bytes:
            from ce_text import training_text

            text_path = tmp / "train.txt"
            text_path.write_bytes(training_text(a.text_bytes, 0))
        res["training_text"] = {"name": text_path.name if a.text_bytes else CALIBRATION.name,
                                "bytes": text_path.stat().st_size, "overlap": overlap(text_path.read_bytes())}
        keep = a.files or tmp
        keep.mkdir(parents=True, exist_ok=True)
        trained = json.loads((keep / "training.json").read_text()) if (keep / "training.json").exists() else {}
        t = time.perf_counter()
        src = transformers.AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
        ref = kld.Reference(tmp / "reference.npy", windows, kld.torch_logits(src, windows))
        del src
        log(f"reference: ppl {ref.result['ppl']:.4f} ({time.perf_counter() - t:.0f} s)")
        files = {}
        from converters.convert import ConvertOptions, convert

        lossless = tmp / "lossless.rmoe"  # the checkpoint, its experts exact: what resmoe-tune-ce FIXTURE makes first
        options = {"steps": a.steps, "lr": a.lr, "batch": a.batch, "window": a.window, "objective": a.objective,
                   "schedule": a.schedule, "seed": 0}
        for n_ce in (1, 2):
            out, ones = keep / f"ce{n_ce}.rmoe", keep / f"ones{n_ce}.rmoe"
            old = trained.get(str(n_ce))
            if old and old["options"] == options and old.get("text_bytes") == a.text_bytes and out.exists() \
                    and ones.exists():
                log(f"n_ce={n_ce}: reusing {out} (trained by commit {old['provenance']['git_commit']})")
            else:
                if not lossless.exists():
                    t = time.perf_counter()
                    convert(FIXTURE, lossless, ConvertOptions(lossless=True), progress=False)
                    res["lossless_seconds"] = round(time.perf_counter() - t, 1)
                t = time.perf_counter()
                rep = tune_ce(lossless, out, text_path, TuneOptions(n_ce=n_ce, device="cpu", **options),
                              progress=False)
                secs = time.perf_counter() - t
                ls = rep["losses"]
                m = min(10, len(ls))
                old = trained[str(n_ce)] = {
                    "seconds": round(secs, 1), "loss_first10": float(np.mean(ls[:m])),
                    "loss_last10": float(np.mean(ls[-m:])), "losses": ls, "tokens": rep["tokens"],
                    "options": options, "text_bytes": a.text_bytes, "provenance": collect(("torch",))}
                log(f"trained n_ce={n_ce}: {secs:.0f} s, loss {np.mean(ls[:m]):.4f} -> {np.mean(ls[-m:]):.4f}")
                with resmoe_format.open(out) as r:
                    write_with_vectors(r, ones, ones_vectors(r), n_ce)
                (keep / "training.json").write_text(json.dumps(trained, indent=1) + "\n")
            res["training"][str(n_ce)] = old
            files[n_ce] = (out, ones)

        def add(name: str, active: int, model, **extra) -> dict:
            t = time.perf_counter()
            row = {"row": name, "active_experts": active, "active_expert_params_per_token": active * expert_params
                   * layers, **ref.score(kld.torch_logits(model, windows)), **extra}
            row["seconds_to_eval"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            log(f"{name:34} ppl {row['ppl']:.4f} KLD {row['kld']:.5f}")
            save()
            return row

        ce2 = files[2][0]
        add(f"full top-{k}", k, load_model(ce2, "materialize", dtype="fp32", n_ce=0), n_ce=0, kind="full")
        for n_ce in (1, 2):
            out, ones = files[n_ce]
            add(f"top-{k - n_ce}, auxiliary dropped", k - n_ce, load_model(ones, "materialize", dtype="fp32"),
                n_ce=n_ce, kind="dropped")
            c = transformers.AutoConfig.from_pretrained(FIXTURE)
            c.num_experts_per_tok = k - n_ce
            hf = transformers.AutoModelForCausalLM.from_pretrained(FIXTURE, config=c, dtype=torch.float32).eval()
            add(f"top-{k - n_ce}, router re-normalised", k - n_ce, hf, n_ce=n_ce, kind="renormalised")
            del hf
            add(f"top-{k - n_ce} + trained vectors", k - n_ce, load_model(out, "materialize", dtype="fp32"),
                n_ce=n_ce, kind="vectors")
        full = rows[0]
        rows.insert(0, {**{k: v for k, v in full.items() if k not in ("row", "kind")},
                        "row": f"full top-{k}, transformers' experts module", "kind": "full_hf"})
        full["row"] = f"full top-{k}, resmoe layer at n_ce=0"
        measure(rows, {n_ce: (str(p), str(o)) for n_ce, (p, o) in files.items()}, a.runs, save)
    res["targets"] = targets(rows)
    res["readme"] = readme(res)
    save()
    for line in res["targets"]:
        log(line)
    return 0


def _files(folder: Path) -> dict[int, tuple[str, str]]:
    """n_ce -> (trained file, the same with vectors of ones) kept by a run with ``--files folder``."""
    out = {n: (str(folder / f"ce{n}.rmoe"), str(folder / f"ones{n}.rmoe")) for n in (1, 2)}
    missing = [p for pair in out.values() for p in pair if not Path(p).exists()]
    if missing:
        raise SystemExit(f"--speed-only {folder}: no {', '.join(missing)} (make them with --files {folder})")
    return out


def measure(rows: list[dict], files: dict[int, tuple[str, str]], runs: int, save=lambda: None) -> None:
    """Time every row (materialize and fused, :func:`speeds`) and set its "speed"; the transformers row only in
    materialize mode (fused mode has no transformers experts module)."""
    from resmoe_format.torch import load_model
    from resmoe_format.torch.ce import set_direct_pairs

    vocab = json.loads((FIXTURE / "config.json").read_text())["vocab_size"]
    ce2 = files[2][0]
    timed = {("full_hf", 0): (ce2, 0), ("full", 0): (ce2, 0)}
    for n_ce in (1, 2):
        timed[("dropped", n_ce)] = (files[n_ce][1], n_ce)
        timed[("vectors", n_ce)] = (files[n_ce][0], n_ce)
    for mode in MODES:
        models = {}
        for key, (p, n_ce) in timed.items():
            if key[0] == "full_hf" and mode != "materialize":
                continue
            models[key] = load_model(p, mode, dtype="fp32", n_ce=n_ce)
            if key[0] == "full_hf":
                set_direct_pairs(models[key], 0)  # n_ce = 0 and no direct path: transformers' module itself
        impl = getattr(next(iter(models.values())).config, "_experts_implementation", None)
        got = speeds(models, vocab, runs)
        del models
        for key, sp in got.items():
            row = _row(rows, *key)
            row.setdefault("speed", {})[mode] = sp
            if key[0] == "full_hf":
                row["experts_implementation"] = impl
            log(f"  {mode:11} {row['row']:40} prefill {sp['prefill']:7.0f} tok/s  decode {sp['decode']:6.1f} tok/s")
        save()


def _row(rows, kind, n_ce):
    return next((r for r in rows if r["kind"] == kind and r["n_ce"] == n_ce), None)


def targets(rows: list[dict]) -> list[str]:
    full = _row(rows, "full", 0)
    out = []
    for n_ce in (1, 2):
        drop, vec, ren = _row(rows, "dropped", n_ce), _row(rows, "vectors", n_ce), _row(rows, "renormalised", n_ce)
        if not (full and drop and vec):
            continue
        closed = (drop["ppl"] - vec["ppl"]) / (drop["ppl"] - full["ppl"])
        line = (f"n_ce={n_ce}: the vectors close {closed:.1%} of the perplexity gap between "
                f"top-{full['active_experts'] - n_ce} without vectors ({drop['ppl']:.4f}) and the full model "
                f"({full['ppl']:.4f}): ppl {vec['ppl']:.4f}; "
                f"target >= 50%: **{'met' if closed >= 0.5 else 'missed'}**")
        if ren:
            c2 = (ren["ppl"] - vec["ppl"]) / (ren["ppl"] - full["ppl"])
            line += f" (against the re-normalised router's {ren['ppl']:.4f}: {c2:.1%})"
        out.append(line)
    vec2 = _row(rows, "vectors", 2)
    if full and vec2 and "speed" in full and "speed" in vec2:
        hf = _row(rows, "full_hf", 0)
        against = [(hf, "materialize", f"transformers' experts module ({hf.get('experts_implementation')})")] if hf \
            else []
        against += [(full, "materialize", "resmoe's layer at n_ce=0, the same direct path"),
                    (full, "fused", "resmoe's fused layer at n_ce=0")]
        for ref, mode, name in against:
            if mode not in ref.get("speed", {}):
                continue
            v, f = vec2["speed"][mode]["decode"], ref["speed"][mode]["decode"]
            out.append(f"decode at n_ce=2 ({mode}) against the full top-{full['active_experts']} run by {name}: "
                       f"{v / f:.2f}x ({v:.1f} vs {f:.1f} tok/s); target >= 1.3x: "
                       f"**{'met' if v / f >= 1.3 else 'missed'}**")
    return out


def readme(res: dict) -> list[str]:
    """README.md's figures:compressed_experts lines (benchmarks/readme_figures.py): the targets as measured."""
    lines = [t.replace("**", "") for t in res["targets"]]
    sp = res.get("speed_provenance") or res["provenance"]
    load = sp["load_avg_1min_at_start"]
    shared = "; a shared machine: re-time with --speed-only" if load > 1.5 else ""
    lines.append(f"speeds: one thread, batch 1, {sp['date_utc']}, 1-minute load average {load:.1f} at start "
                 f"({sp['cpu']}, {sp['cpus_usable']} logical CPUs usable{shared})")
    return lines


def report(res: dict) -> str:
    rows = res["rows"]
    full = _row(rows, "full", 0)
    tt = res.get("training_text") or {"name": CALIBRATION.name, "overlap": overlap()}
    what = res["provenance"].get("training_text", "fixtures/calibration.txt")
    lines = ["# Compressed experts on qwen3_moe_fine", "",
             "Generated by `benchmarks/compressed_experts.py` (module docstring: what each row and column is). "
             f"Vectors trained by `resmoe-tune-ce` on {what}; perplexity and KLD on "
             "`fixtures/heldout.txt` against the float32 source, as in EVAL.md. Gap closed: (ppl of the dropped row "
             "- ppl) / (ppl of the dropped row - ppl of the full model). The training text and the held-out text "
             "are disjoint: {} of the {} 64-byte pieces of the training text occur in heldout.txt.".format(
                 *tt["overlap"]), ""]
    if res.get("targets"):
        lines += ["## Targets", ""] + [f"- {t}" for t in res["targets"]] + [""]
    lines += ["## Results", "",
              "| row | active experts | active expert params / token | held-out ppl | mean KLD | same top | gap closed "
              "| prefill tok/s materialize | decode tok/s materialize | prefill tok/s fused | decode tok/s fused |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = ""
        drop = _row(rows, "dropped", r["n_ce"])
        if r["kind"] in ("vectors", "renormalised") and drop and full:
            gap = f"{(drop['ppl'] - r['ppl']) / (drop['ppl'] - full['ppl']):.1%}"
        sp = r.get("speed", {})

        def f(mode, key, sp=sp):
            return f"{sp[mode][key]:.1f}" if mode in sp else "-"

        lines.append(f"| {r['row']} | {r['active_experts']} | {r['active_expert_params_per_token']:,} | "
                     f"{r['ppl']:.4f} | {r['kld']:.5f} | {r['same_top']:.2%} | {gap} | {f('materialize', 'prefill')} | "
                     f"{f('materialize', 'decode')} | {f('fused', 'prefill')} | {f('fused', 'decode')} |")
    tr = res.get("training", {})
    if tr:
        lines += ["", "## Training", "",
                  "| n_ce | steps | seconds | mean loss, first 10 steps | mean loss, last 10 steps |",
                  "|---|---|---|---|---|"]
        for n_ce, t in tr.items():
            lines.append(f"| {n_ce} | {len(t['losses'])} | {t['seconds']} | {t['loss_first10']:.4f} | "
                         f"{t['loss_last10']:.4f} |")
    share = res.get("decode_expert_share")
    if share:
        lines += ["", "## Where decode time goes", "",
                  f"Measured afterwards with `--expert-share` (command `{share['provenance']['command']}`, commit "
                  f"`{share['provenance']['git_commit']}`, one thread, batch 1, {share['file']}: n_ce=2, vectors of "
                  f"ones, which time as trained ones do): decode tokens/s and the share of decode time spent in the "
                  f"three experts layers.", "",
                  "| mode | n_ce | decode tok/s | experts layers' share | experts layers, ms per token |",
                  "|---|---|---|---|---|"]
        for r in share["rows"]:
            lines.append(f"| {r['mode']} | {r['n_ce']} | {r['decode']:.1f} | {r['experts_share']:.0%} | "
                         f"{r['experts_ms_per_token']:.2f} |")
        full_share = {r["mode"]: r["experts_share"] for r in share["rows"] if r["n_ce"] == 0}
        lines += ["", "Amdahl's bound: with the experts layers at a share s of the full top-4's decode time, no "
                  "change to those layers alone decodes faster than 1 / (1 - s): "
                  + "; ".join(f"{mode} {1 / (1 - s):.2f}x (s = {s:.0%})" for mode, s in full_share.items()) + "."]
    lines += ["", "The dropped and re-normalised rows compute the same experts as the vectors rows (their speed is "
              "that of the top-(k - n_ce) layer without the vectors' element-wise products). The first full row runs "
              "transformers' own experts module in materialize mode (its default experts implementation, named in "
              "the targets; the file's vectors unused, n_ce=0); the second runs resmoe's compressed-experts layer "
              "at n_ce=0, in materialize mode with the same few-token path as the rows with vectors (token by token "
              "on views of the routed experts' weights, CEExperts._run_direct), in fused mode resmoe's fused layer. "
              "So the first full row against the second shows what the direct path gains by itself, and the n_ce=2 "
              "rows against the second what dropping two of four experts gains.", ""]
    if SETTINGS.exists():
        lines += ["## Training settings tried", "",
                  f"The training options were chosen among a few settings, each trained with `resmoe-tune-ce` on "
                  f"the training text and scored on the first 256 held-out windows: the output of that selection is "
                  f"[{SETTINGS.name}]({SETTINGS.name}).", ""]
    md = "\n".join(lines) + "\n" + markdown(res["provenance"])
    if res.get("speed_provenance"):
        sp = res["speed_provenance"]
        md += (f"\nSpeeds re-measured with `{sp['command']}` on commit `{sp['git_commit']}`, {sp['date_utc']} (median "
               f"of {sp['timing_runs']} runs; these replace the speeds of the run above); 1-minute load average at "
               f"start {sp['load_avg_1min_at_start']:.2f}.\n")
    return md


if __name__ == "__main__":
    raise SystemExit(main())
