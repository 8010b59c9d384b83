"""Lossless sizes and speeds: ``resmoe-convert --lossless`` (the ``fields`` encoding, spec 5.11) against
ZipNN, DFloat11's encoder and ``zstd -19`` on the same expert tensors.

Checkpoints: the two trained fixtures (``benchmarks/fixtures``) and the synthetic Mixtral the tests build
(``tests/hf_models.py``, bf16, 2 layers, 8 experts) with random experts and with upcycled ones (expert k =
expert 0 + Gaussian noise of 0.3 of its standard deviation). For each method: expert bytes as a fraction of
the source expert tensors (``.rmoe``: the expert categories of ``resmoe-inspect``), the whole file as a
fraction of the source safetensors, and encode and decode MB/s of source bytes on one core (the process is
pinned to one CPU; medians of 3 runs). ``--lossless`` decodes through the reader (``restore_expert``: checksums,
decoding, restoration, bf16 out) and through the codec alone (every record to its bit patterns).
DFloat11 ships a GPU decoder only; its encoder (``dfloat11_utils``, Huffman-coded exponents, sign and
mantissa raw, as the package writes them) runs here for its size. Every ``.rmoe`` is restored and compared
bit for bit. Writes ``results/lossless.json`` and ``results/LOSSLESS.md``; exits 1 if a target is missed.

    python benchmarks/lossless.py [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import zstandard
from provenance import ROOT, collect, markdown, repeat, spread
from safetensors.torch import load_file, save_file

import resmoe_format
from converters.convert import ConvertOptions, Plan, convert
from resmoe_format import codecs, restore
from resmoe_format.accounting import account

RESULTS = Path(__file__).parent / "results"
FIXTURES = Path(__file__).parent / "fixtures"
MB = 1e6


def synthetic(tmp: Path, kind: str) -> Path:
    """The tests' tiny bf16 Mixtral (2 layers, 8 experts); ``upcycled``: experts = expert 0 + 0.3 sigma noise."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_models import build_checkpoint

    out = build_checkpoint("mixtral", tmp / kind, dtype="bf16", num_layers=2, num_experts=8)
    if kind == "upcycled":
        st = out / "model.safetensors"
        d = load_file(st)
        g = torch.Generator().manual_seed(1)
        for name in list(d):
            if ".experts." in name and ".experts.0." not in name:
                first = d[_expert0(name)].float()
                d[name] = (first + 0.3 * first.std() * torch.randn(first.shape, generator=g)).to(torch.bfloat16)
        save_file(d, st, metadata={"format": "pt"})
    return out


def _expert0(name: str) -> str:
    head, tail = name.split(".experts.", 1)
    return f"{head}.experts.0.{tail.split('.', 1)[1]}"


def expert_tensors(src: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors --lossless compresses (every MoE layer's experts) and the source safetensors' size."""
    plan = Plan(src, Path(tempfile.mkdtemp()) / "x.rmoe", ConvertOptions(lossless=True))
    names = [s.name for lay in plan.layouts for s in lay.sources]
    plan.ckpt.close()
    d = {}
    for f in sorted(src.glob("*.safetensors")):
        d.update(load_file(f))
    return {n: d[n] for n in names}, sum(f.stat().st_size for f in src.glob("*.safetensors"))


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def resmoe_row(src: Path, tmp: Path, src_bytes: int, src_file: int) -> dict:
    out = tmp / f"{src.name}.rmoe"
    enc_t, _ = repeat(lambda: convert(src, out, ConvertOptions(lossless=True), progress=False))
    with resmoe_format.open(out) as r:
        acc = account(r)

        def restore_all():
            return {n: w for lay in r.layers for k in range(lay.num_experts)
                    for n, w in [(f"{lay.index}.{k}", restore.restore_expert(r, lay.index, k, original_order=True))]}
        dec_t, _ = repeat(restore_all)
        codec_t, _ = repeat(lambda: decode_records(r))
        got = dict(restore.restore_all(r, original_order=True))
    exact = bit_exact(got, src)
    return {"expert_bytes": acc.expert_bytes, "expert_fraction": acc.expert_bytes / src_bytes,
            "file_bytes": acc.file_size, "file_fraction": acc.file_size / src_file,
            "encode_MBps": spread([src_file / MB / t for t in enc_t]),
            "decode_MBps": spread([src_bytes / MB / t for t in dec_t]), "bit_exact": exact,
            "codec_decode_MBps": spread([src_bytes / MB / t for t in codec_t]),
            "encode_note": "whole conversion (barycenter, 3 codings per matrix, checks)",
            "decode_note": "reader: decode + restoration of every expert"}


def bit_exact(got: dict[str, np.ndarray], src: Path) -> bool:
    """Whether the restored tensors ``got`` are the source checkpoint's, name for name and bit for bit."""
    want = {}
    for f in sorted(src.glob("*.safetensors")):
        want.update(load_file(f))
    return set(got) == set(want) and all(
        np.array_equal(np.ascontiguousarray(got[n]).view(np.uint8).reshape(-1),
                       want[n].contiguous().view(torch.uint8).numpy().reshape(-1)) for n in want)


def passthrough_row(src: Path, tmp: Path, src_bytes: int, src_file: int) -> dict:
    """Sizes only (its experts are --lossless's): every tensor coded; restored and compared bit for bit."""
    out = tmp / f"{src.name}_cp.rmoe"
    convert(src, out, ConvertOptions(lossless=True, compress_passthrough=True), progress=False)
    with resmoe_format.open(out) as r:
        acc = account(r)
        got = dict(restore.restore_all(r, original_order=True))
    exact = bit_exact(got, src)
    return {"expert_bytes": acc.expert_bytes, "expert_fraction": acc.expert_bytes / src_bytes,
            "file_bytes": acc.file_size, "file_fraction": acc.file_size / src_file, "bit_exact": exact}


def decode_records(r) -> int:
    """Every expert record decoded to its bit patterns (the codec alone: no checksums, no restoration); each
    predictor decoded once per matrix, as a runtime holding the layer would."""
    n = 0
    for lay in r.layers:
        for m in lay.matrices:
            pred = r.base(lay.index, m.name) if m.name in lay.base else None
            for res in lay.residuals:
                ref = res[m.name]
                enc = r.encoded(ref, m)
                n += codecs.CODECS["fields"].decode_bits(enc, ref.tensors, pred).size
    return n


def codec_row(name: str, tensors: dict[str, torch.Tensor], everything: dict[str, torch.Tensor], compress,
              decompress) -> dict:
    """Per-tensor compression of the expert tensors (and of every tensor, for the whole-file figure)."""
    raws = [raw_bytes(t) for t in tensors.values()]
    src = sum(map(len, raws))
    enc_t, packed = repeat(lambda: [compress(b) for b in raws])
    dec_t, back = repeat(lambda: [decompress(c, len(b)) for c, b in zip(packed, raws)])
    if any(bytes(x) != b for x, b in zip(back, raws)):
        raise AssertionError(f"{name} did not restore its input")
    whole = sum(len(compress(raw_bytes(t))) for t in everything.values())
    return {"expert_bytes": sum(map(len, packed)), "expert_fraction": sum(map(len, packed)) / src,
            "whole_tensor_bytes": whole, "encode_MBps": spread([src / MB / t for t in enc_t]),
            "decode_MBps": spread([src / MB / t for t in dec_t]), "bit_exact": True}


def zipnn_codec():
    import zipnn

    z = zipnn.ZipNN(bytearray_dtype="bfloat16", input_format="byte", threads=1)
    # zipnn 0.5.4 rewrites the buffer it compresses (even an immutable bytes): it gets a copy
    return lambda b: z.compress(bytearray(b)), lambda c, n: bytes(z.decompress(c))


def zstd_codec():
    c = zstandard.ZstdCompressor(level=19)
    d = zstandard.ZstdDecompressor()
    return c.compress, lambda b, n: d.decompress(b)


def dfloat11_row(tensors: dict[str, torch.Tensor]) -> dict:
    """DFloat11's encoder on the expert tensors (one Huffman code of the exponents, as it builds per block):
    encoded exponents + raw sign/mantissa bytes + its GPU decoder's positions, gaps and lookup tables."""
    path = Path(importlib.util.find_spec("dfloat11").origin).parent / "dfloat11_utils.py"
    spec = importlib.util.spec_from_file_location("dfloat11_utils", path)  # the package itself imports cupy
    df = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(df)
    weights = [t.flatten() for t in tensors.values()]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # it prints tables
        _, counter = df.get_codec(torch.cat(weights))
        codec, _, table = df.get_32bit_codec(counter)
        luts = df.get_luts(table)
        encoded, other, positions, gaps, _ = df.encode_weights(weights, codec, 8, 512)
    total = encoded.numel() + other.numel() + 4 * positions.numel() + gaps.numel() + luts.numel() * luts.element_size()
    src = sum(t.numel() * 2 for t in weights)
    return {"expert_bytes": int(total), "expert_fraction": total / src, "bit_exact": None,
            "note": "encoder only (dfloat11_utils); the package decodes on CUDA GPUs only"}


def run(checkpoints: dict[str, Path], tmp: Path) -> list[dict]:
    rows = []
    for label, src in checkpoints.items():
        tensors, src_file = expert_tensors(src)
        everything = {}
        for f in sorted(src.glob("*.safetensors")):
            everything.update(load_file(f))
        src_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        row = {"checkpoint": label, "expert_source_bytes": src_bytes, "file_source_bytes": src_file,
               "dtypes": sorted({str(t.dtype).split(".")[1] for t in tensors.values()}),
               "methods": {"--lossless": resmoe_row(src, tmp, src_bytes, src_file),
                           "--lossless --compress-passthrough": passthrough_row(src, tmp, src_bytes, src_file),
                           "ZipNN": codec_row("ZipNN", tensors, everything, *zipnn_codec()),
                           "zstd -19": codec_row("zstd", tensors, everything, *zstd_codec()),
                           "DFloat11": dfloat11_row(tensors)}}
        for m in ("ZipNN", "zstd -19"):
            r = row["methods"][m]
            r["file_fraction"] = r.pop("whole_tensor_bytes") / sum(t.numel() * t.element_size()
                                                                   for t in everything.values())
        rows.append(row)
        print(label, {k: round(v["expert_fraction"], 4) for k, v in row["methods"].items()}, flush=True)
    return rows


def targets(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        m = r["methods"]
        lo = m["--lossless"]
        out.append({"target": f"{r['checkpoint']}: bit-exact", "met": bool(lo["bit_exact"])
                    and bool(m["--lossless --compress-passthrough"]["bit_exact"])})
        out.append({"target": f"{r['checkpoint']}: expert bytes below ZipNN's "
                              f"({lo['expert_fraction']:.4f} vs {m['ZipNN']['expert_fraction']:.4f})",
                    "met": lo["expert_fraction"] < m["ZipNN"]["expert_fraction"]})
        if not r["checkpoint"].startswith("synthetic"):  # the synthetic matrices are 24 x 16: per-call costs
            out.append({"target": f"{r['checkpoint']}: decode at least 200 MB/s per core (reader "
                                  f"{lo['decode_MBps']['median']:.0f}, codec {lo['codec_decode_MBps']['median']:.0f})",
                        "met": lo["decode_MBps"]["median"] >= 200})
    fx = {r["checkpoint"]: r["methods"]["--lossless"]["expert_fraction"] for r in rows}
    if "mixtral_upcycled" in fx and "qwen3_moe_fine" in fx:
        out.append({"target": f"larger gain on upcycled experts (mixtral_upcycled {fx['mixtral_upcycled']:.4f} "
                              f"< qwen3_moe_fine {fx['qwen3_moe_fine']:.4f})",
                    "met": fx["mixtral_upcycled"] < fx["qwen3_moe_fine"]})
    return out


def readme(rows: list[dict]) -> str:
    """The README's sentence (benchmarks/readme_figures.py copies it)."""
    fx = [r for r in rows if not r["checkpoint"].startswith("synthetic")]

    def frac(m: str) -> str:
        return " and ".join(f"{r['methods'][m]['expert_fraction']:.3f}" for r in fx)
    dec = [r["methods"]["--lossless"]["decode_MBps"]["median"] for r in fx]
    return (f"on the trained fixtures' bf16 experts ({', '.join(r['checkpoint'] for r in fx)}) `--lossless` stores "
            f"{frac('--lossless')} of the source bytes, against ZipNN's {frac('ZipNN')}, DFloat11's "
            f"{frac('DFloat11')} and `zstd -19`'s {frac('zstd -19')} (per tensor), and restores them at "
            f"{min(dec):.0f}-{max(dec):.0f} MB/s on one core (median of 3 runs, shared machine)")


def report(rows: list[dict], tg: list[dict], prov: dict) -> str:
    lines = ["# Lossless: `--lossless` against ZipNN, DFloat11 and zstd -19", "",
             "Expert bytes and whole file as a fraction of the source, the same expert tensors for every method "
             "(per tensor for ZipNN and zstd; whole file: every tensor of the checkpoint compressed, for `.rmoe` the "
             "file: with `--lossless` its non-expert tensors are stored as they are, with `--compress-passthrough` "
             "they are coded too). MB/s of source bytes on one core, median of "
             f"{prov['timing_runs']} runs; the machine was shared (load average at start "
             f"{prov['load_avg_1min_at_start']:.2f} on {prov['cpus_usable']} CPUs), so timings were taken under "
             "contention.", "",
             "| checkpoint | method | expert bytes / source | whole file / source | encode MB/s | decode MB/s | "
             "codec decode MB/s | bit-exact |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, m in r["methods"].items():
            other = "n/a (GPU only)" if name == "DFloat11" else "as --lossless"
            enc = f"{m['encode_MBps']['median']:.1f}" if "encode_MBps" in m else other
            dec = f"{m['decode_MBps']['median']:.1f}" if "decode_MBps" in m else other
            whole = f"{m['file_fraction']:.4f}" if "file_fraction" in m else "n/a"
            ex = {True: "yes", False: "NO", None: "n/a"}[m["bit_exact"]]
            cdec = f"{m['codec_decode_MBps']['median']:.1f}" if "codec_decode_MBps" in m else ""
            lines.append(f"| {r['checkpoint']} | {name} | {m['expert_fraction']:.4f} | {whole} | {enc} | {dec} | "
                         f"{cdec} | {ex} |")
    lines += ["", "## Targets", ""] + [f"- {t['target']}: {'met' if t['met'] else 'MISSED'}" for t in tg]
    lines += ["", "Notes: `--lossless` encode MB/s is the whole conversion (barycenter, three codings of every "
              "matrix, a decode check of each record) over the source file's bytes; its decode is the reader's "
              "(fields decoding plus restoration to bf16). The synthetic checkpoints' matrices are 24 x 16: "
              "per-record costs (zstd frames, the schema's JSON in the header) dominate their figures. DFloat11: its "
              "encoder's size (Huffman-coded exponents, sign and mantissa byte raw, plus its GPU decoder's tables); "
              "the package decodes on CUDA only.", "",
              markdown(prov)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the synthetic checkpoints only")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):  # one core for every method: MB/s per core
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    prov = collect(("numpy", "torch", "zstandard", "zipnn", "dfloat11", "safetensors"))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ck = {} if a.quick else {f: FIXTURES / f for f in ("mixtral_upcycled", "qwen3_moe_fine")}
        ck |= {f"synthetic {k}": synthetic(tmp, k) for k in ("upcycled", "random")}
        rows = run(ck, tmp)
    tg = targets(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    out = {"rows": rows, "targets": tg, "provenance": prov}
    if not a.quick:
        out["readme"] = readme(rows)
    (a.out / "lossless.json").write_text(json.dumps(out, indent=1))
    (a.out / "LOSSLESS.md").write_text(report(rows, tg, prov))
    print("\n".join(f"{t['target']}: {'met' if t['met'] else 'MISSED'}" for t in tg))
    return 0 if all(t["met"] for t in tg) else 1


if __name__ == "__main__":
    sys.exit(main())
