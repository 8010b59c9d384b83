"""The quantizers a user would pick instead of ``.rmoe``, applied to the expert weights only.

Each function takes a transformers MoE model in float32 (transformers 5 fused experts:
``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I)), quantizes
every expert matrix (gate, up, down: nn.Linear layout, groups along the input dimension) and
returns a float32 model whose expert weights are the dequantized ones, with the bytes the
quantized expert weights occupy in that package's own storage format: packed codes, scales and
zero points at their stored size, as ``resmoe-inspect`` counts a ``.rmoe`` file's expert bytes.
Attention, norms, router and embeddings are untouched.

- :func:`hqq` (package ``hqq``): data-free half-quadratic optimisation of scale and zero point,
  ``HQQLinear`` with ``BaseQuantizeConfig(nbits, group_size=64, axis=1)`` and fp16 compute dtype:
  fp16 scale and zero per group, codes packed by HQQ's own packer (3 bits: ten codes per int32),
  dequantized by HQQ in fp16.
- :func:`gptq` (package ``llmcompressor``, with ``compressed-tensors``): ``oneshot`` with a
  ``GPTQModifier`` whose only targets are the expert projections, asymmetric integer weights in
  groups, fp16 scales, static activation order, on a calibration text; llm-compressor linearizes
  the fused experts and routes every calibration token through every expert (its MoE default).
  Bytes are those of the tensors compressed-tensors' ``pack-quantized`` compressor stores (codes and
  zero points packed densely into int32 words, fp16 scales, the ``weight_shape`` pair), and the
  weights evaluated are what its decompressor rebuilds from them.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator

import numpy as np
import torch

GROUP = 64
#: one expert projection as llm-compressor's linearized experts name it
EXPERT_LINEAR = re.compile(r"(?:.*\.)?layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj$")


def expert_matrices(model) -> Iterator[tuple[int, int, str, torch.Tensor]]:
    """(layer, expert, projection, view) of every expert matrix of a fused-experts model, [out, in] layout."""
    for i, layer in enumerate(model.model.layers):
        ex = getattr(layer.mlp, "experts", None)
        if ex is None or not hasattr(ex, "gate_up_proj"):
            continue
        if getattr(ex, "is_transposed", False):
            raise ValueError(f"layer {i}: transposed fused experts are not supported")
        inter = ex.down_proj.shape[-1]
        for e in range(ex.gate_up_proj.shape[0]):
            yield i, e, "gate", ex.gate_up_proj.data[e, :inter]
            yield i, e, "up", ex.gate_up_proj.data[e, inter:]
            yield i, e, "down", ex.down_proj.data[e]


def expert_weight_count(model) -> int:
    """Number of expert weights (the denominator of bits per expert weight)."""
    return sum(m.numel() for *_, m in expert_matrices(model))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def hqq(model, bits: int, group: int = GROUP) -> int:
    """Quantize the experts of ``model`` in place with HQQ at ``bits``; returns their stored bytes."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)
    total = 0
    with torch.no_grad():
        for *_, w in expert_matrices(model):
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w.clone()
            q = HQQLinear(lin, cfg, compute_dtype=torch.float16, device="cpu", initialize=True)
            total += sum(_nbytes(t) for t in (q.W_q, q.meta["scale"], q.meta["zero"]))
            w.copy_(q.dequantize().float().reshape(w.shape))
    return total


def gptq(model_dir, bits: int, calibration: np.ndarray, seq: int, group: int = GROUP):
    """(float32 model with GPTQ-quantized experts, their stored bytes): llm-compressor's GPTQ on the
    model in ``model_dir``, calibrated on the token ids ``calibration`` cut into windows of ``seq``."""
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    work = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    windows = [calibration[i:i + seq].tolist() for i in range(0, calibration.size - seq + 1, seq)]
    data = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * seq for _ in windows]})
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group,
                            scale_dtype=torch.float16)
    scheme = QuantizationScheme(targets=[f"re:{EXPERT_LINEAR.pattern}"], weights=args)
    oneshot(model=work, dataset=data, recipe=GPTQModifier(config_groups={"experts": scheme}, actorder="static"),
            num_calibration_samples=len(windows), max_seq_length=seq)
    done: dict[tuple[int, int, str], tuple[torch.Tensor, int]] = {}
    for name, mod in work.named_modules():
        m = EXPERT_LINEAR.match(name)
        if m is None or not hasattr(mod, "weight_scale"):
            continue
        done[int(m[1]), int(m[2]), m[3]] = _gptq_matrix(mod)
    out = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total = 0
    with torch.no_grad():
        for i, e, proj, w in expert_matrices(out):
            if (i, e, proj) not in done:
                raise RuntimeError(f"llm-compressor left layer {i} expert {e} {proj}_proj unquantized")
            deq, nbytes = done[i, e, proj]
            w.copy_(deq)
            total += nbytes
    return out, total


def _gptq_matrix(mod) -> tuple[torch.Tensor, int]:
    """(dequantized weight, stored bytes) of one GPTQ-quantized Linear, through compressed-tensors'
    own ``pack-quantized`` compressor and decompressor (what a checkpoint holds and a loader rebuilds)."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor as Packed

    scheme = mod.quantization_scheme
    scale = mod.weight_scale.detach()
    if not torch.equal(scale.half().to(scale.dtype), scale):  # scale_dtype=float16 rounds the values only
        raise RuntimeError("llm-compressor's GPTQ scales are not float16 values")
    state = {"weight": mod.weight.detach(), "weight_scale": scale, "weight_zero_point": mod.weight_zero_point.detach()}
    stored = Packed.compress(state, scheme)
    if set(stored) != {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}:
        raise RuntimeError(f"unexpected pack-quantized tensors {sorted(stored)}")
    deq = Packed.decompress(stored, scheme)["weight"].float()
    stored["weight_scale"] = scale.half()  # as stored: the values are float16 (checked above)
    return deq, sum(_nbytes(t) for t in stored.values())
