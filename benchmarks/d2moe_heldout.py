"""D²-MoE against resmoe on an architecture none of the methods was tuned on: a small OLMoE built by transformers.

The trained fixtures (eval.py) are Mixtral and Qwen3-MoE. This script builds an OLMoE-format checkpoint
from a small config (random weights, every weight perturbed with seeded noise, bf16, a byte-level
tokenizer), converts it with ``--method d2moe`` (calibrated on the first 16 KiB of
``fixtures/calibration.txt``), ``--residual svd`` and plain resmoe at ``--keep`` 0.4, 0.5 and 0.6, and
scores each against the original on the first ``--windows`` windows of ``fixtures/heldout.txt``:
perplexity and mean KL divergence (the model is untrained, so KLD is the measure that says how close a
compressed model stays to it). Results: ``results/d2moe_heldout.json`` and ``results/D2MOE_HELDOUT.md``.

    python benchmarks/d2moe_heldout.py [--windows 64]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

import kld
from provenance import collect, markdown

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
KEEPS = (0.4, 0.5, 0.6)
CALIBRATION_BYTES = 16384
#: the paper's claim: more than 13% better than other compressors at equal compression
CLAIM = 0.13


def build(out: Path) -> Path:
    """A small OLMoE checkpoint (transformers' own layout and names) with a byte-level tokenizer."""
    import transformers as T

    from converters.example import write_byte_tokenizer

    torch.manual_seed(0)
    cfg = T.OlmoeConfig(vocab_size=264, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = T.OlmoeForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.to(torch.bfloat16).save_pretrained(out)
    write_byte_tokenizer(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=64, help="held-out windows of 256 bytes (default 64)")
    a = ap.parse_args(argv)
    import transformers

    from converters.convert import ConvertOptions, convert
    from resmoe_format.torch import load_model

    prov = collect(("torch", "transformers", "numpy"), windows=a.windows, keeps=list(KEEPS))
    windows = kld.heldout_windows(a.windows)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = build(tmp / "olmoe")
        cal = tmp / "calibration.txt"
        cal.write_bytes((HERE / "fixtures" / "calibration.txt").read_bytes()[:CALIBRATION_BYTES])
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        ref = kld.Reference(tmp / "ref.npy", windows, kld.torch_logits(model, windows))
        rows.append({"method": "original", "keep": None, **ref.result})
        del model
        methods = {"d2moe": lambda k: ConvertOptions(method="d2moe", keep=k, calibration=str(cal)),
                   "resmoe-svd": lambda k: ConvertOptions(keep=k, residual="svd"),
                   "resmoe-prune": lambda k: ConvertOptions(keep=k)}
        for k in KEEPS:
            for name, make in methods.items():
                out = tmp / f"{name}_{k}.rmoe"
                t = time.perf_counter()
                rep = convert(src, out, make(k), progress=False)
                seconds = time.perf_counter() - t
                res = ref.score(kld.torch_logits(load_model(out, mode="materialize", dtype="fp32"), windows))
                rows.append({"method": name, "keep": k, "seconds_to_make": round(seconds, 1),
                             "expert_bytes_fraction": rep["summary"]["expert_bytes_fraction"], **res})
                print(f"{name:13} keep {k}: ppl {res['ppl']:.4f} KLD {res['kld']:.5f}", flush=True)
                out.unlink()
    findings = []
    orig = rows[0]
    for k in KEEPS:
        d2 = next(r for r in rows if r["method"] == "d2moe" and r["keep"] == k)
        best = min((r for r in rows if r["method"] != "d2moe" and r["keep"] == k), key=lambda r: r["kld"])
        gain = 1 - d2["kld"] / best["kld"] if best["kld"] > 0 else None
        findings.append({"keep": k, "d2moe_kld": d2["kld"], "peer": best["method"], "peer_kld": best["kld"],
                         "kld_gain": gain, "claim_holds": gain is not None and gain >= CLAIM})
    readme = ("on a held-out architecture (a small OLMoE built by transformers, untrained) d2moe's KL divergence "
              "from the original is " + ", ".join(
                  f"{f['kld_gain']:.0%} below {f['peer']}'s at --keep {f['keep']:g}" if f["kld_gain"] >= 0 else
                  f"{-f['kld_gain']:.0%} above {f['peer']}'s at --keep {f['keep']:g}" for f in findings))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "d2moe_heldout.json").write_text(json.dumps({"provenance": prov, "readme": readme, "rows": rows,
                                                            "findings": findings}, indent=1) + "\n")
    lines = ["# D²-MoE on a held-out architecture (`benchmarks/d2moe_heldout.py`)", "",
             "A small OLMoE (hidden 128, intermediate 256, 8 experts, top-2, 4 layers, bf16, random weights with "
             f"seeded noise) built by transformers; {a.windows} windows of 256 bytes of `fixtures/heldout.txt`; "
             f"d2moe calibrated on the first {CALIBRATION_BYTES} bytes of `fixtures/calibration.txt`. Perplexity "
             f"of an untrained model is near uniform (original {orig['ppl']:.2f}), so the mean KL divergence from "
             "the original is the measure to compare.", "",
             "| method | --keep | expert bytes / source | ppl | mean KLD | same top |", "|---|---|---|---|---|---|"]
    for r in rows:
        frac = f"{r['expert_bytes_fraction']:.3f}" if r.get("expert_bytes_fraction") else ""
        lines.append(f"| {r['method']} | {r['keep'] if r['keep'] is not None else ''} | {frac} | {r['ppl']:.4f} | "
                     f"{r['kld']:.5f} | {r['same_top']:.2%} |")
    lines += ["", "## The paper's claim (more than 13% better at equal compression), read on KL divergence", ""]
    for f in findings:
        lines.append(f"- --keep {f['keep']:g}: d2moe KLD {f['d2moe_kld']:.5f} against {f['peer']} "
                     f"{f['peer_kld']:.5f}: {f['kld_gain']:+.1%} ({'holds' if f['claim_holds'] else 'does not hold'}).")
    lines += ["", markdown(prov)]
    (RESULTS / "D2MOE_HELDOUT.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "D2MOE_HELDOUT.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
