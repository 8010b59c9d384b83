"""``--bits B``: k-quant bases and residuals under one byte budget for the whole expert part.

Two passes over the layers. The first measures, per layer, the rate–distortion points of every
choice (:mod:`.allocate`): each expert matrix quantized directly at every width and, for
``--method resmoe``, as a residual over the layer's barycenter quantized at every base width,
the residual taken against the *dequantized* base, dense at every width or sparse (a bitmap of
its largest entries, their values at a low width). :func:`allocate.allocate` then chooses under the
budget, and the second pass encodes each layer as chosen. Errors are squared weight errors, or with
``--calibration`` output errors on each expert's own inputs, weighted by its share of routed tokens;
the calibrated encode runs GPTQ on the chosen grids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from resmoe_format import MatrixSpec, MoELayer
from resmoe_format.codecs import Encoded, kquant
from resmoe_format.codecs.kquant import KqLayout
from resmoe_format.container import permutation_dtype
from resmoe_format.dtypes import by_name
from resmoe_format.restore import combine

from . import kq_torch
from .allocate import (BASE, DIRECT, RESIDUAL, RESMOE_LOWRANK_WIDTHS, RESMOE_RANKS, LayerChoice, LayerTable,
                       MatrixTable, kept, rank_of, residual_form)
from .calibrate import ExpertHessians, LayerInputs, expert_hessians

#: the group layout of every k-quant record the converter writes: 64-value groups, 6-bit group
#: scales and offsets, fp16 super-block scales per 256 values (0.3125 bits per value of scales)
LAYOUT = KqLayout(64, 4, 6)


def shape2d(m: MatrixSpec) -> tuple[int, int]:
    return (int(m.shape[0]), int(m.shape[1])) if len(m.shape) == 2 else (1, int(m.shape[0]))


def values_of(m: MatrixSpec) -> int:
    return int(np.prod(m.shape))


def record_bytes(shape: tuple[int, int], label: str | None) -> int:
    """Bytes of a record of a ``shape`` matrix stored as ``label`` (a DIRECT, BASE or RESIDUAL label)."""
    if label is None:
        return 0
    f, n = residual_form(label), shape[0] * shape[1]
    if f.density is not None:
        return -(-n // 8) + kquant.nbytes(kept(n, f.density), f.width, LAYOUT)  # bitmap mask, then the values
    if f.rank is not None:
        k = rank_of(shape, f.rank)
        return kquant.nbytes(shape[0] * k, f.width, LAYOUT) + kquant.nbytes(k * shape[1], f.width, LAYOUT)
    return kquant.nbytes(n, f.width, LAYOUT)


def permutation_bytes(lay) -> int:
    """Bytes of a layer's permutations (one per expert, spec 6.4)."""
    return lay.num_experts * lay.num_neurons * by_name(permutation_dtype(lay.num_neurons)).itemsize


def shape_tables(layouts, use_base: bool, permuted: bool = True) -> list[LayerTable]:
    """Tables with every byte count and zero errors: enough to find the cheapest allocation (``permuted``:
    a layer with a base pays its permutations; d2moe's Fisher base has none)."""
    out = []
    for lay in layouts:
        mats = []
        for m in lay.matrices:
            t = MatrixTable(m.name, np.array([record_bytes(shape2d(m), w) for w in DIRECT]), np.zeros((lay.num_experts,
                                                                                               len(DIRECT))))
            if use_base:
                t.base_bytes = {w: record_bytes(shape2d(m), w) for w in BASE}
                t.residual_bytes = np.array([record_bytes(shape2d(m), w) for w in RESIDUAL])
                t.residual_error = {w: np.zeros((lay.num_experts, len(RESIDUAL))) for w in BASE}
            mats.append(t)
        out.append(LayerTable(lay.index, permutation_bytes(lay) if use_base and permuted else 0, mats))
    return out


def _input_axis(kind, m: MatrixSpec) -> int | None:
    """1 for an input matrix (x @ W.T), 0 for the output matrix (h @ W), None for a vector."""
    if kind is None or len(m.shape) != 2:
        return None
    return 0 if m.name == kind.output else 1


@dataclass
class Target:
    """One matrix of every expert, in the order the layer is stored, with its error measure."""

    spec: MatrixSpec
    w: torch.Tensor  # (E, r, c) float32
    hessians: list[torch.Tensor] | None  # per expert, or None (squared weight error)
    shares: list[float]
    axis: int | None

    def importance(self) -> torch.Tensor | None:
        """Per value importance (E, r, c): the Hessian diagonal along the input axis (imatrix)."""
        if self.hessians is None or self.axis is None:
            return None
        d = torch.stack([torch.diagonal(h) for h in self.hessians])  # (E, inputs)
        return (d[:, None, :] if self.axis == 1 else d[:, :, None]).expand_as(self.w).contiguous()

    def errors(self, got: torch.Tensor) -> np.ndarray:
        """(E,) error of ``got`` (E, r, c) against the target."""
        diff = (got - self.w).double()
        if self.hessians is None or self.axis is None:
            return (diff * diff).sum(dim=(1, 2)).cpu().numpy()
        h = torch.stack(self.hessians).double()
        prod = torch.bmm(diff, h) * diff if self.axis == 1 else torch.bmm(h, diff) * diff
        return prod.sum(dim=(1, 2)).cpu().numpy() * np.asarray(self.shares)


def stack_values(x: torch.Tensor, width: str, importance: torch.Tensor | None) -> torch.Tensor:
    """What the file restores for each expert's matrix at ``width`` (E, r, c), all experts in one
    call: each is padded to whole super-blocks with zero-weight zeros, which changes no group's
    scale or offset (a padded group has scale 0 and cannot raise its super-block's maximum)."""
    e, per = x.shape[0], x[0].numel()
    block = LAYOUT.group * LAYOUT.super
    if per % block == 0:
        flat_w = None if importance is None else importance.reshape(-1)
        return kq_torch.rtn(x.reshape(-1), width, LAYOUT, flat_w).values.reshape(x.shape)
    padded = -(-per // block) * block
    xs = x.new_zeros(e, padded)
    xs[:, :per] = x.reshape(e, per)
    ws = x.new_zeros(e, padded)
    ws[:, :per] = 1 if importance is None else importance.reshape(e, per)
    return kq_torch.rtn(xs.reshape(-1), width, LAYOUT, ws.reshape(-1)).values.reshape(e, padded)[:, :per] \
        .reshape(x.shape)


def sparse_keep(r: torch.Tensor, density: float, importance: torch.Tensor | None) -> torch.Tensor:
    """Per row of ``r`` (E, n), the ascending flat indices (E, k) of the entries a sparse residual keeps:
    the largest r² (times the importance, with --calibration)."""
    score = r * r if importance is None else r * r * importance
    k = kept(r.shape[1], density)
    return torch.topk(score, k, dim=1, sorted=False).indices.sort(dim=1).values


def lowrank_factors(r: torch.Tensor, label: str, svd: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert of ``r`` (E, rows, cols), the factors U (E, rows, k), V (E, k, cols) of its truncated
    SVD (float32, not yet quantized), the singular values split evenly between them. ``svd``: the
    float64 ``torch.linalg.svd(r, full_matrices=False)`` when the caller already has it."""
    k = rank_of((r.shape[1], r.shape[2]), residual_form(label).rank)
    u, s, vh = svd if svd is not None else torch.linalg.svd(r.double(), full_matrices=False)
    root = s[:, :k].sqrt()
    return (u[:, :, :k] * root[:, None, :]).float(), (root[:, :, None] * vh[:, :k, :]).float()


def whitened_svd(r: torch.Tensor, hessians: list[torch.Tensor], axis: int) -> tuple:
    """Per expert of ``r`` (E, rows, cols) a triple (L, s, R) with r ~= L diag(s) R whose truncations are
    D²-MoE's activation-whitened ones (:mod:`.d2moe`): the SVD of r S (input axis 1) or r^T S (axis 0), S the
    clamped Cholesky factor of the expert's input Gram, mapped back; stacked like ``torch.linalg.svd``'s."""
    from .d2moe import whitening

    ls, ss, rs = [], [], []
    for e in range(r.shape[0]):
        w, w_inv = whitening(hessians[e])
        m = r[e].double() if axis == 1 else r[e].double().T
        u, sig, vh = torch.linalg.svd(m @ w, full_matrices=False)
        vh = vh @ w_inv
        left, right = (u, vh) if axis == 1 else (vh.T, u.T)
        ls.append(left)
        ss.append(sig)
        rs.append(right)
    return torch.stack(ls), torch.stack(ss), torch.stack(rs)


def lowrank_record(r: torch.Tensor, label: str, svd: tuple | None = None) -> tuple[Encoded, torch.Tensor]:
    """One expert's low-rank residual ``r`` (rows, cols) as a lowrank record with k-quant factors, and
    what it restores (decoded by the codec, so exactly what the file gives). ``svd``: a (1, ...)-stacked
    triple as :func:`lowrank_factors` takes (a whitened one for d2moe)."""
    from resmoe_format import codecs

    width = residual_form(label).width
    u, v = lowrank_factors(r[None], label, svd)
    qu = kq_torch.rtn(u[0].reshape(-1), width, LAYOUT)
    qv = kq_torch.rtn(v[0].reshape(-1), width, LAYOUT)
    parts = {**qu.parts(width, LAYOUT, "u"), **qv.parts(width, LAYOUT, "v")}
    rec = Encoded("lowrank", tuple(r.shape), width, parts, {"rank": int(u.shape[2])}, LAYOUT)
    return rec, torch.from_numpy(codecs.decode(rec)).to(r.device)


def residual_values(r: torch.Tensor, label: str, importance: torch.Tensor | None, svd: tuple | None = None
                    ) -> torch.Tensor:
    """What the file restores for residuals ``r`` (E, rows, cols) stored as ``label`` (dense, sparse or
    low rank; ``svd`` as for :func:`lowrank_factors`)."""
    width, density, rank = residual_form(label)
    if rank is not None:
        u, v = lowrank_factors(r, label, svd)
        return torch.bmm(stack_values(u, width, None), stack_values(v, width, None))
    if density is None:
        return stack_values(r, width, importance)
    e = r.shape[0]
    flat = r.reshape(e, -1)
    imp = None if importance is None else importance.reshape(e, -1)
    idx = sparse_keep(flat, density, imp)
    vals = stack_values(flat.gather(1, idx)[:, None, :], width,
                        None if imp is None else imp.gather(1, idx)[:, None, :])[:, 0, :]
    return torch.zeros_like(flat).scatter_(1, idx, vals).reshape(r.shape)


def sparse_record(r: torch.Tensor, label: str, importance: torch.Tensor | None, shape: tuple[int, int]
                  ) -> tuple[Encoded, torch.Tensor]:
    """One expert's sparse residual ``r`` as a bitmap record with k-quant values, and what it restores."""
    width, density, _ = residual_form(label)
    flat = r.reshape(1, -1)
    imp = None if importance is None else importance.reshape(1, -1)
    idx = sparse_keep(flat, density, imp)[0]
    q = kq_torch.rtn(flat[0, idx], width, LAYOUT, None if imp is None else imp[0, idx])
    mask = np.zeros(flat.shape[1], bool)
    mask[idx.cpu().numpy()] = True
    parts = {"mask": np.packbits(mask, bitorder="little"), **q.parts(width, LAYOUT)}
    restored = torch.zeros_like(flat[0]).index_put_((idx,), q.values.reshape(-1)).reshape(r.shape)
    return Encoded("bitmap", shape, width, parts, {"nnz": int(idx.numel())}, LAYOUT), restored


def _mean_importance(imp: torch.Tensor | None) -> torch.Tensor | None:
    return None if imp is None else imp.mean(0)


def base_values(base: torch.Tensor, width: str, imp: torch.Tensor | None) -> kq_torch.Quantized:
    return kq_torch.rtn(base, width, LAYOUT, _mean_importance(imp))


@dataclass
class BitsConverter:
    """Both passes of ``--bits`` for one conversion."""

    use_base: bool
    inputs: dict[int, LayerInputs] | None = None
    kind: Any = None
    device: torch.device = torch.device("cpu")
    max_iter: int = 100
    sparse: bool = False  # measure the sparse residual choices too (--sparse-residuals)
    lowrank: bool = False  # and the low-rank ones (--lowrank-residuals)
    #: d2moe: per layer the Fisher-merged base (from :func:`.fisher.collect`): the base, no permutations,
    #: residuals none or whitened low rank only
    fisher_bases: dict[int, dict[str, torch.Tensor]] | None = None
    _bases: dict[int, tuple[dict[str, torch.Tensor], list[np.ndarray] | None]] = field(default_factory=dict)

    @property
    def d2moe(self) -> bool:
        return self.fisher_bases is not None

    def offers(self, label: str) -> bool:
        """Whether a residual label is among this conversion's choices."""
        f = residual_form(label)
        if self.d2moe:
            return f.rank is not None
        if f.rank is not None:
            return self.lowrank and f.rank in RESMOE_RANKS and f.width in RESMOE_LOWRANK_WIDTHS
        return f.density is None or self.sparse

    def _svd(self, resid: torch.Tensor, t: "Target") -> tuple:
        """The SVD triple low-rank labels truncate: whitened by the experts' input Grams for d2moe (where
        the matrix is 2-D and calibrated), else the plain one."""
        if self.d2moe and t.hessians is not None and t.axis is not None:
            return whitened_svd(resid, t.hessians, t.axis)
        return torch.linalg.svd(resid.double(), full_matrices=False)

    # ---- shared by both passes -------------------------------------------------------
    def _hessians(self, lay, experts: list[dict[str, torch.Tensor]]) -> list[ExpertHessians] | None:
        """Each expert's input Hessians from the recorded calibration inputs (None without --calibration)."""
        if self.inputs is None:
            return None
        return expert_hessians(self.inputs[lay.index], experts, self.kind, self.device)

    def _prepare(self, lay, experts: list[dict[str, torch.Tensor]], dtype: str, with_base: bool,
                 hs: list[ExpertHessians] | None
                 ) -> tuple[dict[str, torch.Tensor] | None, list[np.ndarray] | None, list[Target]]:
        """(base, permutations, targets) of a layer; the base and permutations are computed once
        (first pass) and reused (second pass). ``hs``: the experts' Hessians, in source order."""
        base = perms = None
        if with_base and self.d2moe:
            from .methods import round_to

            base = {m: round_to(t.to(self.device), dtype) for m, t in self.fisher_bases[lay.index].items()}
        elif with_base:
            if lay.index not in self._bases:
                from .budget import Budget
                from .methods import EncoderOptions, ResMoE

                enc = ResMoE(EncoderOptions(Budget(residual_keep=1.0), max_iter=self.max_iter))
                b, p, aligned = enc.base([dict(e) for e in experts], lay.matrices, dtype, None)
                self._bases[lay.index] = (b, p)
            base, perms = self._bases[lay.index]
            experts = [align(e, p, lay.matrices) for e, p in zip(experts, perms)]
        targets = []
        for m in lay.matrices:
            axis = _input_axis(self.kind, m) if hs is not None else None
            hm = None
            if hs is not None and axis is not None:
                hm = [h.hessians[m.name] for h in hs]
                if perms is not None and axis == 0:  # the output matrix's inputs are the (permuted) neurons
                    hm = [h[torch.from_numpy(p)][:, torch.from_numpy(p)] for h, p in zip(hm, perms)]
            w = torch.stack([e[m.name].reshape(shape2d(m)) for e in experts])
            targets.append(Target(m, w, hm, [h.share for h in hs] if hs else [1.0] * len(experts), axis))
        return base, perms, targets

    # ---- pass 1 ----------------------------------------------------------------------
    def analyze(self, lay, experts: list[dict[str, torch.Tensor]]) -> LayerTable:
        """Measured rate–distortion points of one layer."""
        dtype = lay.matrices[0].dtype
        hs = self._hessians(lay, experts)
        plain = self._prepare(lay, experts, dtype, False, hs)[2] if self.use_base and not self.d2moe else None
        base, _, targets = self._prepare(lay, experts, dtype, self.use_base, hs)
        mats = []
        for i, t in enumerate(targets):
            imp = t.importance()
            direct = np.stack([t.errors(stack_values(t.w, w, imp)) for w in DIRECT], axis=1)
            rc = shape2d(t.spec)
            mt = MatrixTable(t.spec.name, np.array([record_bytes(rc, w) for w in DIRECT]), direct)
            if plain is not None:  # without a base the layer keeps the source order: measure that too
                p = plain[i]
                mt.aligned_error, mt.direct_error = direct, np.stack(
                    [p.errors(stack_values(p.w, w, p.importance())) for w in DIRECT], axis=1)
            if base is not None:
                mt.base_bytes = {w: record_bytes(rc, w) for w in BASE}
                mt.residual_bytes = np.array([record_bytes(rc, w) for w in RESIDUAL])
                for bw in BASE:
                    b = base_values(base[t.spec.name].reshape(shape2d(t.spec)), bw, imp).values
                    resid, svd, cols = t.w - b, None, []
                    for rw in RESIDUAL:
                        if rw is not None and not self.offers(rw):
                            cols.append(np.full(t.w.shape[0], np.inf))  # a form the flags do not offer
                            continue
                        if rw is not None and residual_form(rw).rank is not None and svd is None:
                            svd = self._svd(resid, t)  # once for every rank
                        got = b.expand_as(t.w) if rw is None else b + residual_values(resid, rw, imp, svd)
                        cols.append(t.errors(got))
                    mt.residual_error[bw] = np.stack(cols, axis=1)
            mats.append(mt)
        return LayerTable(lay.index, permutation_bytes(lay) if base is not None and not self.d2moe else 0, mats)

    # ---- pass 2 ----------------------------------------------------------------------
    def encode(self, lay, experts: list[dict[str, torch.Tensor]], choice: LayerChoice
               ) -> tuple[MoELayer, dict[str, Any]]:
        """The layer as chosen, and its report: every choice with its measured error."""
        dtype = lay.matrices[0].dtype
        base, perms, targets = self._prepare(lay, experts, dtype, choice.uses_base, self._hessians(lay, experts))
        base_rec: dict[str, Encoded] = {}
        residuals: list[dict[str, Encoded | None]] = [{} for _ in range(lay.num_experts)]
        stats: dict[str, Any] = {}
        for t in targets:
            m, mc = t.spec, choice.matrices[t.spec.name]
            rc = shape2d(m)
            imp = t.importance()
            b_np = None
            b = None
            if choice.uses_base and mc.base is not None:
                q = base_values(base[m.name].reshape(rc), mc.base, imp)
                base_rec[m.name] = Encoded("dense", rc, mc.base, q.parts(mc.base, LAYOUT), {}, LAYOUT)
                b, b_np = q.values, q.values.cpu().numpy()
            elif choice.uses_base:  # no base for this matrix: a rank-0 record stores nothing and decodes to +0.0
                base_rec[m.name] = Encoded("lowrank", rc, "fp32", {"u": np.zeros((rc[0], 0), np.float32),
                                                                    "v": np.zeros((0, rc[1]), np.float32)},
                                           {"rank": 0}, None)
            st = {"shape": list(m.shape), "dtype": m.dtype, "params": 0, "kept": 0, "residual_kept": 0,
                  "bytes": record_bytes(rc, mc.base if choice.uses_base else None), "rel_error": [],
                  "base": mc.base if choice.uses_base else None, "value_dtypes": list(mc.experts)}
            if t.hessians is not None:
                st["output_error"] = []
            truth_all = t.w.cpu().numpy().astype(np.float64)
            for e, width in enumerate(mc.experts):
                target = t.w[e] if b is None else t.w[e] - b
                if width is None:
                    residuals[e][m.name] = None
                    r_np = None
                    got = b
                else:
                    form = residual_form(width)
                    if form.density is not None:
                        rec, r_t = sparse_record(target, width, None if imp is None else imp[e], rc)
                        st["residual_kept"] += rec.params["nnz"]
                    elif form.rank is not None:
                        svd = None
                        if self.d2moe and t.hessians is not None and t.axis is not None:
                            svd = whitened_svd(target[None], [t.hessians[e]], t.axis)
                        rec, r_t = lowrank_record(target, width, svd)
                        st["residual_kept"] += rec.params["rank"] * (rc[0] + rc[1])
                    else:
                        if t.hessians is not None and t.axis is not None:
                            qe = kq_torch.gptq(target, t.hessians[e], t.axis, width, LAYOUT)
                        else:
                            qe = kq_torch.rtn(target, width, LAYOUT)
                        rec, r_t = Encoded("dense", rc, width, qe.parts(width, LAYOUT), {}, LAYOUT), qe.values
                        st["residual_kept"] += values_of(m)
                    residuals[e][m.name] = rec
                    r_np = r_t.cpu().numpy()
                    got = r_t if b is None else b + r_t
                    st["bytes"] += record_bytes(rc, width)
                restored = combine(b_np, r_np, dtype).astype(np.float64)
                truth = truth_all[e]
                norm = float(np.linalg.norm(truth))
                err = float(np.linalg.norm(truth - restored))
                st["rel_error"].append(err / norm if norm else err)
                if t.hessians is not None:
                    st["output_error"].append(float(kq_torch.output_error(got - t.w[e], t.hessians[e], t.axis)
                                                    if t.axis is not None else 0.0))
                st["params"] += values_of(m)
            st["kept"] = st["residual_kept"] + (values_of(m) if choice.uses_base and mc.base else 0)
            stats[m.name] = st
        kind = ("weighted" if self.d2moe else "barycenter") if choice.uses_base else "none"
        layer = MoELayer(lay.index, lay.num_neurons, list(lay.matrices), kind, base_rec, residuals,
                         perms if choice.uses_base else None, list(lay.sources), lay.prefix)
        return layer, stats


def align(expert: dict[str, torch.Tensor], perm: np.ndarray, specs: list[MatrixSpec]) -> dict[str, torch.Tensor]:
    """An expert in aligned order: neuron i of the result is neuron perm[i] of the source."""
    idx = torch.from_numpy(np.asarray(perm, dtype=np.int64))
    return {m.name: (expert[m.name].index_select(0, idx.to(expert[m.name].device)) if m.neuron_axis == 0
                     else expert[m.name]) for m in specs}
