"""Shared CLI plumbing: clean error exits for format errors and bad paths."""
from __future__ import annotations

import sys
from typing import Callable

from resmoe_format import RmoeFormatError


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; print known failures as one clear line and exit 2."""
    try:
        return body()
    except RmoeFormatError as e:
        print(f"{prog}: invalid .rmoe file: {e}", file=sys.stderr)
    except (OSError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
