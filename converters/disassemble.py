"""The inverse of :func:`resmoe_format.restore.assemble`: source tensors to per-expert
canonical matrices, for any assembly rule (per expert or stacked, transposed, concatenated
or interleaved). Architecture-agnostic: adapters only declare SourceSpecs."""
from __future__ import annotations

from collections.abc import Callable

import torch

from resmoe_format import SourceSpec
from resmoe_format.torch.tensors import TORCH_DTYPES

from .architectures.base import LayerLayout
from .errors import ConversionError


def _split(x: torch.Tensor, src: SourceSpec, widths: list[int]) -> list[torch.Tensor]:
    """One expert's slice of a source tensor, cut into its parts (still in source orientation)."""
    if len(src.parts) == 1:
        return [x]
    ax = src.join_axis
    if src.join == "concat":
        return list(torch.split(x, widths, dim=ax))
    # interleave: element i of part j sits at position i * len(parts) + j along the join axis
    shape = list(x.shape)
    shape[ax:ax + 1] = [shape[ax] // len(src.parts), len(src.parts)]
    y = x.reshape(shape)
    return [y.select(ax + 1, j) for j in range(len(src.parts))]


def expert_matrices(layout: LayerLayout, get: Callable[[str], torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per expert, {matrix name: tensor in canonical shape and source dtype}.

    The tensors are views of what ``get`` returns (transposed or strided where the source
    layout differs from the canonical one): no copy is made. Raises :class:`ConversionError`
    when a source tensor's shape or dtype does not match its :class:`SourceSpec`.
    """
    E = layout.num_experts
    specs = {m.name: m for m in layout.matrices}
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(E)]
    for src in layout.sources:
        unknown = [p for p in src.parts if p not in specs]
        if unknown:
            raise ConversionError(f"{src.name}: part {unknown[0]} is not a matrix of layer {layout.index}")
        t = get(src.name)
        want = layout.source_shape(src)
        if tuple(t.shape) != want:
            raise ConversionError(f"{src.name}: shape {list(t.shape)}, expected {list(want)}")
        if TORCH_DTYPES.get(src.dtype) != t.dtype:
            raise ConversionError(f"{src.name}: dtype {t.dtype}, expected {src.dtype}")
        # each part's extent along the join axis, in source orientation
        widths = [(tuple(reversed(specs[p].shape)) if src.transpose else specs[p].shape)[src.join_axis]
                  if len(src.parts) > 1 else 0 for p in src.parts]
        if src.expert == "all":
            pieces = [(k, t[k]) for k in range(E)]
        else:
            pieces = [(src.expert, t)]
        for k, x in pieces:
            for p, piece in zip(src.parts, _split(x, src, widths)):
                out[k][p] = piece.transpose(0, 1) if src.transpose and piece.ndim == 2 else piece
    for k, mats in enumerate(out):
        missing = sorted(set(specs) - set(mats))
        if missing:
            raise ConversionError(f"layer {layout.index} expert {k}: no source tensor provides {missing[0]}")
    return out
