"""One command for the evaluation: every quantizer on the trained fixtures, perplexity and KL divergence.

For each trained fixture in ``benchmarks/fixtures/`` (see ``train_fixtures.py``), on the whole of
``heldout.txt`` (1024 windows of 256 bytes, each from an empty context; ``kld.py``):

- ``original``: the source model in float32 (torch). It is the reference: its next-byte
  log-probabilities are kept for the run and every row's mean KL divergence is measured
  against them, whatever runtime the row uses.
- ``resmoe`` / ``resmoe-cal``: ``resmoe-convert --bits B`` data-free / with
  ``--calibration fixtures/calibration.txt``; ``quant``: ``--method quant --bits B`` (the same
  quantizer, no base); ``resmoe-sparse`` / ``resmoe-cal-sparse`` and ``resmoe-lowrank`` /
  ``resmoe-cal-lowrank``: ``resmoe`` / ``resmoe-cal`` with ``--sparse-residuals`` or
  ``--lowrank-residuals``; B in BUDGETS. Run in the torch runtime (``load_model``, materialize, float32).
- ``llama.cpp``: the original exported to GGUF (``resmoe-export``) and quantized by llama.cpp's
  own quantizer to each preset of LLAMA_TYPES (q8_0: the gguf package's), run in llama.cpp;
  ``f32`` is the unquantized GGUF, whose KL divergence is the floor that the runtime alone gives.
- ``hqq`` / ``gptq``: HQQ and llm-compressor's GPTQ at PEER_BITS on the expert weights only
  (``peers.py``; GPTQ calibrated on the same ``calibration.txt``), in the torch runtime.

Bits per expert weight = 8 * expert bytes / expert weights: the byte accounting of the ``.rmoe``
file (what ``resmoe-inspect`` counts), the ``ffn_*_exps`` tensors of the GGUF, the stored codes,
scales and zero points of HQQ and compressed-tensors. ``calibration.txt`` comes from the training
files only (``calibration.py``): it shares no file with ``heldout.txt``.

Writes ``results/eval_<fixture>.json`` (after every row; the rows of families a ``--families`` run
leaves out are kept from the file it replaces), then ``eval.json``, ``EVAL.md`` (tables, the
issue's targets computed from the rows) and ``eval_<fixture>.png`` (perplexity and KL divergence
against bits per expert weight, one frontier per family) over every fixture evaluated.

Time on this project's 2-core machines: about 15 s to evaluate a torch row and 35 s a llama.cpp
row on the 1024 windows; making the rows dominates: on qwen3_moe_fine at 3 bits, ``--bits`` took
143 s, ``--bits --calibration`` 659 s, ``--method quant`` 12 s, HQQ 2 s, GPTQ 53 s. A full run is
about 1.5-2 hours per fixture, most of it the calibrated conversions: run one ``--fixture`` at a time.

    python benchmarks/eval.py [--fixture NAME] [--families resmoe,quant,...] [--windows N]
    python benchmarks/eval.py --quick --fixture mixtral_upcycled [--out DIR]   (8 windows, 2 budgets)
    python benchmarks/eval.py --report-only                                    (rebuild the reports)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import kld  # noqa: E402
import peers  # noqa: E402
import targets  # noqa: E402
from calibration import CALIBRATION  # noqa: E402

FIXTURES = HERE / "fixtures"
RESULTS = HERE / "results"
SEQ = kld.SEQ
BUDGETS = (2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 5.0)
LLAMA_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "q8_0")
PEER_BITS = (2, 3, 4)
#: parameter budgets (--keep) of the rows compared with D²-MoE: the paper's 40-60% compression
KEEPS = (0.4, 0.5, 0.6)
RMOE_FAMILIES = ("resmoe", "resmoe-cal", "quant", "resmoe-sparse", "resmoe-cal-sparse", "resmoe-lowrank",
                 "resmoe-cal-lowrank", "d2moe", "d2moe-sharev", "d2moe-prune", "d2moe-bits", "resmoe-svd",
                 "resmoe-prune")
#: the d2moe families calibrate (forward and Fisher backward passes) on this many bytes of calibration.txt
D2MOE_CALIBRATION = 16384
#: --bits budgets of the d2moe-bits family
D2MOE_BITS = (2.5, 3.0, 4.0)
#: families whose rows are --keep budgets (the others are --bits budgets)
KEEP_FAMILIES = ("d2moe", "d2moe-sharev", "d2moe-prune", "resmoe-svd", "resmoe-prune")
#: d2moe-prune's --prune-base (the reference's default pruning ratio)
PRUNE_BASE = 0.2
FAMILIES = (*RMOE_FAMILIES, "llama.cpp", "hqq", "gptq")


@dataclasses.dataclass
class Settings:
    """What one run evaluates."""

    families: tuple[str, ...] = FAMILIES
    windows: int | None = None  # None: the whole held-out text
    budgets: tuple[float, ...] = BUDGETS
    keeps: tuple[float, ...] = KEEPS
    llama_types: tuple[str, ...] = LLAMA_TYPES
    peer_bits: tuple[int, ...] = PEER_BITS
    calibration_bytes: int | None = None  # None: all of calibration.txt

    @classmethod
    def quick(cls, families: tuple[str, ...] = FAMILIES) -> Settings:
        """A smoke run: 8 windows, two budgets, two presets and bit widths, 16 KiB of calibration text."""
        return cls(families, 8, (2.5, 4.0), (0.5,), ("q2_k", "q4_k_m"), (2, 4), 1 << 14)


#: failures of this run (llama.cpp crashes): main() lists them and exits with status 1
FAILURES: list[str] = []


def log(msg: str) -> None:
    print(msg, flush=True)


class Run:
    """One fixture's evaluation: the reference, the calibration text and the rows, saved after each row."""

    def __init__(self, fixture: Path, settings: Settings, tmp: Path, out: Path, prov: dict):
        self.fixture, self.s, self.tmp, self.prov = fixture, settings, tmp, prov
        self.name = fixture.name
        self.path = out / f"eval_{self.name}.json"
        self.windows = kld.heldout_windows(settings.windows)
        text = CALIBRATION.read_bytes()[:settings.calibration_bytes]
        self.calibration = tmp / "calibration.txt"
        self.calibration.write_bytes(text)
        self.calibration_ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
        self.rows: list[dict] = []
        self.kept, self.kept_from = self.other_families(out / f"eval_{self.name}.json")
        self.ref: kld.Reference | None = None
        self.weights = 0

    def other_families(self, path: Path) -> tuple[list[dict], list[dict]]:
        """(rows, provenances) of the families this run does not make, from an earlier results file over the
        same windows, so that ``--families`` adds or redoes families without dropping the others."""
        got = read_results(path) if path.exists() else None
        if got is None or got[1].get("windows") != self.s.windows:
            return [], []
        keep = [r for r in got[0] if r["family"] not in (*self.s.families, "original")]
        if not keep:
            return [], []
        log(f"{self.name}: keeping {len(keep)} rows of {', '.join(sorted({r['family'] for r in keep}))} from {path}")
        return keep, [got[1], *got[2]]

    def add(self, family: str, setting: str, expert_bytes: int, result: dict, seconds: float, **extra) -> dict:
        row = {"fixture": self.name, "family": family, "setting": setting, "expert_bytes": expert_bytes,
               "expert_weights": self.weights, "bits_per_expert_weight": 8 * expert_bytes / self.weights,
               **result, "seconds_to_make": round(seconds, 1), **extra}
        self.rows.append(row)
        data = {"provenance": self.prov, "rows": self.rows + self.kept}
        if self.kept:
            data["kept_from"] = self.kept_from  # how the kept rows were made
        self.path.write_text(json.dumps(data, indent=1) + "\n")
        log(f"{self.name:17} {family:10} {setting:12} {row['bits_per_expert_weight']:6.3f} bits  ppl "
            f"{row['ppl']:.4f}  KLD {row['kld']:.5f}  same top {row['same_top']:.4f}  "
            f"({seconds:.0f} s to make, {row['seconds_to_eval']:.0f} s to evaluate)")
        return row

    def score(self, logits) -> dict:
        t = time.perf_counter()
        res = self.ref.score(logits)
        return {**res, "seconds_to_eval": round(time.perf_counter() - t, 1)}

    def torch_score(self, model) -> dict:
        return self.score(kld.torch_logits(model, self.windows))

    def evaluate(self) -> list[dict]:
        import transformers

        from converters.convert import ConvertOptions, convert

        lossless = self.tmp / f"{self.name}_lossless.rmoe"
        report = convert(self.fixture, lossless, ConvertOptions(lossless=True), progress=False)
        self.weights = report["summary"]["expert_params"]
        model = transformers.AutoModelForCausalLM.from_pretrained(self.fixture, dtype=torch.float32).eval()
        if peers.expert_weight_count(model) != self.weights:
            raise RuntimeError(f"{self.name}: the model's expert weights are not the converter's")
        t = time.perf_counter()
        self.ref = kld.Reference(self.tmp / f"{self.name}_reference.npy", self.windows,
                                 kld.torch_logits(model, self.windows))
        self.add("original", "bf16 source", report["summary"]["expert_bytes_source"],
                 {**self.ref.result, "seconds_to_eval": round(time.perf_counter() - t, 1)}, 0.0)
        del model
        steps = {**{f: (lambda f=f: self.rmoe_rows(f)) for f in RMOE_FAMILIES},
                 "llama.cpp": lambda: self.llama_rows(lossless),
                 "hqq": self.hqq_rows, "gptq": self.gptq_rows}
        for fam in self.s.families:
            steps[fam]()
        return self.rows

    def rmoe_rows(self, family: str) -> None:
        from converters.convert import convert
        from resmoe_format.torch import load_model

        out = self.tmp / f"{self.name}_{family}.rmoe"
        for label, opts, target in self.rmoe_settings(family):
            t = time.perf_counter()
            report = convert(self.fixture, out, opts, progress=False)
            seconds = time.perf_counter() - t
            eb, weights = expert_bytes_rmoe(out)
            if weights != self.weights:
                raise RuntimeError(f"{out.name} accounts {weights} expert weights, the source has {self.weights}")
            model = load_model(out, mode="materialize", dtype="fp32")
            extra = {"target_bits": target, "over_budget": 8 * eb / weights > target} if target else {}
            self.add(family, label, eb, self.torch_score(model), seconds, **extra, convert_summary=report["summary"])
            del model

    def rmoe_settings(self, family: str) -> list[tuple[str, object, float | None]]:
        """(setting label, ConvertOptions, target bits or None) of each row of an rmoe family."""
        from converters.convert import ConvertOptions

        cal = str(self.calibration)
        if family.startswith("d2moe"):
            cal = str(self.tmp / "calibration_d2moe.txt")
            size = min(D2MOE_CALIBRATION, self.s.calibration_bytes or D2MOE_CALIBRATION)
            Path(cal).write_bytes(CALIBRATION.read_bytes()[:size])
        if family == "d2moe-bits":
            return [(f"--bits {b:g}", ConvertOptions(method="d2moe", bits=b, calibration=cal,
                                                     allow_unrouted_experts=True), b) for b in D2MOE_BITS]
        if family in KEEP_FAMILIES:
            d2 = {"method": "d2moe", "calibration": cal, "allow_unrouted_experts": True}
            make = {"d2moe": lambda k: ConvertOptions(keep=k, **d2),
                    "d2moe-sharev": lambda k: ConvertOptions(keep=k, share_v=True, **d2),
                    "d2moe-prune": lambda k: ConvertOptions(keep=k, prune_base=PRUNE_BASE, **d2),
                    "resmoe-svd": lambda k: ConvertOptions(method="resmoe", keep=k, residual="svd"),
                    "resmoe-prune": lambda k: ConvertOptions(method="resmoe", keep=k)}[family]
            return [(f"--keep {k:g}", make(k), None) for k in self.s.keeps]
        method = "quant" if family == "quant" else "resmoe"
        calibration = cal if family.startswith("resmoe-cal") else None
        return [(f"--bits {bits:g}", ConvertOptions(method=method, bits=bits, calibration=calibration,
                                                    sparse_residuals=family.endswith("-sparse"),
                                                    lowrank_residuals=family.endswith("-lowrank")), bits)
                for bits in self.s.budgets]

    def llama_rows(self, lossless: Path) -> None:
        from converters.exporters.gguf_export import export_gguf
        from converters.exporters.llama_eval import LlamaRunError

        for qtype in ("f32",) + self.s.llama_types:
            t = time.perf_counter()
            path = export_gguf(lossless, self.tmp / f"{self.name}_{qtype}.gguf", qtype)
            seconds = time.perf_counter() - t
            try:
                res = self.score(kld.llama_logits(path, self.windows, threads=torch.get_num_threads()))
            except LlamaRunError as e:
                FAILURES.append(f"{self.name} {qtype}: {e}")
                log(f"{self.name}: llama.cpp {qtype}: FAILED: {e}")
                continue
            self.add("llama.cpp", qtype, expert_bytes_gguf(path), res, seconds)
            path.unlink()

    def hqq_rows(self) -> None:
        import transformers

        for bits in self.s.peer_bits:
            model = transformers.AutoModelForCausalLM.from_pretrained(self.fixture, dtype=torch.float32).eval()
            t = time.perf_counter()
            eb = peers.hqq(model, bits)
            self.add("hqq", f"{bits} bits", eb, self.torch_score(model), time.perf_counter() - t, code_bits=bits)

    def gptq_rows(self) -> None:
        for bits in self.s.peer_bits:
            t = time.perf_counter()
            model, eb = peers.gptq(self.fixture, bits, self.calibration_ids, SEQ)
            self.add("gptq", f"{bits} bits", eb, self.torch_score(model), time.perf_counter() - t, code_bits=bits)


def expert_bytes_rmoe(path: Path) -> tuple[int, int]:
    """(on-disk expert bytes, expert weights) from the byte accounting (what resmoe-inspect prints)."""
    import resmoe_format
    from resmoe_format.accounting import account

    with resmoe_format.open(path) as r:
        acc = account(r)
    return acc.expert_bytes, acc.expert_weights


def expert_bytes_gguf(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors if "_exps." in t.name)


# what each family imports -> what provides it: an extra of this project ("[name]") or pip arguments
NEEDS = {"base": {"transformers": "[torch]"}, "plot": {"matplotlib": "[bench]"},
         "llama.cpp": {"gguf": "[export]", "llama_cpp": "llama-cpp-python"},
         "hqq": {"hqq": "[bench]"},
         "gptq": {"datasets": "[bench]", "compressed_tensors": "[bench]",
                  "llmcompressor": "--no-deps llmcompressor==0.14.0.1"}}


def missing_requirements(families: tuple[str, ...], report_only: bool) -> str | None:
    """One line naming the missing modules and the pip installs that provide them, or None."""
    import importlib.util

    groups = ["plot"] if report_only else ["base", "plot", *families]
    need = {mod: how for g in groups for mod, how in NEEDS.get(g, {}).items()}
    miss = [m for m in need if importlib.util.find_spec(m) is None]
    if not miss:
        return None
    extras = sorted({need[m][1:-1] for m in miss if need[m].startswith("[")})
    cmds = [f'pip install -e ".[{",".join(extras)}]"'] if extras else []
    cmds += sorted({f"pip install {need[m]}" for m in miss if not need[m].startswith("[")})
    return f"benchmarks/eval.py needs {', '.join(miss)}: run `{'` and `'.join(cmds)}` first"


def read_results(path: Path) -> tuple[list[dict], dict, list[dict]] | None:
    """(rows, provenance, provenances of rows kept from earlier runs) of a per-fixture results file; None for one
    written by an older eval.py (other rows)."""
    data = json.loads(path.read_text())
    if isinstance(data, list) or any("family" not in r for r in data["rows"]):
        return None
    return data["rows"], data["provenance"], data.get("kept_from", [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", default=None, help="one fixture (default: all)")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {', '.join(FAMILIES)}")
    ap.add_argument("--windows", type=int, default=None, help=f"only the first N windows of {SEQ} bytes")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 windows, budgets 2.5 and 4, q2_k and q4_k_m, "
                    "HQQ and GPTQ at 2 and 4 bits, 16 KiB of calibration text (writes to --out, default a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--report-only", action="store_true", help="rebuild eval.json, EVAL.md and the plots from "
                    "the per-fixture results/eval_<NAME>.json without evaluating")
    a = ap.parse_args(argv)
    families = tuple(f for f in a.families.split(",") if f)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    problem = missing_requirements(families, a.report_only)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    FAILURES.clear()
    settings = Settings.quick(families) if a.quick else Settings(families)
    if a.windows is not None:
        settings.windows = a.windows
    out = a.out or (Path(tempfile.gettempdir()) / "resmoe_eval_quick" if a.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    from provenance import collect

    prov = collect(("torch", "transformers", "numpy", "gguf", "llama_cpp", "hqq", "llmcompressor",
                    "compressed_tensors"), seq=SEQ, timing_runs=None,
                   **({} if a.report_only else {**dataclasses.asdict(settings), "quick": a.quick}))
    warnings.simplefilter("ignore")
    fixtures = [] if a.report_only else sorted(p for p in FIXTURES.iterdir() if (p / "train.json").exists()
                                               and (a.fixture is None or p.name == a.fixture))
    if a.fixture and not a.report_only and not fixtures:
        ap.error(f"no trained fixture named {a.fixture}")
    with tempfile.TemporaryDirectory() as tmp:
        for fx in fixtures:
            Run(fx, settings, Path(tmp), out, prov).evaluate()
    write_reports(out, prov)
    if FAILURES:
        print("llama.cpp failed on (no row written for these):\n" + "\n".join(FAILURES), file=sys.stderr)
        return 1
    return 0


def write_reports(out: Path, prov: dict) -> None:
    """eval.json, EVAL.md and the plots over every per-fixture results file in ``out``."""
    import report

    rows, sources = [], {}
    for f in sorted(out.glob("eval_*.json")):
        got = read_results(f)
        if got is None:
            log(f"{f} was written by an older eval.py: left out of the reports (rerun that fixture)")
            continue
        rows += got[0]
        sources[f.name] = [got[1], *got[2]]
    checks = targets.evaluate(rows)
    (out / "eval.json").write_text(json.dumps({"provenance": prov, "sources": sources,
                                               "readme": targets.readme_lines(checks), "targets": checks,
                                               "rows": rows}, indent=1) + "\n")
    (out / "EVAL.md").write_text(report.markdown(rows, checks, prov, sources))
    comparison = report.d2moe_comparison(rows)
    if comparison:
        (out / "d2moe.json").write_text(json.dumps({"provenance": prov, "readme": [line.removeprefix("- ") for line in
                                                                                  report.d2moe_findings(comparison)],
                                                    "comparison": comparison}, indent=1) + "\n")
    for fx in sorted({r["fixture"] for r in rows}):
        report.plot(rows, fx, out / f"eval_{fx}.png")
    log(f"wrote {out / 'EVAL.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
