"""Compressed experts modules that take the place of a transformers experts module.

``LazyExperts`` computes as ``FusedExperts`` does, but builds an expert's residual operators from the
mapped file the first time a token is routed to it and keeps them in a byte-bounded cache shared by all
layers (:class:`ExpertCache`: routing-frequency eviction); the barycenter stays resident.

``FusedExperts`` never builds a dense expert. With the aligned expert e = B + D_e:

    pre_m(x, e) = x @ B_m.T + x @ D_{m,e}.T
    y(x)        = sum_e w_e h_e @ B_out + sum_e w_e h_e @ D_{out,e}

The barycenter's share of the input products, ``x @ B_m.T``, is the same for every expert a
token is routed to, so it is computed once per token. The nonlinearity sits between the
matrices, so ``h_e`` is computed per (token, expert); but the output product is linear in h,
so ``sum_e w_e h_e`` is formed first and multiplied by ``B_out`` once per token. Both steps
are exact in real arithmetic (distributivity); in floating point they only reorder sums.
Permutations are never applied: an MLP computes the same function whatever the order of its
hidden neurons, as long as its input rows, biases and output rows move together.

Which weights (spec 6.7): with element-wise residuals the restored ones, final rounding to the
source dtype included (B is held as round_T(B), D as round_T(B + D) - round_T(B) on its stored
entries); with low-rank residuals B + U V, and with residuals of k-quant values B + D, the restored
weight before that rounding (at most half an ulp of the source dtype from it; for fp32 sources the
two are equal).

k-quant records (a dense barycenter, dense, low-rank or sparse residuals) are held packed and
dequantized on the device when a product needs them: the barycenter once per forward call, a
residual once per forward call of an expert some token is routed to.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..container import Reader
from ..errors import RmoeRuntimeError
from ..restore import combine
from ..schema import LayerSpec
from ..codecs import kquant
from . import native
from .kinds import ExpertKind
from .kquant import PackedValues
from .residuals import (SPARSE_ENCODINGS, LowRankResidual, Residual, SparseResidual, StackedRows, as_tensor,
                        held_nbytes, held_values, in_place, linear, load_residual, rlinear, rounded_residual,
                        stored_bf16, unrounded)
from .tensors import TORCH_DTYPES, to_torch


def expert_nbytes(lay: LayerSpec, dtype: torch.dtype) -> int:
    """Bytes of one dense expert of ``lay`` held in ``dtype``."""
    item = torch.empty((), dtype=dtype).element_size()
    return sum(int(np.prod(m.shape)) for m in lay.matrices) * item


def groups(index: torch.Tensor, num_experts: int):
    """(expert, token rows, slot columns) for every expert below ``num_experts`` that some token of ``index``
    (tokens, k) is routed to (an index of ``num_experts`` is "no expert")."""
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1).tolist()
    k = index.shape[1]
    start = 0
    for e, c in enumerate(counts[:num_experts]):
        if c:
            pos = order[start:start + c]
            yield e, pos // k, pos % k
        start += c


class ExpertCache:
    """Experts' operators by (layer, expert), up to ``capacity`` bytes, shared by all layers (lazy mode).

    Eviction follows routing frequency (LFU with aging): every use of an expert counts, every count halves
    each ``halve_every`` uses so that the cache follows a change of text, the resident expert with the lowest
    count goes first, and an expert that is not resident is admitted only when it has been used more often than
    the experts it would evict (TinyLFU's rule). A cache smaller than the experts a text uses thus keeps
    the most used ones and serves the rest from the file, instead of cycling through all of them as an LRU cache
    does when the layers ask for more experts than it holds (a hit rate near zero: thrashing). Between equal counts
    the resident expert stays.
    """

    def __init__(self, capacity: int, halve_every: int = 4096):
        self.capacity, self.halve_every = capacity, halve_every
        self.entries: dict[tuple[int, int], tuple[object, int]] = {}
        self.counts: dict[tuple[int, int], float] = {}
        self.nbytes = 0
        self.hits = self.misses = self.uses = self.not_admitted = 0
        self.build_seconds = 0.0

    def get(self, key: tuple[int, int], build, size: int | None = None, measure=None):
        """The value for ``key``: cached, or ``build()`` (its size ``size``, or ``measure(value)``), kept when the
        rules above admit it."""
        self.uses += 1
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.uses % self.halve_every == 0:
            self.counts = {k: c / 2 for k, c in self.counts.items() if c >= 1 or k in self.entries}
        hit = self.entries.get(key)
        if hit is not None:
            self.hits += 1
            return hit[0]
        self.misses += 1
        t = time.perf_counter()
        value = build()
        self.build_seconds += time.perf_counter() - t
        size = measure(value) if size is None else size
        if size > self.capacity:
            raise RmoeRuntimeError(f"cache_bytes={self.capacity} is smaller than one expert ({size} bytes)")
        free, victims = self.capacity - self.nbytes, []
        if free < size:
            for k in sorted(self.entries, key=lambda k: self.counts.get(k, 0)):
                if self.counts.get(k, 0) >= self.counts[key]:
                    break
                victims.append(k)
                free += self.entries[k][1]
                if free >= size:
                    break
            if free < size:  # used less often than what it would evict: served, not kept
                self.not_admitted += 1
                return value
        for k in victims:
            self.nbytes -= self.entries.pop(k)[1]
        self.entries[key] = (value, size)
        self.nbytes += size
        return value

    @property
    def hit_rate(self) -> float:
        """Hits over uses (0 before any use)."""
        return self.hits / self.uses if self.uses else 0.0

    def stats(self) -> dict:
        """Uses, hits, misses, hit rate, experts not admitted, resident experts and bytes, capacity, and the
        seconds spent building experts from the file."""
        return {"uses": self.uses, "hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate,
                "not_admitted": self.not_admitted, "resident_experts": len(self.entries), "resident_bytes": self.nbytes,
                "capacity_bytes": self.capacity, "build_seconds": self.build_seconds}


class CompressedExperts(nn.Module):
    """Shared routing logic: group (token, slot) pairs by expert and call ``_run``."""

    def __init__(self, kind: ExpertKind, lay: LayerSpec):
        super().__init__()
        self.kind = kind
        self.layer = lay.index
        self.num_experts = lay.num_experts
        names = {m.name for m in lay.matrices}
        missing = [m for m in kind.inputs + (kind.output,) if m not in names]
        if missing:
            raise RmoeRuntimeError(f"layer {lay.index}: the file has no matrices {missing} that "
                                   f"{type(kind).__name__} experts need (it has {sorted(names)})")
        self.biased = all(b in names for b in kind.input_biases) and kind.output_bias in names
        self._perms: dict[int, torch.Tensor] | None = None  # set by subclasses for permuted layers
        self._reader = None

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        x, index, weights = self.kind.routing(self.num_experts, hidden_states, top_k_index, top_k_weights)
        out = self._run(x, index, weights)
        return out.to(hidden_states.dtype)

    def aligned(self, e: int, hscale: torch.Tensor) -> torch.Tensor:
        """``hscale`` (rows, n), indexed by original neuron, in expert ``e``'s aligned order (spec 6.4: aligned
        neuron i is original neuron p[i])."""
        if self._perms is None:
            return hscale
        p = self._perms.get(e)
        if p is None:
            p = self._perms[e] = torch.from_numpy(self._reader.permutation(self.layer, e).astype(np.int64)).to(
                hscale.device)
        return hscale[:, p]

    def groups(self, index: torch.Tensor):
        """(expert, token rows, slot columns) for every expert that some token is routed to."""
        return groups(index, self.num_experts)

    def _run(self, x, index, weights):
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, kind={type(self.kind).__name__}"


class FusedExperts(CompressedExperts):
    """Barycenter products shared across the routed experts plus per-expert residual products."""

    def __init__(self, kind: ExpertKind, reader: Reader, lay: LayerSpec, dtype: torch.dtype, device: torch.device):
        super().__init__(kind, lay)
        self.dtype, self.device = dtype, device
        self.n = n = lay.num_neurons
        self.hidden = lay.matrix(kind.output).shape[-1]
        has_base = lay.adds_base
        mats = kind.inputs + (kind.output,)
        base, held, exact = rounding_bases(reader, lay, kind)
        # a base with pruned channels (spec 4.7) is held and multiplied on its kept channels only
        channels = reader.base_channels(self.layer) if has_base else None
        self.kept = self.kept_cols = None
        if has_base:
            pieces = {m: self._held_base(reader, lay, m, held[m], exact[m]) for m in mats}
            if channels is not None and not any(isinstance(p, PackedValues) for p in pieces.values()):
                self.kept = torch.from_numpy(channels).to(device)
                self.kept_cols = torch.cat([self.kept + i * n for i in range(len(kind.inputs))])
                pieces = {m: p.index_select(0, self.kept) for m, p in pieces.items()}
            inputs = [pieces[m] for m in kind.inputs]
            self.base_in = (StackedRows(inputs) if any(isinstance(p, PackedValues) for p in inputs)
                            else torch.cat(inputs))
            self.base_out = pieces[kind.output]
        else:
            self.base_in = self.base_out = None
        # bf16 on the CPU: the output barycenter held transposed (the same bytes), so that its product is the
        # kernels' one pass over rows (native.dense_bf16_linear); base_out stays a view of it
        self.base_out_t = None
        if (isinstance(self.base_out, torch.Tensor) and dtype == torch.bfloat16 and torch.device(device).type == "cpu"
                and native.uses_dpbf16()):
            self.base_out_t = self.base_out.T.contiguous()
            self.base_out = self.base_out_t.T
        if lay.permutations is not None:  # compressed experts' e2 is in original neuron order (CEExperts)
            self._perms = {e: torch.from_numpy(reader.permutation(self.layer, e).astype(np.int64)).to(device)
                           for e in range(lay.num_experts)}
        self._shared: dict[str, object] = {}
        self._base, self._held = base, held
        # per expert: [(first column, last column, operator)] over the concatenated pre-activations
        self.in_ops: list[list[tuple[int, int, Residual]]] = []
        self.out_ops: list[Residual | None] = []
        if self.eager:
            for e in range(lay.num_experts):
                ops, out = self._load_expert(reader, lay, e)
                self.in_ops.append(ops)
                self.out_ops.append(out)
                reader.release()
        self._base = self._held = None  # only the records' loading needed the decoded barycenter (lazy: _base_held)
        if self.biased:
            def bias(name: str, e: int) -> np.ndarray:
                return combine(reader.base(self.layer, name) if has_base else None,
                               reader.residual(self.layer, e, name), lay.matrix(name).dtype).reshape(-1)

            E = range(lay.num_experts)
            self.bias_in = to_torch(np.stack([np.concatenate([bias(b, e) for b in kind.input_biases]) for e in E]),
                                  dtype, device)
            self.bias_out = to_torch(np.stack([bias(kind.output_bias, e) for e in E]), dtype, device)

    #: whether every expert's operators are built at load (FusedExperts) or on first use (LazyExperts)
    eager = True

    def _load_expert(self, reader: Reader, lay: LayerSpec, e: int) -> tuple[list[tuple[int, int, Residual]],
                                                                             Residual | None]:
        """Expert ``e``'s operators: [(first column, last column, operator)] over the concatenated pre-activations,
        and the output's (None: no residual)."""
        kind, n, device, dtype, shared = self.kind, self.n, self.device, self.dtype, self._shared
        base, held = self._base_held(reader, lay)
        refs = [lay.residuals[e][m] for m in kind.inputs]
        if len(refs) > 1 and all(r is not None and r.encoding in SPARSE_ENCODINGS and not in_place(r, device) and
                                 not kquant.is_kquant(r.value_dtype) for r in refs):
            # one sparse operator over all input matrices: one product per expert instead of one per matrix
            stacked = np.concatenate([self._sparse(reader, lay, e, m, r, base, held)
                                      for m, r in zip(kind.inputs, refs)])
            ops = [(0, len(refs) * n, SparseResidual.from_dense(stacked, device, held_values(refs)))]
        else:
            ops = [(i * n, (i + 1) * n, load_residual(reader, lay, r, m, False, dtype, device, shared,
                                                      base.get(m), held.get(m)))
                   for i, (m, r) in enumerate(zip(kind.inputs, refs)) if r is not None]
        ref = lay.residuals[e][kind.output]
        out = None if ref is None else load_residual(reader, lay, ref, kind.output, True, dtype, device, shared,
                                                     base.get(kind.output), held.get(kind.output))
        if self.base_in is None and (out is None or sum(b - a for a, b, _ in ops) < len(refs) * n):
            raise RmoeRuntimeError(f"layer {lay.index}: expert {e} has a matrix with neither base nor residual")
        return ops, out

    def _base_held(self, reader: Reader, lay: LayerSpec) -> tuple[dict, dict]:
        """(decoded barycenter, barycenter multiplied by) per matrix, for rounding element-wise records."""
        return self._base, self._held

    def _ops(self, e: int) -> tuple[list[tuple[int, int, Residual]], Residual | None]:
        """Expert ``e``'s operators (:meth:`_load_expert`)."""
        return self.in_ops[e], self.out_ops[e]

    def _sparse(self, reader: Reader, lay: LayerSpec, e: int, m: str, ref, base: dict, held: dict) -> np.ndarray:
        """Expert ``e``'s sparse residual of ``m`` as held: stored bf16 values as they are, others rounded
        (:func:`.residuals.rounded_residual`)."""
        d = reader.residual(self.layer, e, m)
        return d if stored_bf16(ref) else rounded_residual(d, base.get(m), held.get(m), lay.matrix(m).dtype)

    def _held_base(self, reader: Reader, lay: LayerSpec, m: str, held: np.ndarray, exact: bool
                   ) -> torch.Tensor | PackedValues:
        """Matrix ``m``'s barycenter as held: a dense k-quant base stays packed (rounded to the source dtype
        on use where ``exact``), any other one is ``held`` as a tensor."""
        ref, spec = lay.base[m], lay.matrix(m)
        if ref.encoding != "dense" or not kquant.is_kquant(ref.value_dtype):
            return to_torch(held, self.dtype, self.device)
        round_to = TORCH_DTYPES[spec.dtype] if exact and spec.dtype != "fp32" else None
        return PackedValues.from_parts(reader.encoded(ref, spec).parts, "values", spec.shape2d, ref.value_dtype,
                                       ref.quant, self.device, ref.tensors, self.dtype, round_to)

    def weights(self, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s matrices (canonical shapes, aligned order) as this layer multiplies by them
        (spec 6.7): its own products applied to identity matrices, for checks."""
        kind, n, M = self.kind, self.n, len(self.kind.inputs)
        eye = torch.eye(self.hidden, dtype=self.dtype, device=self.device)
        pre = eye.new_zeros(self.hidden, M * n)
        out = eye.new_zeros(n, self.hidden)
        if self.base_in is not None:
            cols = self.kept_cols if self.kept is not None else slice(None)
            rows = self.kept if self.kept is not None else slice(None)
            pre[:, cols] = as_tensor(self.base_in).T
            out[rows] = as_tensor(self.base_out)
        in_ops, out_op = self._ops(e)
        for a, b, op in in_ops:
            pre[:, a:b] += op.apply_in(eye)
        if out_op is not None:
            out += out_op.apply_out(torch.eye(n, dtype=self.dtype, device=self.device))
        mats = {m: pre[:, i * n:(i + 1) * n].T for i, m in enumerate(kind.inputs)} | {kind.output: out}
        if self.biased:
            mats |= dict(zip(kind.input_biases, self.bias_in[e].reshape(M, n))) | {kind.output_bias: self.bias_out[e]}
        return mats

    def nbytes(self) -> int:
        """Bytes this layer holds in memory (barycenter, residual operators, biases)."""
        held = [self.base_in, self.base_out] + ([self.bias_in, self.bias_out] if self.biased else [])
        total = sum(held_nbytes(t) for t in held if t is not None)
        total += sum(op.nbytes() for ops in self.in_ops for _, _, op in ops)
        return total + sum(op.nbytes() for op in self.out_ops if op is not None)

    def _run(self, x, index, weights, xin=None, hscale=None):
        """``xin``: one input per input matrix instead of ``x`` (compressed experts, :mod:`.ce`), and ``hscale``
        (T, n) multiplies the activations; the residual products then run once per input."""
        kind, n, dt = self.kind, self.n, self.dtype
        xd = x.to(dt)
        T, width = x.shape[0], len(kind.inputs) * n
        if xin is not None:
            return self._run_scaled(xd, index, weights, [t.to(dt) for t in xin], hscale.to(dt))
        shared_in = None
        if self.base_in is not None:
            shared_in = (native.dense_bf16_linear(xd, self.base_in) if isinstance(self.base_in, torch.Tensor)
                         else linear(xd, self.base_in))
        hsum = torch.zeros(T, n, dtype=dt, device=x.device) if self.base_out is not None else None
        out = torch.zeros(T, x.shape[1], dtype=dt, device=x.device)
        xv: dict[int, torch.Tensor] = {}
        for e, rows, slots in self.groups(index):
            xe = xd[rows]
            if shared_in is None or self.kept is not None:
                pre = torch.zeros(len(rows), width, dtype=dt, device=x.device)
                if shared_in is not None:
                    pre[:, self.kept_cols] = shared_in[rows]
            else:
                pre = shared_in[rows]
            in_ops, out_op = self._ops(e)
            for a, b, op in in_ops:
                if isinstance(op, LowRankResidual) and op.v_shared_across:
                    # a V shared by the layer's experts (spec 4.8): x V^T once for all tokens, then U per expert
                    key = id(op.v)
                    if key not in xv:
                        xv[key] = linear(xd, op.v)
                    pre[:, a:b] += linear(xv[key][rows], op.u)
                else:
                    pre[:, a:b] += op.apply_in(xe)
            self._add_expert(e, out_op, rows, slots, pre, weights, hsum, out)
        return self._finish(out, hsum)

    def _add_expert(self, e: int, out_op: Residual | None, rows, slots, pre: torch.Tensor, weights, hsum, out,
                    scale=None) -> None:
        """Expert ``e``'s output from its pre-activations ``pre`` (rows of ``rows``): biases, activation (times
        ``scale``, compressed experts), routing weight; the residual's and the bias's share into ``out``, the
        barycenter's into ``hsum``."""
        n = self.n
        if self.biased:
            pre += self.bias_in[e]
        w = weights[rows, slots, None].to(self.dtype)
        h = self.kind.activate([pre[:, i * n:(i + 1) * n] for i in range(len(self.kind.inputs))])
        hw = (h if scale is None else h * scale) * w
        if hsum is not None:
            hsum.index_add_(0, rows, hw)
        y = out_op.apply_out(hw) if out_op is not None else None
        if self.biased:
            y = self.bias_out[e] * w if y is None else y + self.bias_out[e] * w
        if y is not None:
            out.index_add_(0, rows, y)

    def _finish(self, out: torch.Tensor, hsum) -> torch.Tensor:
        """``out`` plus the barycenter's output product, once for all experts (module docstring)."""
        if hsum is not None:
            h = hsum if self.kept is None else hsum[:, self.kept]
            out += (native.dense_bf16_linear(h, self.base_out_t) if self.base_out_t is not None
                    else rlinear(h, self.base_out))
        return out

    def _run_scaled(self, xd, index, weights, xin, hscale):
        """:meth:`_run` with input ``xin[i]`` for input matrix i and activations scaled by ``hscale``."""
        kind, n, dt = self.kind, self.n, self.dtype
        T, M = xd.shape[0], len(kind.inputs)
        width = M * n
        shared_in = None
        if self.base_in is not None:
            base = as_tensor(self.base_in)
            rows_per = base.shape[0] // M  # n, or the kept channels of a pruned base
            shared_in = torch.cat([nn.functional.linear(xin[i], base[i * rows_per:(i + 1) * rows_per])
                                   for i in range(M)], dim=1)
        hsum = torch.zeros(T, n, dtype=dt, device=xd.device) if self.base_out is not None else None
        out = torch.zeros(T, xd.shape[1], dtype=dt, device=xd.device)
        for e, rows, slots in self.groups(index):
            xs = [t[rows] for t in xin]
            if shared_in is None or self.kept is not None:
                pre = torch.zeros(len(rows), width, dtype=dt, device=xd.device)
                if shared_in is not None:
                    pre[:, self.kept_cols] = shared_in[rows]
            else:
                pre = shared_in[rows].clone()
            in_ops, out_op = self._ops(e)
            for a, b, op in in_ops:
                for i in range(M):  # the columns of input i within [a, b): from input i
                    lo, hi = max(a, i * n), min(b, (i + 1) * n)
                    if lo >= hi:
                        continue
                    if b - a == hi - lo:
                        pre[:, lo:hi] += op.apply_in(xs[i])
                    else:  # an operator over several inputs' columns (one CSR for all)
                        pre[:, lo:hi] += op.apply_in(xs[i])[:, lo - a:hi - a]
            self._add_expert(e, out_op, rows, slots, pre, weights, hsum, out, self.aligned(e, hscale[rows]))
        return self._finish(out, hsum)


class LazyExperts(FusedExperts):
    """Expert offloading: the barycenter is resident as in fused mode; each expert's residual operators (their
    compressed in-memory form; bitmap records of bf16 values are the mapped file's own bytes) are built from the
    mapped file the first time a token is routed to the expert, into an :class:`ExpertCache` shared by all layers.
    Computes exactly what :class:`FusedExperts` computes."""

    eager = False

    def __init__(self, kind: ExpertKind, reader: Reader, lay: LayerSpec, cache: ExpertCache, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(kind, reader, lay, dtype, device)
        self.reader, self.lay, self.cache = reader, lay, cache
        # element-wise records whose values are rounded against the barycenter (rounded_residual) need it decoded
        # on a miss; biases are not built on use (FusedExperts.__init__ holds them)
        self._rounds = any(r is not None and not unrounded(r) for res in lay.residuals
                           for m, r in res.items() if m in kind.inputs + (kind.output,))
        self.expert_bytes = max((expert_file_bytes(reader, lay, e) for e in range(lay.num_experts)), default=0)

    def _base_held(self, reader: Reader, lay: LayerSpec) -> tuple[dict, dict]:
        if not self._rounds or not lay.adds_base:
            return {}, {}
        return rounding_bases(reader, lay, self.kind)[:2]

    def _ops(self, e: int):
        return self.cache.get((self.layer, e), lambda: self._load_expert(self.reader, self.lay, e),
                              measure=ops_nbytes)

    def nbytes(self) -> int:
        """Bytes the barycenter and biases hold (the experts are in the cache: ``cache.nbytes``)."""
        held = [self.base_in, self.base_out] + ([self.bias_in, self.bias_out] if self.biased else [])
        return sum(held_nbytes(t) for t in held if t is not None)


def ops_nbytes(ops) -> int:
    """Bytes one expert's operators hold (:meth:`FusedExperts._load_expert`)."""
    in_ops, out = ops
    return sum(op.nbytes() for _, _, op in in_ops) + (out.nbytes() if out is not None else 0)


def expert_file_bytes(reader: Reader, lay: LayerSpec, e: int) -> int:
    """Bytes of expert ``e``'s residual records in the file (what lazy mode builds from them, about)."""
    return sum(reader.tensor(t).nbytes for r in lay.residuals[e].values() if r is not None for t in r.tensors.values())


def rounding_bases(reader: Reader, lay: LayerSpec, kind: ExpertKind) -> tuple[dict, dict, dict]:
    """(B, the barycenter multiplied by, exact) per matrix: B' = round_T(B) for a matrix whose records are all
    element-wise (``exact``), so that B' + D' is the restored weight (residuals.rounded_residual); B for one with a
    low-rank, k-quant or stored bf16 record (B + D unrounded, spec 6.7)."""
    mats = kind.inputs + (kind.output,)
    base = {m: reader.base(lay.index, m) for m in mats} if lay.adds_base else {}
    exact = {m: not any(r.get(m) is not None and unrounded(r[m]) for r in lay.residuals) for m in mats}
    held = {m: combine(b, None, lay.matrix(m).dtype).astype(np.float32) if exact[m] else b for m, b in base.items()}
    return base, held, exact
