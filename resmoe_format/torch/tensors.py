"""numpy arrays (as the reader returns them) to torch tensors; the torch dtype table and device
resolution shared by the runtime and the converter."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .. import dtypes
from ..errors import RmoeRuntimeError

#: The torch element type of each float format dtype (:data:`resmoe_format.dtypes.SOURCE_DTYPES`).
TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: The same, also under torch's names (``float32`` ...): what ``dtype=`` arguments accept.
DTYPE_NAMES: dict[str, torch.dtype] = {**TORCH_DTYPES, **{str(t)[len("torch."):]: t for t in TORCH_DTYPES.values()}}


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here: ``auto`` is CUDA when present, else the CPU; ``cuda[:N]``
    without such a GPU, or a type other than cpu and cuda, is an RmoeRuntimeError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RmoeRuntimeError(f"device {device!r} is not a torch device (use auto, cpu or cuda[:N]): {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise RmoeRuntimeError(f"device {device!r}: resmoe supports cpu and cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RmoeRuntimeError(f"device {device!r} asked for, but no CUDA GPU is available here (use cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RmoeRuntimeError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev

# numpy has no bf16 of its own (ml_dtypes provides it) and torch.from_numpy refuses ml_dtypes:
# such arrays cross as same-width integers and are reinterpreted.
_VIA_BITS = {dtypes.by_name("bf16").np: (np.uint16, torch.bfloat16)}


def to_torch(a: np.ndarray, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             copy: bool = False) -> torch.Tensor:
    """``a`` as a torch tensor on ``device`` in ``dtype`` (default: its own), sharing memory when it can
    unless ``copy``; bf16 arrays from ml_dtypes are reinterpreted bit for bit."""
    a = np.ascontiguousarray(a)
    via = _VIA_BITS.get(a.dtype)
    with warnings.catch_warnings():
        if not a.flags.writeable:  # the reader's mmap: converted below, or shared with a runtime that only reads it
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        t = torch.from_numpy(a.view(via[0])).view(via[1]) if via else torch.from_numpy(a)
    out = t.to(device=device, dtype=dtype or t.dtype)
    return out.clone() if copy and out.data_ptr() == t.data_ptr() else out
