"""numpy arrays (as the reader returns them) to torch tensors."""
from __future__ import annotations

import numpy as np
import torch

from .. import dtypes

# numpy has no bf16 of its own (ml_dtypes provides it) and torch.from_numpy refuses ml_dtypes:
# such arrays cross as same-width integers and are reinterpreted.
_VIA_BITS = {dtypes.by_name("bf16").np: (np.uint16, torch.bfloat16)}


def to_torch(a: np.ndarray, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             copy: bool = False) -> torch.Tensor:
    """``a`` as a torch tensor on ``device`` in ``dtype`` (default: its own), sharing memory when it can
    unless ``copy``; bf16 arrays from ml_dtypes are reinterpreted bit for bit."""
    a = np.ascontiguousarray(a)
    via = _VIA_BITS.get(a.dtype)
    t = torch.from_numpy(a.view(via[0])).view(via[1]) if via else torch.from_numpy(a)
    out = t.to(device=device, dtype=dtype or t.dtype)
    return out.clone() if copy and out.data_ptr() == t.data_ptr() else out
