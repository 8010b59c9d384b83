"""resmoe-export: a .rmoe file to another runtime's format (and a compressed GGUF back to .rmoe)."""
from __future__ import annotations

import argparse
import sys

from .common import run_cli

#: ``--to`` targets: what each writes.
TARGETS = {
    "gguf": "llama.cpp GGUF with restored experts (--type picks f32, f16, bf16, q8_0, q4_k_m, ...)",
    "gguf-rmoe": "compressed GGUF keeping barycenters, permutations and residuals (spec/GGUF_RMOE.md)",
    "onnx": "ONNX for ONNX Runtime (--variant dense or lowrank)",
    "safetensors": "a plain safetensors checkpoint directory (same as resmoe-restore)",
    "rmoe": "a compressed GGUF (gguf-rmoe) converted back to .rmoe, exactly",
    "compressed-tensors": "a Hugging Face checkpoint directory with int4/int8 pack-quantized experts for vLLM and "
                          "SGLang (--scheme w4a16 or w8a16, --group-size)",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="resmoe-export", description="Export a .rmoe file to another format.",
                                 epilog="targets:\n" + "\n".join(f"  {k:12} {v}" for k, v in TARGETS.items()),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help=".rmoe file, or the index or any shard of a sharded one (a compressed .gguf for "
                    "--to rmoe)")
    ap.add_argument("--to", required=True, help=f"target format: {', '.join(TARGETS)}")
    ap.add_argument("out", help="output path (a directory for safetensors and compressed-tensors)")
    ap.add_argument("--type", default="f32", help="GGUF tensor type (default f32)")
    ap.add_argument("--variant", default="dense", help="ONNX variant: dense or lowrank (default dense)")
    ap.add_argument("--original-order", action="store_true", help="safetensors: undo neuron permutations")
    ap.add_argument("--force", action="store_true", help="safetensors: write into a non-empty directory")
    ap.add_argument("--scheme", help="compressed-tensors: w4a16 or w8a16 (int4 / int8 expert weights, 16-bit "
                    "activations)")
    ap.add_argument("--ignore-ce", action="store_true", help="a file with compressed experts (resmoe-tune-ce): "
                    "export the full top-k model without them (the targets have no such operation)")
    ap.add_argument("--group-size", type=int, default=128, help="compressed-tensors: input columns per weight scale "
                    "(default 128)")
    a = ap.parse_args(argv)
    if a.to not in TARGETS:
        print(f"resmoe-export: unsupported target {a.to!r}; supported: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    for flag, dest, target in (("--type", "type", "gguf"), ("--variant", "variant", "onnx"),
                               ("--original-order", "original_order", "safetensors"),
                               ("--force", "force", "safetensors"), ("--scheme", "scheme", "compressed-tensors"),
                               ("--group-size", "group_size", "compressed-tensors")):
        if getattr(a, dest) != ap.get_default(dest) and a.to != target:  # a flag the target would ignore
            print(f"resmoe-export: error: {flag} applies to --to {target}, not --to {a.to}", file=sys.stderr)
            return 2
    if a.to == "compressed-tensors" and a.scheme is None:
        print("resmoe-export: error: --to compressed-tensors needs --scheme w4a16 or w8a16", file=sys.stderr)
        return 2

    def body() -> int:
        from ..paths import check_paths, rmoe_inputs

        inputs = rmoe_inputs(a.file)
        if a.to == "safetensors":
            check_paths(inputs, dirs=[a.out], force=a.force)
        elif a.to == "compressed-tensors":
            check_paths(inputs, dirs=[a.out], forceable=False)
        else:
            check_paths(inputs, files=[a.out, a.out + ".data" if a.to == "onnx" else None])
        if a.to == "gguf":
            from ..exporters.gguf_export import export_gguf

            export_gguf(a.file, a.out, a.type, ignore_ce=a.ignore_ce)
        elif a.to == "gguf-rmoe":
            from resmoe_format.gguf_rmoe import rmoe_to_gguf

            rmoe_to_gguf(a.file, a.out)
        elif a.to == "rmoe":
            from resmoe_format.gguf_rmoe import gguf_to_rmoe

            gguf_to_rmoe(a.file, a.out)
        elif a.to == "compressed-tensors":
            from ..exporters.ct_export import export_compressed_tensors

            export_compressed_tensors(a.file, a.out, a.scheme.lower(), a.group_size, progress=True,
                                      ignore_ce=a.ignore_ce)
        elif a.to == "onnx":
            from ..exporters.onnx_export import export_onnx

            export_onnx(a.file, a.out, a.variant, ignore_ce=a.ignore_ce)
        else:
            from ..restore_checkpoint import restore_checkpoint

            restore_checkpoint(a.file, a.out, a.original_order, force=a.force, ignore_ce=a.ignore_ce)
        detail = {"gguf": f", {a.type}", "compressed-tensors": f", {a.scheme}, group size {a.group_size}"}
        print(f"exported {a.file} -> {a.out} ({a.to}{detail.get(a.to, '')})")
        return 0

    return run_cli("resmoe-export", body)


if __name__ == "__main__":
    raise SystemExit(main())
