"""``--lossless``: every expert matrix stored exactly with the ``fields`` encoding (spec 5.11).

Per layer and matrix, each expert is coded on its own (raw fields) or against a predictor stored as
the layer's base (the barycenter in the source dtype, or the aligned medoid expert, which then codes
to almost nothing itself), whichever measures smaller once the base's own bytes are counted; the
layer keeps its permutations only when some matrix uses a predictor. Every record is decoded again
and compared bit for bit before it is written.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from resmoe_format import MoELayer, Writer, codecs
from resmoe_format.codecs import Encoded
from resmoe_format.codecs.fields import bits_of
from resmoe_format.container import permutation_dtype
from resmoe_format.dtypes import by_name

from .errors import ConversionError


def exact(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A float32 tensor holding ``dtype`` values as a numpy array of that dtype (exact)."""
    return t.detach().to("cpu", torch.float32).numpy().astype(by_name(dtype).np)


def encode_checked(x: np.ndarray, dtype: str, predictor: np.ndarray | None = None) -> Encoded:
    """``x`` as a ``fields`` record, decoded again and compared bit for bit."""
    enc = codecs.encode(x, "fields", dtype, predictor=predictor)
    got = codecs.CODECS["fields"].decode_bits(enc, {}, predictor)
    if not np.array_equal(got, bits_of(x, dtype)):
        raise ConversionError("lossless coding did not restore its input exactly (a bug: please report it)")
    return enc


def medoid(xs: list[np.ndarray]) -> np.ndarray:
    """The matrix with the least sum of Euclidean distances to the others."""
    flat = np.stack([x.astype(np.float32).reshape(-1) for x in xs]).astype(np.float64)
    sq = (flat * flat).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * flat @ flat.T, 0)
    return xs[int(np.argmin(np.sqrt(d2).sum(1)))]


def layer_records(originals: list[dict[str, np.ndarray]], base: dict[str, np.ndarray],
                  aligned: list[dict[str, np.ndarray]] | None, perm_bytes: int, specs) -> tuple[
                      str, dict[str, Encoded], list[dict[str, Encoded]], bool]:
    """(base kind, base records, residual records, whether the aligned order is kept) for one layer.

    ``originals`` are the experts in source order, ``aligned`` (with ``base``) in the base's order;
    ``base`` empty or ``aligned`` None: every record raw, in source order."""
    raw = [{m.name: encode_checked(e[m.name], m.dtype) for m in specs} for e in (aligned or originals)]
    if not base or aligned is None:
        return "none", {}, raw, False
    chosen_base: dict[str, Encoded] = {}
    records = [dict(r) for r in raw]
    gain = 0
    for m in specs:
        best = 0, None, None
        for b in (base[m.name], medoid([e[m.name] for e in aligned])):
            pred = [encode_checked(e[m.name], m.dtype, b) for e in aligned]
            base_rec = encode_checked(b, m.dtype)
            saved = sum(r[m.name].nbytes for r in raw) - sum(p.nbytes for p in pred) - base_rec.nbytes
            if saved > best[0]:
                best = saved, base_rec, pred
        if best[1] is not None:
            gain += best[0]
            chosen_base[m.name] = best[1]
            for r, p in zip(records, best[2]):
                r[m.name] = p
    if gain <= perm_bytes:  # the base does not pay for itself and the permutations: source order, raw
        same = all(np.array_equal(a[m.name], o[m.name]) for a, o in zip(aligned, originals) for m in specs)
        return "none", {}, raw if same else [{m.name: encode_checked(e[m.name], m.dtype) for m in specs}
                                              for e in originals], False
    return "predictor", chosen_base, records, True


def convert_layer(plan, lay, w: Writer) -> dict[str, Any]:
    """Write one layer of a ``--lossless`` file; its report entry (errors are 0: checked bit for bit)."""
    from .convert import layer_entry, load_experts

    t0 = time.perf_counter()
    experts = load_experts(plan, lay)
    originals = [{m.name: exact(e[m.name], m.dtype) for m in lay.matrices} for e in experts]
    dtype = lay.matrices[0].dtype
    base_t, perms, aligned_t = plan.encoder.base([dict(e) for e in experts], lay.matrices, dtype, None)
    del experts
    base = {m.name: exact(base_t[m.name], m.dtype) for m in lay.matrices if m.name in base_t}
    aligned = ([{m.name: exact(e[m.name], m.dtype) for m in lay.matrices} for e in aligned_t]
               if base else None)
    del aligned_t, base_t
    itemsize = by_name(permutation_dtype(lay.num_neurons)).itemsize
    perm_bytes = len(perms) * lay.num_neurons * itemsize if perms is not None else 0
    kind, base_recs, residuals, keep_order = layer_records(originals, base, aligned, perm_bytes, lay.matrices)
    permutations = perms if keep_order else None
    stats = {}
    for m in lay.matrices:
        n = int(np.prod(m.shape))
        size = sum(r[m.name].nbytes for r in residuals) + (base_recs[m.name].nbytes if m.name in base_recs else 0)
        stats[m.name] = {"shape": list(m.shape), "dtype": m.dtype, "params": n * len(residuals),
                         "kept": n * len(residuals), "residual_kept": n * len(residuals), "bytes": size,
                         "rel_error": [0.0] * len(residuals), "predicted": m.name in base_recs}
    w.add_layer(MoELayer(lay.index, lay.num_neurons, list(lay.matrices), kind, base_recs, residuals, permutations,
                         list(lay.sources), lay.prefix))
    entry = layer_entry(lay, stats, permutations)
    entry["base_kind"] = kind
    entry["seconds"] = time.perf_counter() - t0
    return entry
