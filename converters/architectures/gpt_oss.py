"""GPT-OSS: experts stored fused and stacked in ``model.layers.L.mlp.experts``.

``gate_up_proj`` (E, hidden, 2n) holds gate and up interleaved along its last axis (gate in
the even columns); ``down_proj`` (E, n, hidden); biases ``gate_up_proj_bias`` (E, 2n),
interleaved the same way, and ``down_proj_bias`` (E, hidden). Those rules are the record's
(``resmoe_format.architectures.GPT_OSS``); the adapter reads the shapes and the biases' presence.
"""
from __future__ import annotations

from resmoe_format import MatrixSpec
from resmoe_format.architectures import GPT_OSS

from ..errors import ConversionError
from . import register
from .base import Adapter, LayerLayout


@register(GPT_OSS)
class GptOss(Adapter):
    def layouts(self) -> list[LayerLayout]:
        out = []
        E = self.num_experts
        for i in range(self.num_layers()):
            pre = self.family.prefixes[0].format(i=i)
            gu = self.info(f"{pre}.gate_up_proj")
            if gu is None:
                if self.info(f"{pre}.gate_up_proj_blocks") is not None:
                    raise ConversionError(f"layer {i}: MXFP4-quantized experts (gate_up_proj_blocks); dequantize "
                                          f"the checkpoint to bf16 first")
                raise ConversionError(f"layer {i}: {pre}.gate_up_proj is missing (inconsistent checkpoint)")
            if len(gu.shape) != 3 or gu.shape[2] % 2:
                raise ConversionError(f"{pre}.gate_up_proj: shape {list(gu.shape)}, expected (E, hidden, 2n)")
            h, n, dt = gu.shape[1], gu.shape[2] // 2, gu.dtype
            mats = [MatrixSpec(m, (n, h), dt, 0) for m in self.family.matrices]
            if self.info(f"{pre}.gate_up_proj_bias") is not None:
                *inputs, output = self.family.biases
                mats += [MatrixSpec(b, (n,), dt, 0) for b in inputs] + [MatrixSpec(output, (h,), dt, None)]
            out.append(self.layout(i, pre, E, n, mats))
        return out
