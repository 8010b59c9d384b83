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


def _own_bytes(e: Encoded, earlier: dict[str, Encoded | None], taken: tuple[str, ...] = ()) -> int:
    """Bytes this record adds to the file: a U shared with an earlier record of the expert, and the parts
    ``taken`` from another expert's record (a cross-expert factor), are not counted again."""
    shared = {id(x.parts[p]) for x in earlier.values() if x is not None and x.encoding == "lowrank"
              for p in ("u", "u_scales") if p in x.parts}
    return sum(a.nbytes for p, a in e.parts.items()
               if p not in taken and not (p in ("u", "u_scales") and id(a) in shared))


def _share_across(part: LowRankPart, e: Encoded, m: str, leaders: dict[str, tuple]) -> tuple[str, ...]:
    """A factor that ``part`` shares with the other experts' parts of matrix ``m`` (``part.shared_across``,
    the very same tensor object) is stored once: the first expert's record leads, the others take its arrays
    for all of the factor's parts (spec 4.8, version 5.0). Returns the parts taken."""
    from resmoe_format.container import FACTOR_PARTS

    factor = part.shared_across
    if factor is None or e.encoding != "lowrank":
        return ()
    t = getattr(part, factor)
    held = leaders.get(m)
    if held is None or held[0] is not t:
        leaders[m] = (t, e)
        return ()
    taken = tuple(p for p in FACTOR_PARTS[factor] if p in e.parts)
    for p in taken:
        e.parts[p] = held[1].parts[p]
    return taken


class LayerEmitter:
    """Turns one layer's records into bytes, expert by expert, and keeps the statistics: the base at once,
    then :meth:`expert` for each expert in order, then :meth:`stats`."""

    def __init__(self, layout: LayerLayout, result: LayerResult, dtype: str, options: EmitOptions):
        if result.lossless:  # exact residuals: float32, or the source dtype when there is no base (x itself)
            self.vd = "fp32" if result.base else dtype
        else:
            self.vd = options.value_dtype or dtype
        self.quant = options.quant if self.vd == "int8" else None
        bd = options.base_dtype or dtype
        self.fmt = options.delta_format
        if result.lossless and self.fmt not in ELEMENTWISE:
            raise ConversionError(f"--lossless stores exact residuals element-wise; --delta-format {self.fmt} cannot")
        self.layout, self.dtype = layout, dtype
        self.base = {m: codecs.encode(_np(b), "dense", bd, options.quant if bd == "int8" else None)
                     for m, b in result.base.items()}
        self.base_np = {m: codecs.decode(e) for m, e in self.base.items()}
        if result.base_channels is not None:  # the base restoration adds: zero on the pruned channels (spec 4.7)
            for m in layout.matrices:
                if m.name in self.base_np and m.neuron_axis is not None:
                    full = np.zeros(m.shape, np.float32)
                    full[result.base_channels] = self.base_np[m.name].reshape(
                        m.kept(len(result.base_channels)).shape)
                    self.base_np[m.name] = full.reshape(m.shape2d)
        self.leaders: dict[str, tuple] = {}  # matrix -> (its cross-expert factor tensor, the record leading it)
        self.rounded_base = bd != dtype  # the stored barycenter differs from the one the residuals were taken from
        self._stats = {m.name: {"shape": list(m.shape), "dtype": m.dtype, "params": 0, "kept": 0, "residual_kept": 0,
                                "bytes": self.base[m.name].nbytes if m.name in self.base else 0,
                                "base_params": int(np.prod(result.base[m.name].shape)) if m.name in self.base else 0,
                                "rel_error": []}
                       for m in layout.matrices}

    def expert(self, parts: dict, aligned: dict[str, torch.Tensor]) -> dict[str, Encoded | None]:
        """One expert's records from its residual parts; ``aligned`` (its matrices in base order) measures
        the error of what the file restores."""
        base, base_np, fmt, vd, quant = self.base, self.base_np, self.fmt, self.vd, self.quant
        enc: dict[str, Encoded | None] = {}
        for m in self.layout.matrices:
            part = parts.get(m.name)
            st = self._stats[m.name]
            taken: tuple[str, ...] = ()
            if part is None and m.name not in base:  # nothing kept and no base: store an empty residual
                zeros = torch.zeros(m.shape)
                part = SparsePart(zeros, zeros.bool())
            if part is None:
                e = None
            elif isinstance(part, SparsePart):
                if self.rounded_base and m.name in base_np:  # kept entries: exact against the stored barycenter
                    exact = _np(aligned[m.name]).reshape(base_np[m.name].shape) - base_np[m.name]
                    mask = part.mask.cpu()
                    part = SparsePart(torch.from_numpy(exact).reshape(part.values.shape) * mask, mask)
                e = _sparse(part, fmt, vd, quant)
            else:
                leader = enc.get(part.shared_u) if part.shared_u and fmt != "dense" else None
                if part.shared_u and fmt != "dense" and (leader is None or leader.encoding != "lowrank"):
                    raise ConversionError(f"matrix {m.name} shares the U of {part.shared_u}, which is not low rank")
                e = _lowrank(part, fmt, vd, quant, leader)
                taken = _share_across(part, e, m.name, self.leaders)
            enc[m.name] = e
            truth = _np(aligned[m.name]).astype(np.float64)
            got = combine(base_np.get(m.name), codecs.decode(e) if e is not None else None, self.dtype)
            diff = truth.reshape(-1) - got.astype(np.float64).reshape(-1)
            norm = float(np.linalg.norm(truth))
            st["rel_error"].append(float(np.linalg.norm(diff) / norm) if norm else float(np.linalg.norm(diff)))
            st["params"] += int(np.prod(m.shape))
            kept = 0 if part is None else part.params - (
                getattr(part, part.shared_across).numel() if taken and isinstance(part, LowRankPart) else 0)
            st["kept"] += kept
            st["residual_kept"] += kept
            st["bytes"] += _own_bytes(e, {k: v for k, v in enc.items() if k != m.name}, taken) if e is not None else 0
        return enc

    def stats(self) -> dict:
        """Per-matrix statistics (params kept, bytes, relative errors), once every expert is emitted."""
        for st in self._stats.values():
            st["kept"] += st.pop("base_params", 0)
        return self._stats


def emit_layer(layout: LayerLayout, result: LayerResult, aligned: list[dict[str, torch.Tensor]],
               dtype: str, options: EmitOptions) -> tuple[MoELayer, dict]:
    """The MoELayer to write and its per-matrix statistics (params kept, bytes, relative error).

    Consumes ``result.residuals`` and ``aligned``: each expert's dense tensors are dropped
    once its records are encoded, so memory holds one expert's work at a time."""
    em = LayerEmitter(layout, result, dtype, options)
    residuals: list[dict[str, Encoded | None]] = []
    for k, parts in enumerate(result.residuals):
        residuals.append(em.expert(parts, aligned[k]))
        result.residuals[k] = {}
        aligned[k] = {}
    layer = MoELayer(layout.index, layout.num_neurons, list(layout.matrices), result.base_kind, em.base, residuals,
                     result.permutations, list(layout.sources), layout.prefix, base_channels=result.base_channels)
    return layer, em.stats()
