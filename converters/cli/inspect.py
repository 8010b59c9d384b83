"""resmoe-inspect: where every byte of a .rmoe file goes."""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

import resmoe_format
from resmoe_format.accounting import CATEGORIES, EXPERT_CATEGORIES, Accounting, account

from .common import run_cli

LABELS = {
    "header": "header (JSON schema, tensor index)",
    "barycenters": "barycenters / base experts",
    "barycenter_codes": "barycenter k-quant codes",
    "permutations": "permutations",
    "residual_values": "residual values",
    "residual_codes": "residual k-quant codes",
    "residual_indices": "residual indices, masks, pointers",
    "scales": "quantization scales (int8)",
    "group_scales": "k-quant group scales",
    "superblock_scales": "k-quant super-block scales",
    "coded_signs": "lossless sign streams",
    "coded_heads": "lossless exponent (+ top mantissa) streams",
    "coded_tails": "lossless low-mantissa streams",
    "extensions": "method extensions (per-expert vectors, ...)",
    "compressed_experts": "compressed-expert vectors (resmoe-tune-ce)",
    "checksums": "checksums",
    "passthrough": "passthrough tensors (non-expert)",
    "embedded_files": "embedded files (config, tokenizer)",
}


#: The last line of the table output, per ``verified`` (also a member of the JSON output).
VERIFIED = {"none": "checksums: NOT verified (--no-verify); a damaged file may print as fine",
            "checksums": "checksums: every tensor's CRC-32 is valid",
            "records": "verify: every tensor checksum and record is valid"}


def render(acc: Accounting, model: dict, console: Console, per_layer: bool = False, caption: str = "") -> None:
    t = Table(title=f"{model.get('architecture', '?')}: {acc.file_size:,} bytes on disk", caption=caption or None)
    t.add_column("part")
    t.add_column("bytes", justify="right")
    t.add_column("% of file", justify="right")
    t.add_column("bits / expert weight", justify="right")
    for c in CATEGORIES:
        bpw = f"{acc.bits_per_expert_weight(c):.3f}" if c in EXPERT_CATEGORIES else ""
        t.add_row(LABELS[c], f"{acc.bytes[c]:,}", f"{100 * acc.bytes[c] / acc.file_size:.2f}", bpw)
    t.add_section()
    t.add_row("total (= file size)", f"{sum(acc.bytes.values()):,}", "100.00", "")
    t.add_row("compressed experts", f"{acc.expert_bytes:,}", f"{100 * acc.expert_bytes / acc.file_size:.2f}",
              f"{acc.bits_per_expert_weight():.3f}")
    t.add_row("same experts in source dtype", f"{acc.source_expert_bytes:,}", "",
              f"{acc.source_bits_per_weight:.3f}")
    console.print(t)
    if acc.source_expert_bytes:
        console.print(f"{acc.expert_weights:,} expert weights in {len(acc.layers)} compressed layers: "
                      f"{acc.expert_bytes / acc.source_expert_bytes:.1%} of their source size "
                      f"({1 - acc.expert_bytes / acc.source_expert_bytes:.1%} saved)")
    if per_layer:
        lt = Table(title="per compressed layer")
        for col in ("layer", "experts", "expert bytes", "source bytes", "bits / weight", "encodings"):
            lt.add_column(col, justify="left" if col == "encodings" else "right")
        for lay in acc.layers:
            lt.add_row(str(lay["index"]), str(lay["num_experts"]), f"{lay['expert_bytes']:,}",
                       f"{lay['source_bytes']:,}", f"{lay['bits_per_expert_weight']:.3f}",
                       ", ".join(f"{k}×{v}" for k, v in sorted(lay["encodings"].items())))
        console.print(lt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="resmoe-inspect", description="True byte accounting of a .rmoe file.")
    ap.add_argument("file", help=".rmoe file (of a sharded file: its index or any shard)")
    ap.add_argument("--json", action="store_true", help="print the accounting as JSON")
    ap.add_argument("--layers", action="store_true", help="also show a per-layer table")
    check = ap.add_mutually_exclusive_group()
    check.add_argument("--verify", action="store_true", help="also decode and check every layer record")
    check.add_argument("--no-verify", action="store_true", help="skip the CRC-32 check of every tensor; the output "
                       "then says the checksums were not verified")
    ap.add_argument("--shard-only", action="store_true", help="a shard of a sharded file alone, as the plain .rmoe "
                    "file it is (without it, a shard opens the whole set through its index)")
    a = ap.parse_args(argv)
    verified = "none" if a.no_verify else "records" if a.verify else "checksums"

    def body() -> int:
        with resmoe_format.open(a.file, shard_only=a.shard_only) as r:
            if not a.no_verify:
                r.verify(records=a.verify)
            acc = account(r)
            shards = [{"file": str(s.path), "bytes": s.file_size} for s in getattr(r, "shards", [])]
            if a.json:
                doc = {"file": a.file, "version": ".".join(map(str, r.version)), "model": r.model,
                       "method": r.schema.method, "verified": verified, **acc.to_json()}
                if shards:  # spec 11: the sums cover every shard, and the index counts as header
                    doc.update(index=str(r.path), index_bytes=r.index_size, shards=shards)
                json.dump(doc, sys.stdout, indent=2)
                print()
            else:
                caption = (f".rmoe {'.'.join(map(str, r.version))}, method {r.schema.method.get('name', '?')}, "
                           f"source dtype {r.model.get('source_dtype', '?')}")
                if shards:
                    caption += (f"; {len(shards)} shards and the index {r.path.name} ({r.index_size:,} bytes, "
                                f"counted as header)")
                render(acc, r.model, Console(), a.layers, caption)
                print(VERIFIED[verified])
        return 0

    return run_cli("resmoe-inspect", body)


if __name__ == "__main__":
    raise SystemExit(main())
