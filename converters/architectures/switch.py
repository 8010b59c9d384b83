"""Switch Transformers: sparse feed-forward blocks in encoder and decoder.

Encoder block b: ``encoder.block.b.layer.1.mlp.experts.expert_K.{wi,wo}.weight``; decoder
block b: ``decoder.block.b.layer.2.mlp...``. Layer index: b for the encoder, num_layers + b
for the decoder. Matrices ``wi`` (n, d_model) and ``wo`` (n, d_model) = wo's transpose.
"""
from __future__ import annotations

from resmoe_format import MatrixSpec, SourceSpec

from . import register
from .base import Adapter, LayerLayout


@register("SwitchTransformersForConditionalGeneration", "SwitchTransformersEncoderModel",
          "SwitchTransformersModel")
class SwitchTransformers(Adapter):
    model_types = ("switch_transformers",)

    def _layer(self, index: int, prefix: str) -> LayerLayout | None:
        first = self.info(f"{prefix}.expert_0.wi.weight")
        if first is None:
            return None
        n, d = first.shape if len(first.shape) == 2 else (0, 0)
        dt = first.dtype
        mats = [MatrixSpec("wi", (n, d), dt, 0), MatrixSpec("wo", (n, d), dt, 0)]
        sources = []
        for k in range(self.num_experts):
            sources += [SourceSpec(f"{prefix}.expert_{k}.wi.weight", dt, (n, d), k, ["wi"]),
                        SourceSpec(f"{prefix}.expert_{k}.wo.weight", dt, (d, n), k, ["wo"], transpose=True)]
        return LayerLayout(index, prefix, self.num_experts, n, mats, sources)

    def layouts(self) -> list[LayerLayout]:
        out = []
        n_enc = self.num_layers("num_layers")
        n_dec = self.config.get("num_decoder_layers")
        n_dec = n_enc if n_dec is None else self.num_layers("num_decoder_layers")
        for stack, count, ff, step_key, offset in (("encoder", n_enc, 1, "encoder_sparse_step", 0),
                                                    ("decoder", n_dec, 2, "decoder_sparse_step", n_enc)):
            step = self.config.get(step_key, 3) or 0  # transformers' default is 3
            for b in range(count):
                lay = self._layer(offset + b, f"{stack}.block.{b}.layer.{ff}.mlp.experts")
                sparse = step > 0 and (step == 1 or b % step == 1)
                if sparse and stack == "decoder" and not any(k.startswith("decoder.") for k in self.tensors):
                    continue  # an encoder-only checkpoint
                if sparse:
                    out.append(self.require(offset + b, lay, f"{stack} expert"))
                elif lay is not None:
                    out.append(lay)
        return out
