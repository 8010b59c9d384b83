"""Qwen2-MoE and Qwen3-MoE: ``model.layers.L.mlp.experts.K.{gate,up,down}_proj.weight``.

Qwen2-MoE's ``mlp.shared_expert`` and ``shared_expert_gate`` pass through; layers listed in
``mlp_only_layers``, or off the ``decoder_sparse_step`` grid, are dense and pass through.
"""
from __future__ import annotations

from resmoe_format.architectures import QWEN2_MOE, QWEN3_MOE

from . import register
from .base import PerExpertAdapter


@register(QWEN2_MOE)
class Qwen2Moe(PerExpertAdapter):
    def is_sparse(self, i: int) -> bool:
        step = self.config.get("decoder_sparse_step", 1) or 0
        return (i not in (self.config.get("mlp_only_layers") or []) and self.num_experts > 0 and step > 0
                and (i + 1) % step == 0)


@register(QWEN3_MOE)
class Qwen3Moe(Qwen2Moe):
    pass
