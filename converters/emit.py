"""Turn an encoder's LayerResult into bytes (codecs.Encoded records) and measure what was lost.

The error of every expert matrix is measured on what the file will really restore:
each record is decoded and combined with the stored base exactly as a reader does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from resmoe_format import MoELayer, codecs
from resmoe_format.codecs import Encoded, Quant
from resmoe_format.restore import combine

from .architectures.base import LayerLayout
from .encoders.parts import LayerResult, LowRankPart, SparsePart
from .errors import ConversionError

DELTA_FORMATS = ("auto", "csr16", "bitmap", "bsr", "rice", "lowrank", "dense")
ELEMENTWISE = ("auto", "csr16", "bitmap", "bsr", "rice", "dense")


@dataclass(frozen=True)
class EmitOptions:
    """How records become bytes: residual value dtype and barycenter dtype (None: the source's),
    residual encoding, and the int8 quantization used where a dtype is int8."""

    value_dtype: str | None = None  # None: the source dtype
    delta_format: str = "auto"
    quant: Quant | None = None
    base_dtype: str | None = None  # None: the source dtype

    def __post_init__(self) -> None:
        if self.delta_format not in DELTA_FORMATS:
            raise ConversionError(f"--delta-format must be one of {', '.join(DELTA_FORMATS)}, "
                                  f"got {self.delta_format!r}")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _sparse(part: SparsePart, fmt: str, vd: str, quant: Quant | None) -> Encoded:
    x, mask = _np(part.values), part.mask.cpu().numpy()
    if x.ndim == 1 and fmt == "lowrank":
        fmt = "dense"
    if fmt == "lowrank":
        raise ConversionError("--delta-format lowrank needs --residual svd")
    if fmt == "bsr":
        sizes = {k: v for k, v in codecs.predict_sizes(x, vd, quant, mask).items() if k.startswith("bsr")}
        label = min(sizes, key=lambda k: sizes[k][0])
        return codecs.encode(x, "bsr", vd, quant, mask=mask, **sizes[label][1])
    return codecs.encode(x, fmt, vd, quant, mask=mask)


def _lowrank(part: LowRankPart, fmt: str, vd: str, quant: Quant | None, leader: Encoded | None = None) -> Encoded:
    """Encode factors; with ``leader`` (the record whose U this one shares) the very same U
    arrays are reused, which the writer stores once (spec: shared low-rank factors)."""
    u, v = _np(part.u), _np(part.v)
    if leader is not None:
        enc = codecs.encode(None, "lowrank", vd, quant, u=u, v=v)
        for p in ("u", "u_scales"):
            if p in enc.parts:
                enc.parts[p] = leader.parts[p]
        return enc
    if fmt in ("auto", "lowrank") and part.owner:  # others reuse this U: it stays low rank
        return codecs.encode(None, "lowrank", vd, quant, u=u, v=v)
    if fmt == "auto":
        return codecs.encode_auto(None, vd, quant, u=u, v=v)
    if fmt == "lowrank":
        return codecs.encode(None, "lowrank", vd, quant, u=u, v=v)
    if fmt == "dense":
        return codecs.encode((u.astype(np.float64) @ v.astype(np.float64)).astype(np.float32), "dense", vd, quant)
    raise ConversionError(f"--residual svd stores factors: --delta-format must be auto, lowrank or dense, not {fmt}")


def _new_bytes(e: Encoded, counted: set[int]) -> int:
    """Bytes this record adds to the file: part arrays already stored for an earlier record (a shared low-rank
    factor, spec 4.8) are not counted again."""
    fresh = [a for a in e.parts.values() if id(a) not in counted]
    counted.update(id(a) for a in fresh)
    return sum(a.nbytes for a in fresh)


def _new_params(part, counted: set[int]) -> int:
    """Parameters a residual part adds: a low-rank factor shared with earlier parts counts once."""
    if not isinstance(part, LowRankPart):
        return part.params
    fresh = [t for t in (part.u, part.v) if id(t) not in counted]
    counted.update(id(t) for t in fresh)
    return sum(t.numel() for t in fresh)


def _share_factors(part: LowRankPart, e: Encoded, m: str, leaders: dict[tuple[str, int], Encoded]) -> None:
    """A factor tensor of ``part`` that an earlier expert's record of matrix ``m`` holds (the very same object)
    is stored once: ``e`` takes that record's arrays for all of the factor's parts (spec 4.8, version 5.0)."""
    from resmoe_format.container import FACTOR_PARTS

    for factor in ("u", "v"):
        key = (m, id(getattr(part, factor)))
        leader = leaders.setdefault(key, e)
        if leader is not e and leader.encoding == e.encoding == "lowrank":
            for p in FACTOR_PARTS[factor]:
                if p in e.parts:
                    e.parts[p] = leader.parts[p]


def emit_layer(layout: LayerLayout, result: LayerResult, aligned: list[dict[str, torch.Tensor]],
               dtype: str, options: EmitOptions) -> tuple[MoELayer, dict]:
    """The MoELayer to write and its per-matrix statistics (params kept, bytes, relative error).

    Consumes ``result.residuals`` and ``aligned``: each expert's dense tensors are dropped
    once its records are encoded, so memory holds one expert's work at a time."""
    if result.lossless:  # exact residuals: float32, or the source dtype when there is no base (x itself)
        vd = "fp32" if result.base else dtype
    else:
        vd = options.value_dtype or dtype
    quant = options.quant if vd == "int8" else None
    bd = options.base_dtype or dtype
    fmt = options.delta_format
    if result.lossless and fmt not in ELEMENTWISE:
        raise ConversionError(f"--lossless stores exact residuals element-wise; --delta-format {fmt} cannot")
    base = {m: codecs.encode(_np(b), "dense", bd, options.quant if bd == "int8" else None)
            for m, b in result.base.items()}
    base_np = {m: codecs.decode(e) for m, e in base.items()}
    if result.base_channels is not None:  # the base restoration adds: zero on the pruned channels (spec 4.7)
        for m in layout.matrices:
            if m.name in base_np and m.neuron_axis is not None:
                full = np.zeros(m.shape, np.float32)
                full[result.base_channels] = base_np[m.name].reshape(m.kept(len(result.base_channels)).shape)
                base_np[m.name] = full.reshape(m.shape2d)
    rounded_base = bd != dtype  # the stored barycenter differs from the one the residuals were taken from
    residuals: list[dict[str, Encoded | None]] = []
    stats = {m.name: {"shape": list(m.shape), "dtype": m.dtype, "params": 0, "kept": 0, "residual_kept": 0,
                      "bytes": base[m.name].nbytes if m.name in base else 0,
                      "base_params": int(np.prod(result.base[m.name].shape)) if m.name in base else 0,
                      "rel_error": []}
             for m in layout.matrices}
    counted_bytes: set[int] = set()
    counted_params: set[int] = set()
    leaders: dict[tuple[str, int], Encoded] = {}  # (matrix, id of a factor tensor) -> its first record
    for k, parts in enumerate(result.residuals):
        enc: dict[str, Encoded | None] = {}
        for m in layout.matrices:
            part = parts.get(m.name)
            st = stats[m.name]
            if part is None and m.name not in base:  # nothing kept and no base: store an empty residual
                zeros = torch.zeros(m.shape)
                part = SparsePart(zeros, zeros.bool())
            if part is None:
                e = None
            elif isinstance(part, SparsePart):
                if rounded_base and m.name in base_np:  # kept entries: exact against the stored barycenter
                    exact = _np(aligned[k][m.name]).reshape(base_np[m.name].shape) - base_np[m.name]
                    mask = part.mask.cpu()
                    part = SparsePart(torch.from_numpy(exact).reshape(part.values.shape) * mask, mask)
                e = _sparse(part, fmt, vd, quant)
            else:
                leader = enc.get(part.shared_u) if part.shared_u and fmt != "dense" else None
                if part.shared_u and fmt != "dense" and (leader is None or leader.encoding != "lowrank"):
                    raise ConversionError(f"matrix {m.name} shares the U of {part.shared_u}, which is not low rank")
                e = _lowrank(part, fmt, vd, quant, leader)
                if not part.shared_u:
                    _share_factors(part, e, m.name, leaders)
            enc[m.name] = e
            truth = _np(aligned[k][m.name]).astype(np.float64)
            got = combine(base_np.get(m.name), codecs.decode(e) if e is not None else None, dtype)
            diff = truth.reshape(-1) - got.astype(np.float64).reshape(-1)
            norm = float(np.linalg.norm(truth))
            st["rel_error"].append(float(np.linalg.norm(diff) / norm) if norm else float(np.linalg.norm(diff)))
            st["params"] += int(np.prod(m.shape))
            kept = _new_params(part, counted_params) if part is not None else 0
            st["kept"] += kept
            st["residual_kept"] += kept
            st["bytes"] += _new_bytes(e, counted_bytes) if e is not None else 0
        residuals.append(enc)
        result.residuals[k] = {}
        aligned[k] = {}
    for st in stats.values():
        st["kept"] += st.pop("base_params")
    layer = MoELayer(layout.index, layout.num_neurons, list(layout.matrices), result.base_kind, base, residuals,
                     result.permutations, list(layout.sources), layout.prefix, base_channels=result.base_channels)
    return layer, stats
