"""GPT-OSS: experts stored fused and stacked in ``model.layers.L.mlp.experts``.

``gate_up_proj`` (E, hidden, 2n) holds gate and up interleaved along its last axis (gate in
the even columns); ``down_proj`` (E, n, hidden); biases ``gate_up_proj_bias`` (E, 2n),
interleaved the same way, and ``down_proj_bias`` (E, hidden).
"""
from __future__ import annotations

from resmoe_format import MatrixSpec, SourceSpec

from ..errors import ConversionError
from . import register
from .base import Adapter, LayerLayout


@register("GptOssForCausalLM")
class GptOss(Adapter):
    model_types = ("gpt_oss",)

    def layouts(self) -> list[LayerLayout]:
        out = []
        E = self.num_experts
        for i in range(self.num_layers()):
            pre = f"model.layers.{i}.mlp.experts"
            gu = self.info(f"{pre}.gate_up_proj")
            if gu is None:
                if self.info(f"{pre}.gate_up_proj_blocks") is not None:
                    raise ConversionError(f"layer {i}: MXFP4-quantized experts (gate_up_proj_blocks); dequantize "
                                          f"the checkpoint to bf16 first")
                raise ConversionError(f"layer {i}: {pre}.gate_up_proj is missing (inconsistent checkpoint)")
            if len(gu.shape) != 3 or gu.shape[2] % 2:
                raise ConversionError(f"{pre}.gate_up_proj: shape {list(gu.shape)}, expected (E, hidden, 2n)")
            h, n, dt = gu.shape[1], gu.shape[2] // 2, gu.dtype
            mats = [MatrixSpec("gate", (n, h), dt, 0), MatrixSpec("up", (n, h), dt, 0),
                    MatrixSpec("down", (n, h), dt, 0)]
            sources = [SourceSpec(f"{pre}.gate_up_proj", dt, (E, h, 2 * n), "all", ["gate", "up"], transpose=True,
                                  join="interleave", join_axis=1),
                       SourceSpec(f"{pre}.down_proj", dt, (E, n, h), "all", ["down"])]
            if self.info(f"{pre}.gate_up_proj_bias") is not None:
                mats += [MatrixSpec("gate_bias", (n,), dt, 0), MatrixSpec("up_bias", (n,), dt, 0),
                         MatrixSpec("down_bias", (h,), dt, None)]
                sources += [SourceSpec(f"{pre}.gate_up_proj_bias", dt, (E, 2 * n), "all", ["gate_bias", "up_bias"],
                                       join="interleave", join_axis=0),
                            SourceSpec(f"{pre}.down_proj_bias", dt, (E, h), "all", ["down_bias"])]
            out.append(LayerLayout(i, pre, E, n, mats, sources))
        return out
