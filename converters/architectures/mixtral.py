"""Mixtral and Phi-MoE: ``model.layers.L.block_sparse_moe.experts.K.{w1,w3,w2}.weight`` (the records)."""
from __future__ import annotations

from resmoe_format.architectures import MIXTRAL, PHIMOE

from . import register
from .base import PerExpertAdapter


@register(MIXTRAL)
class Mixtral(PerExpertAdapter):
    pass


@register(PHIMOE)
class PhiMoE(PerExpertAdapter):
    pass
