"""The restoration arithmetic of spec/FORMAT.md section 6, and source-tensor assembly.

For expert k and matrix m (canonical orientation, 2-D view):

    B = decode(base)       float32, or absent when base kind is "none" or "predictor"
    D = decode(residual)   float32, or absent
    A = B + D              one IEEE-754 float32 addition per element (A = B or A = D alone
                           when the other is absent; no addition with zero is performed)
    W = cast(A, dtype)     round to nearest, ties to even, into the matrix's source dtype
    original order:        W_orig[..., p[i], ...] = W[..., i, ...] along neuron_axis
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from . import dtypes
from .container import Reader
from .errors import RmoeFormatError
from .schema import LayerSpec, SourceSpec


def combine(base: np.ndarray | None, residual: np.ndarray | None, dtype: str) -> np.ndarray:
    """``cast(base + residual)`` in float32 per the spec; either term may be absent."""
    if base is None and residual is None:
        raise RmoeFormatError("a matrix with neither base nor residual cannot be restored")
    if base is None:
        acc = residual
    elif residual is None:
        acc = base
    else:
        acc = np.add(base, residual, dtype=np.float32)
    return acc.astype(dtypes.by_name(dtype).np)


def unpermute(w: np.ndarray, perm: np.ndarray, axis: int) -> np.ndarray:
    """Undo the alignment: the result's neuron perm[i] is ``w``'s neuron i."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return np.take(w, inv, axis=axis)


def restore_matrix(reader: Reader, layer: int, expert: int, matrix: str, original_order: bool = False) -> np.ndarray:
    """One expert's restored matrix in its source dtype and logical shape."""
    lay = reader.layer(layer)
    spec = lay.matrix(matrix)
    ref = lay.residuals[expert][spec.name] if 0 <= expert < lay.num_experts else None
    if ref is not None and ref.encoding == "fields" and ref.value_dtype == spec.dtype and not lay.adds_base:
        w = reader.decode_exact(layer, ref, matrix)  # A = D, and D holds T values: W = D (spec 6.1, 5.11)
    else:
        w = combine(reader.addend(layer, matrix), reader.residual(layer, expert, matrix), spec.dtype)
    w = w.reshape(spec.shape)
    if original_order and lay.permutations is not None and spec.neuron_axis is not None:
        w = unpermute(w, reader.permutation(layer, expert), spec.neuron_axis)
    return w


def restore_expert(reader: Reader, layer: int, expert: int, original_order: bool = False) -> dict[str, np.ndarray]:
    """All matrices of one expert, by matrix name."""
    lay = reader.layer(layer)
    return {m.name: restore_matrix(reader, layer, expert, m.name, original_order) for m in lay.matrices}


def assemble_expert(rule, mats: dict[str, np.ndarray]) -> np.ndarray:
    """One expert's piece of a tensor (spec 6.5 steps 1-2); ``rule`` is a :class:`SourceSpec` or any
    object with its ``parts``, ``transpose``, ``join`` and ``join_axis``."""
    parts = [mats[p].T if rule.transpose else mats[p] for p in rule.parts]
    if len(parts) == 1:
        return np.ascontiguousarray(parts[0])
    if rule.join == "concat":
        return np.concatenate(parts, axis=rule.join_axis)
    stacked = np.stack(parts, axis=rule.join_axis + 1)  # interleave: a0 b0 a1 b1 ...
    shape = list(parts[0].shape)
    shape[rule.join_axis] *= len(parts)
    return stacked.reshape(shape)


def assemble(lay: LayerSpec, src: SourceSpec, experts: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Build one source tensor from restored expert matrices per its assembly rule."""
    if src.expert == "all":
        return np.stack([assemble_expert(src, e) for e in experts])
    return assemble_expert(src, experts[src.expert])


def restore_layer(reader: Reader, layer: int, original_order: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """The source tensors of one compressed layer, as (name, array)."""
    lay = reader.layer(layer)
    experts = [restore_expert(reader, layer, k, original_order) for k in range(lay.num_experts)]
    for src in lay.sources:
        yield src.name, assemble(lay, src, experts)


def restore_all(reader: Reader, original_order: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of the source checkpoint: passthrough ones, then each layer's."""
    yield from reader.passthrough_tensors()
    for lay in reader.layers:
        yield from restore_layer(reader, lay.index, original_order)
        reader.release()

