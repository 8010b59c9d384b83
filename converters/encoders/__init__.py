"""Encoders: one MoE layer's experts in, base + permutations + compressed residuals out.

Pure tensor maths on a torch device; nothing here knows about files. ``METHODS`` maps a
``--method`` name to its encoder class (see :mod:`converters.encoders.methods`).
"""
from . import d2moe  # noqa: F401  (registers --method d2moe)
from .methods import METHODS, Encoder, get_encoder
from .parts import LayerResult, LowRankPart, SparsePart

__all__ = ["METHODS", "Encoder", "LayerResult", "LowRankPart", "SparsePart", "get_encoder"]
