"""OLMoE: ``model.layers.L.mlp.experts.K.{gate,up,down}_proj.weight`` in every layer."""
from __future__ import annotations

from . import register
from .base import PerExpertAdapter


@register("OlmoeForCausalLM")
class Olmoe(PerExpertAdapter):
    model_types = ("olmoe",)
