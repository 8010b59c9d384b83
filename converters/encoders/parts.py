"""What an encoder hands to the byte emitter: a layer's base, permutations and residual parts."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class SparsePart:
    """A residual kept element-wise: ``values`` (canonical shape, float32) where ``mask``."""

    values: torch.Tensor
    mask: torch.Tensor

    @property
    def params(self) -> int:
        return int(self.mask.sum())


@dataclass
class LowRankPart:
    """A residual kept as ``u @ v``. ``shared_u`` names the matrix (of the same expert) whose
    ``u`` this one reuses; ``owner`` marks a matrix whose ``u`` others reuse."""

    u: torch.Tensor
    v: torch.Tensor
    shared_u: str | None = None
    owner: bool = False
    #: "u" or "v": that factor is the very same tensor in this matrix's parts of every expert of the layer
    shared_across: str | None = None

    @property
    def params(self) -> int:
        return (0 if self.shared_u else self.u.numel()) + self.v.numel()


Part = SparsePart | LowRankPart


@dataclass
class LayerResult:
    """One encoded layer, before it is turned into bytes.

    ``base`` holds float32 values already representable in ``base_dtype`` (the residuals
    were taken against exactly these values); ``aligned`` are the experts in the order
    their residuals describe (``T_k W_k``), kept to measure the error.
    """

    base_kind: str
    base: dict[str, torch.Tensor]
    permutations: list[np.ndarray] | None
    residuals: list[dict[str, Part | None]]
    lossless: bool = False
    stats: dict = field(default_factory=dict)
    #: the neuron indices a pruned base keeps (``base`` then holds only those along the neuron axis); None: all
    base_channels: np.ndarray | None = None
