"""resmoe-export: a .rmoe file to another runtime's format."""
from __future__ import annotations

import argparse
import sys

from ..restore_checkpoint import restore_checkpoint
from .common import run_cli

#: Export targets available in this release.
TARGETS = ("safetensors",)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="resmoe-export", description="Export a .rmoe file.")
    ap.add_argument("file", help=".rmoe file")
    ap.add_argument("--to", required=True, help=f"target format: {', '.join(TARGETS)}")
    ap.add_argument("out", help="output path (a directory for safetensors)")
    ap.add_argument("--original-order", action="store_true", help="undo neuron permutations")
    a = ap.parse_args(argv)
    if a.to not in TARGETS:
        print(f"resmoe-export: unsupported target {a.to!r}; supported: {', '.join(TARGETS)}", file=sys.stderr)
        return 2

    def body() -> int:
        restore_checkpoint(a.file, a.out, a.original_order)
        print(f"exported {a.file} -> {a.out} ({a.to})")
        return 0

    return run_cli("resmoe-export", body)


if __name__ == "__main__":
    raise SystemExit(main())
