"""resmoe-convert: Hugging Face MoE checkpoint to .rmoe.

The encoder and architecture adapters land with the converter issue; until then this
command says so plainly and exits with status 2 without writing anything.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("resmoe-convert: the converter (architecture adapters and ResMoE encoder) is not in this "
          "release yet; `python -m resmoe_format.demo OUT.rmoe` writes a synthetic example file.",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
