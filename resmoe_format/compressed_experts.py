"""Adding compressed experts (spec 4.5 ``compressed_experts``, version 6.0) to a .rmoe file: every tensor
and every schema member of the source file is copied as it is, each named layer gains its vectors tensor
``rmoe.layers.{i}.compressed_experts`` (float32, (E, 3, max(hidden, n))) and its ``n_ce``, and the result is
published atomically under a new name (the source is never modified)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np

from .container import CHECKSUM_TENSOR, Reader, Writer, ce_shape
from .errors import RmoeFormatError
from .schema import CompressedExpertsSpec


def vectors_name(layer: int) -> str:
    return f"rmoe.layers.{layer}.compressed_experts"


def ones_vectors(reader: Reader) -> dict[int, np.ndarray]:
    """The initial vectors of every layer of ``reader``: all ones (the paper's initialisation)."""
    out = {}
    for lay in reader.layers:
        shape = ce_shape(lay)
        if shape is None:
            raise RmoeFormatError(f"layer {lay.index}: no 2-D matrix with a neuron axis gives the hidden size")
        out[lay.index] = np.ones(shape, np.float32)
    return out


def write_with_vectors(reader: Reader, out: str | os.PathLike, vectors: dict[int, np.ndarray], n_ce: int,
                       method: dict | None = None) -> Path:
    """Write ``reader``'s file with the compressed experts ``vectors`` (layer -> (E, 3, L)) and ``n_ce`` to
    ``out``; ``method`` members are added under the schema's ``method.compressed_experts``. Any vectors the
    source already has are replaced."""
    out = Path(out)
    if out.exists() and Path(reader.path).exists() and out.resolve() == Path(reader.path).resolve():
        raise RmoeFormatError(f"{out}: the output would overwrite its input")
    schema = reader.schema
    layers = {lay.index: lay for lay in schema.layers}
    if set(vectors) != set(layers):
        raise RmoeFormatError(f"vectors for layers {sorted(vectors)}, the file has layers {sorted(layers)}")
    meth = dict(schema.method)
    if method is not None:
        meth["compressed_experts"] = method
    w = Writer(out, schema.model, meth)
    try:
        old = {lay.ce.vectors for lay in schema.layers if lay.ce is not None}
        for name in reader.tensor_names:
            if name != CHECKSUM_TENSOR and name != schema.checksum["tensor"] and name not in old:
                w._put(name, reader.tensor(name))
        new_layers = []
        for lay in schema.layers:
            v = np.ascontiguousarray(vectors[lay.index], dtype=np.float32)
            if v.shape != ce_shape(lay):
                raise RmoeFormatError(f"layer {lay.index}: vectors of shape {list(v.shape)}, the layer needs "
                                      f"{list(ce_shape(lay))}")
            if not np.isfinite(v).all():
                raise RmoeFormatError(f"layer {lay.index}: the compressed-expert vectors are not all finite")
            spec = copy.copy(lay)
            spec.ce = CompressedExpertsSpec(w._put(vectors_name(lay.index), v), n_ce)
            new_layers.append(spec)
        w._files = [dict(f) for f in schema.files]
        w._passthrough = list(schema.passthrough)
        w._coded = list(schema.coded)
        w._layers = new_layers
        w.close()
    except BaseException:
        w.abort()
        raise
    return out


def read_vectors(reader: Reader) -> tuple[dict[int, np.ndarray], int | None]:
    """(layer -> float32 vectors, n_ce) of a file's compressed experts; ({}, None) when it has none."""
    vecs = {lay.index: np.asarray(reader.tensor(lay.ce.vectors), dtype=np.float32)
            for lay in reader.layers if lay.ce is not None}
    n = {lay.ce.n_ce for lay in reader.layers if lay.ce is not None}
    return vecs, (n.pop() if len(n) == 1 else None if not n else max(n))


def refuse_ce(reader: Reader, what: str, error: type[Exception] = RmoeFormatError, flag: str = "--ignore-ce") -> None:
    """Raise ``error`` when ``reader``'s file has compressed experts (spec 4.5) that ``what`` cannot express."""
    layers = [lay.index for lay in reader.layers if lay.ce is not None]
    if layers:
        raise error(
            f"{reader.path} has compressed experts (n_ce={reader.layer(layers[0]).ce.n_ce}, layers {layers}): "
            f"{what} has no such operation, so the model would run without them; pass {flag} to export the full "
            f"top-k model (the experts without the vectors) instead")
