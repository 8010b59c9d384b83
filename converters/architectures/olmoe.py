"""OLMoE: ``model.layers.L.mlp.experts.K.{gate,up,down}_proj.weight`` in every layer."""
from __future__ import annotations

from resmoe_format.architectures import OLMOE

from . import register
from .base import PerExpertAdapter


@register(OLMOE)
class Olmoe(PerExpertAdapter):
    pass
