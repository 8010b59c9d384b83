"""Files with k-quant records for the runtime and exporter tests: a converted file re-encoded record by
record (:func:`requantize`), without the converter's allocator."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

import resmoe_format
from resmoe_format import MoELayer, Writer, codecs
from resmoe_format.codecs.kquant import KqLayout
from resmoe_format.codecs.sparse_common import keep_mask
from resmoe_format.restore import restore_expert

#: (encoding, value dtype) of one record, or None to keep the record as it is
Choice = tuple[str, str] | None
#: (layer, expert or None for the base, matrix, the record's encoding) -> Choice
Plan = Callable[[int, int | None, str, str], Choice]
#: small groups, so that the tests' small matrices hold several groups and super-blocks
LAYOUT = KqLayout(16, 3, 6)
_MIXED = (("dense", "q2"), ("bitmap", "ternary"), ("rice", "q3"), ("csr16", "q6"), ("bsr", "q5"), ("dense", "q8"))


def mixed_plan(layer: int, expert: int | None, matrix: str, encoding: str) -> Choice:
    """A q4 barycenter; residuals in turn dense, bitmap, rice, csr16 and bsr of every other k-quant dtype."""
    return ("dense", "q4") if expert is None else _MIXED[(3 * layer + expert) % len(_MIXED)]


def requantize(src: Path, dst: Path, plan: Plan, layout: KqLayout = LAYOUT, drop_base: bool = False) -> Path:
    """Copy ``src`` to ``dst`` with the records ``plan`` names re-encoded from their decoded values
    (low-rank records from their factors; an expert's shared U stays shared). ``drop_base``: base kind
    ``none``, every expert's restored matrices (original order) as its residuals, re-encoded by ``plan``."""
    with resmoe_format.open(src) as r, Writer(dst, r.model, r.schema.method) as w:
        for path, data in r.files.items():
            w.add_file(path, data)
        for name in r.schema.passthrough:
            w.add_passthrough(name, np.array(r.tensor(name)))
        for lay in r.layers:
            w.add_layer(_layer(r, lay, plan, layout, drop_base))
    return dst


def _layer(r, lay, plan: Plan, layout: KqLayout, drop_base: bool) -> MoELayer:
    def recode(expert: int | None, m: str, ref, x: np.ndarray, shared: dict) -> codecs.Encoded:
        enc = r.encoded(ref, lay.matrix(m)) if ref is not None else None
        choice = plan(lay.index, expert, m, ref.encoding if ref is not None else "dense")
        if choice is None:
            return enc if enc is not None else codecs.encode(x, "dense", "fp32")
        encoding, vd = choice
        if encoding == "lowrank":
            u, v = codecs.CODECS["lowrank"].factors(enc)
            new = codecs.encode(None, "lowrank", vd, layout, u=u, v=v)
            first = shared.setdefault(ref.tensors["u"], new)
            if first is not new:  # the same U: share its three parts
                new.parts.update({p: first.parts[p] for p in ("u", "u_group_scales", "u_scales")})
            return new
        return codecs.encode(x, encoding, vd, layout, mask=None if encoding == "dense" else keep_mask(x))

    mats = [m.name for m in lay.matrices]
    if drop_base:
        experts = [restore_expert(r, lay.index, e, original_order=True) for e in range(lay.num_experts)]
        residuals = [{m: recode(e, m, None, experts[e][m].astype(np.float32).reshape(lay.matrix(m).shape2d), {})
                      for m in mats} for e in range(lay.num_experts)]
        return MoELayer(lay.index, lay.num_neurons, lay.matrices, "none", {}, residuals, None, lay.sources,
                        lay.prefix)
    base = {m: recode(None, m, lay.base[m], r.base(lay.index, m), {}) for m in mats}
    residuals = []
    for e in range(lay.num_experts):
        shared: dict = {}
        residuals.append({m: None if lay.residuals[e][m] is None else
                          recode(e, m, lay.residuals[e][m], r.residual(lay.index, e, m), shared) for m in mats})
    perms = None if lay.permutations is None else [r.permutation(lay.index, e) for e in range(lay.num_experts)]
    return MoELayer(lay.index, lay.num_neurons, lay.matrices, lay.base_kind, base, residuals, perms, lay.sources,
                    lay.prefix)
