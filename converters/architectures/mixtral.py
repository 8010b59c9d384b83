"""Mixtral and Phi-MoE: ``model.layers.L.block_sparse_moe.experts.K.{w1,w3,w2}.weight``."""
from __future__ import annotations

from . import register
from .base import PerExpertAdapter


@register("MixtralForCausalLM")
class Mixtral(PerExpertAdapter):
    model_types = ("mixtral",)
    prefix = "model.layers.{i}.block_sparse_moe.experts"
    modules = ("w1", "w3", "w2")


@register("PhimoeForCausalLM")
class PhiMoE(Mixtral):
    model_types = ("phimoe",)
