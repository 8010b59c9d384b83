"""How the command-line tools show Python warnings: each distinct one once, as one line
(``resmoe-export: warning: <message>``), without file names, line numbers or source excerpts;
library chatter that tells a user nothing is silenced by targeted filters."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

#: (message regex, category) of library warnings that are noise for a user of the tools.
NOISE: tuple[tuple[str, type[Warning]], ...] = (
    # torch: the fused runtime's residuals are CSR matrices, a torch feature still marked beta
    (r"Sparse CSR tensor support is in beta state", UserWarning),
    (r"Sparse invariant checks are implicitly disabled", UserWarning),
    # torch.from_numpy on the reader's read-only memory-mapped arrays; the tools never write to them
    (r"The given NumPy array is not writable", UserWarning),
    (r"The given buffer is not writable", UserWarning),
)


@contextlib.contextmanager
def cli_warnings(prog: str) -> Iterator[None]:
    """Within the block, show each distinct warning once as ``PROG: warning: <first line>`` on
    stderr and drop :data:`NOISE`; transformers logs errors only unless ``TRANSFORMERS_VERBOSITY``
    is set. Filters and ``showwarning`` are restored on exit."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split()) or category.__name__
        if text not in seen:
            seen.add(text)
            print(f"{prog}: warning: {text}", file=sys.stderr, flush=True)

    verbosity = os.environ.get("TRANSFORMERS_VERBOSITY")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    try:
        with warnings.catch_warnings():
            for message, category in NOISE:
                warnings.filterwarnings("ignore", message=message, category=category)
            warnings.showwarning = show
            yield
    finally:
        if verbosity is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
