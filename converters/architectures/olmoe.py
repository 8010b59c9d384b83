"""OLMoE: ``model.layers.L.mlp.experts.K.{gate,up,down}_proj.weight`` in every layer."""
from __future__ import annotations

from . import register
from .base import Adapter, LayerLayout


@register("OlmoeForCausalLM")
class Olmoe(Adapter):
    model_types = ("olmoe",)

    def layouts(self) -> list[LayerLayout]:
        return [self.require(i, self.gated_per_expert(i, f"model.layers.{i}.mlp.experts", "gate_proj", "up_proj",
                                                      "down_proj"), "expert")
                for i in range(self.num_layers())]
