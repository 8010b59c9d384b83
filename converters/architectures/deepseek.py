"""DeepSeek-V2 and DeepSeek-V3: routed experts ``model.layers.L.mlp.experts.K.*_proj``.

The first ``first_k_dense_replace`` layers are dense MLPs and ``mlp.shared_experts`` are
always computed: both pass through unchanged.
"""
from __future__ import annotations

from resmoe_format.architectures import DEEPSEEK_V2, DEEPSEEK_V3

from . import register
from .base import PerExpertAdapter


@register(DEEPSEEK_V2)
class DeepseekV2(PerExpertAdapter):
    def is_sparse(self, i: int) -> bool:
        first = self.config.get("first_k_dense_replace", 0) or 0
        freq = self.config.get("moe_layer_freq", 1) or 1
        return i >= first and i % freq == 0


@register(DEEPSEEK_V3)
class DeepseekV3(DeepseekV2):
    pass
