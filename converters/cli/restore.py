"""resmoe-restore: a .rmoe file back to a safetensors checkpoint directory."""
from __future__ import annotations

import argparse

from ..restore_checkpoint import restore_checkpoint
from .common import run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="resmoe-restore", description="Restore a .rmoe file to a safetensors "
                                 "checkpoint (model.safetensors, config.json, tokenizer files).")
    ap.add_argument("file", help=".rmoe file, or the index or any shard of a sharded one")
    ap.add_argument("outdir", help="output directory")
    ap.add_argument("--original-order", action="store_true",
                    help="undo the neuron permutations (a lossless file then restores bit for bit)")
    ap.add_argument("--ignore-ce", action="store_true", help="a file with compressed experts (resmoe-tune-ce): "
                    "restore the experts without the vectors (a checkpoint has no place for them)")
    ap.add_argument("--no-verify", action="store_true", help="skip tensor checksum verification")
    ap.add_argument("--force", action="store_true", help="write into a non-empty OUTDIR (its files of the same "
                    "names are replaced; none may be the input)")
    a = ap.parse_args(argv)

    def body() -> int:
        out = restore_checkpoint(a.file, a.outdir, a.original_order, not a.no_verify, a.force, a.ignore_ce)
        print(f"restored {a.file} -> {out}")
        return 0

    return run_cli("resmoe-restore", body)


if __name__ == "__main__":
    raise SystemExit(main())
