"""Mixtral and Phi-MoE: ``model.layers.L.block_sparse_moe.experts.K.{w1,w3,w2}.weight``."""
from __future__ import annotations

from . import register
from .base import Adapter, LayerLayout


@register("MixtralForCausalLM")
class Mixtral(Adapter):
    model_types = ("mixtral",)

    def layouts(self) -> list[LayerLayout]:
        out = []
        for i in range(self.num_layers()):
            pre = f"model.layers.{i}.block_sparse_moe.experts"
            out.append(self.require(i, self.gated_per_expert(i, pre, "w1", "w3", "w2"), "expert"))
        return out


@register("PhimoeForCausalLM")
class PhiMoE(Mixtral):
    model_types = ("phimoe",)
