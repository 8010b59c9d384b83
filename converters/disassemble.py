"""The inverse of :func:`resmoe_format.restore.assemble`: source tensors to per-expert
canonical matrices, for any assembly rule (per expert or stacked, transposed, concatenated
or interleaved). Architecture-agnostic: adapters only declare SourceSpecs."""
from __future__ import annotations

from collections.abc import Callable

import torch

from resmoe_format import SourceSpec

from .architectures.base import LayerLayout
from .errors import ConversionError


def _split(x: torch.Tensor, src: SourceSpec, widths: list[int]) -> list[torch.Tensor]:
    """One expert's slice of a source tensor, cut into its parts (still in source orientation)."""
    if len(src.parts) == 1:
        return [x]
    ax = src.join_axis
    if src.join == "concat":
        return list(torch.split(x, widths, dim=ax))
    shape = list(x.shape)
    shape[ax:ax + 1] = [shape[ax] // len(src.parts), len(src.parts)]
    y = x.reshape(shape)
    return [y.select(ax + 1, j) for j in range(len(src.parts))]


def expert_matrices(layout: LayerLayout, get: Callable[[str], torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per expert, {matrix name: tensor in canonical shape and source dtype} (views where possible)."""
    E = layout.num_experts
    specs = {m.name: m for m in layout.matrices}
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(E)]
    for src in layout.sources:
        t = get(src.name)
        experts = range(E) if src.expert == "all" else [src.expert]
        pieces = [t[k] for k in range(E)] if src.expert == "all" else [t]
        widths = []
        for p in src.parts:
            shape = specs[p].shape
            shape = tuple(reversed(shape)) if src.transpose else shape
            widths.append(shape[src.join_axis] if len(src.parts) > 1 else 0)
        for k, x in zip(experts, pieces):
            for p, piece in zip(src.parts, _split(x, src, widths)):
                m = piece.transpose(0, 1) if src.transpose and piece.ndim == 2 else piece
                if tuple(m.shape) != tuple(specs[p].shape):
                    raise ConversionError(f"{src.name}: expert {k} {p} has shape {list(m.shape)}, expected "
                                          f"{list(specs[p].shape)}")
                out[k][p] = m
    for k, mats in enumerate(out):
        missing = sorted(set(specs) - set(mats))
        if missing:
            raise ConversionError(f"layer {layout.index} expert {k}: no source tensor provides {missing[0]}")
    return out
