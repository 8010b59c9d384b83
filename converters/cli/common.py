"""Shared CLI plumbing: clean error exits for format errors, bad input and bad paths."""
from __future__ import annotations

import os
import sys
from typing import Callable

from resmoe_format import RmoeFormatError
from resmoe_format.errors import GgufRmoeError, RmoeRuntimeError


#: The extra that installs what each command needs beyond the reader (pyproject.toml).
EXTRAS = {"resmoe-convert": "convert", "resmoe-export": "export", "resmoe-generate": "torch",
          "resmoe-tune-ce": "convert"}


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; print known failures as one clear line and exit 2, warnings as one line each."""
    from ..errors import ConversionError
    from .warn import cli_warnings

    try:
        with cli_warnings(prog):
            return body()
    except ModuleNotFoundError as e:
        return missing_extra(prog, e)
    except GgufRmoeError as e:  # a compressed GGUF, not a .rmoe file
        print(f"{prog}: error: {e}", file=sys.stderr)
    except RmoeFormatError as e:
        print(f"{prog}: invalid .rmoe file: {e}", file=sys.stderr)
    except (ConversionError, RmoeRuntimeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except OSError as e:
        print(f"{prog}: error: {os_error_line(e)}", file=sys.stderr)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 2


def missing_extra(prog: str, e: ModuleNotFoundError) -> int:
    """Exit status 2 with one line naming the extra that installs an optional dependency (torch,
    transformers, gguf ...) ``prog`` needs; other import failures propagate."""
    if e.name is None or "." in e.name or e.name in ("resmoe_format", "converters"):
        raise e
    print(f"{prog}: error: {prog} needs {e.name}, which is not installed: "
          f"pip install 'resmoe[{EXTRAS.get(prog, 'convert')}]'", file=sys.stderr)
    return 2


def os_error_line(e: OSError) -> str:
    """``PATH: reason`` for an OSError, naming the user's path (not a temporary) and no errno."""
    from resmoe_format.publish import user_path

    name = e.filename2 if e.filename2 is not None else e.filename
    reason = e.strerror or str(e)
    return f"{user_path(os.fsdecode(name))}: {reason}" if isinstance(name, (str, bytes, os.PathLike)) else reason
