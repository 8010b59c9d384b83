"""Switch Transformers: sparse feed-forward blocks in encoder and decoder.

Encoder block b: ``encoder.block.b.layer.1.mlp.experts.expert_K.{wi,wo}.weight``; decoder
block b: ``decoder.block.b.layer.2.mlp...``. Layer index: b for the encoder, num_layers + b
for the decoder. Matrices ``wi`` (n, d_model) and ``wo`` (n, d_model) = wo's transpose.
"""
from __future__ import annotations

from resmoe_format.architectures import SWITCH

from . import register
from .base import Adapter, LayerLayout


@register(SWITCH)
class SwitchTransformers(Adapter):
    def layouts(self) -> list[LayerLayout]:
        out = []
        n_enc = self.num_layers("num_layers")
        n_dec = self.config.get("num_decoder_layers")
        n_dec = n_enc if n_dec is None else self.num_layers("num_decoder_layers")
        enc, dec = self.family.prefixes
        for stack, prefix, count, step_key, offset in (("encoder", enc, n_enc, "encoder_sparse_step", 0),
                                                        ("decoder", dec, n_dec, "decoder_sparse_step", n_enc)):
            step = self.config.get(step_key, 3) or 0  # transformers' default is 3
            for b in range(count):
                lay = self.per_expert(offset + b, prefix.format(b=b))
                sparse = step > 0 and (step == 1 or b % step == 1)
                if sparse and stack == "decoder" and not any(k.startswith("decoder.") for k in self.tensors):
                    continue  # an encoder-only checkpoint
                if sparse:
                    out.append(self.require(offset + b, lay, f"{stack} expert"))
                elif lay is not None:
                    out.append(lay)
        return out
