"""Shared CLI plumbing: clean error exits for format errors, bad input and bad paths."""
from __future__ import annotations

import sys
from typing import Callable

from resmoe_format import RmoeFormatError


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; print known failures as one clear line and exit 2."""
    from ..errors import ConversionError

    try:
        return body()
    except RmoeFormatError as e:
        print(f"{prog}: invalid .rmoe file: {e}", file=sys.stderr)
    except ConversionError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except (OSError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 2
