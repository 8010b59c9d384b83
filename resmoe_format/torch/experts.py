"""Compressed experts modules that take the place of a transformers experts module.

``LazyExperts`` restores an expert (barycenter + residual, in aligned neuron order) the first
time a token is routed to it and keeps it in a byte-bounded LRU cache shared by all layers.

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

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from ..container import Reader
from ..errors import RmoeRuntimeError
from ..memory import trim_heap
from ..restore import combine, restore_expert
from ..schema import LayerSpec
from ..codecs import kquant
from . import native
from .kinds import ExpertKind
from .kquant import PackedValues
from .residuals import (SPARSE_ENCODINGS, LowRankResidual, Residual, SparseResidual, StackedRows, as_tensor,
                        held_nbytes, held_values, in_place, load_residual, rounded_residual, stored_bf16,
                        unrounded)
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
    """An LRU cache of dense experts keyed by (layer, expert), bounded by bytes."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[tuple[int, int], tuple[dict[str, torch.Tensor], int]] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def get(self, key: tuple[int, int], build, size: int) -> dict[str, torch.Tensor]:
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            self.hits += 1
            return hit[0]
        self.misses += 1
        if size > self.capacity:
            raise RmoeRuntimeError(f"cache_bytes={self.capacity} is smaller than one expert ({size} bytes)")
        while self.nbytes + size > self.capacity:
            _, (_, s) = self.entries.popitem(last=False)
            self.nbytes -= s
        mats = build()
        self.entries[key] = (mats, size)
        self.nbytes += size
        return mats


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


class LazyExperts(CompressedExperts):
    """Dense experts restored on first use into a shared LRU cache; the file stays mapped."""

    def __init__(self, kind: ExpertKind, reader: Reader, lay: LayerSpec, cache: ExpertCache,
                 dtype: torch.dtype, device: torch.device):
        super().__init__(kind, lay)
        self.reader, self.lay, self.cache = reader, lay, cache
        if lay.permutations is not None:
            self._perms, self._reader = {}, reader
        self.dtype, self.device = dtype, device
        self.expert_bytes = expert_nbytes(lay, dtype)

    def restore(self, e: int) -> dict[str, torch.Tensor]:
        """Expert e's matrices in aligned order: cast(B + D_e) per the spec, then to the runtime dtype."""
        out = {m: to_torch(w, self.dtype, self.device) for m, w in restore_expert(self.reader, self.layer, e).items()}
        self.reader.release()
        trim_heap()  # the decode temporaries are as large as the expert: give them back
        return out

    def _run(self, x, index, weights, xin=None, hscale=None):
        """``xin``: one input per input matrix instead of ``x`` (compressed experts, :mod:`.ce`), and ``hscale``
        (T, n) multiplies the activations."""
        kind = self.kind
        out = torch.zeros(x.shape[0], x.shape[1], dtype=self.dtype, device=x.device)
        xd = x.to(self.dtype)
        for e, rows, slots in self.groups(index):
            w = self.cache.get((self.layer, e), lambda e=e: self.restore(e), self.expert_bytes)
            xs = [xd[rows]] * len(kind.inputs) if xin is None else [t[rows] for t in xin]
            pre = [nn.functional.linear(xe, w[m], w[b] if self.biased else None)
                   for xe, m, b in zip(xs, kind.inputs, kind.input_biases or (None,) * len(kind.inputs))]
            h = kind.activate(pre)
            if hscale is not None:
                h = h * self.aligned(e, hscale[rows])
            y = h @ w[kind.output]
            if self.biased:
                y = y + w[kind.output_bias]
            out.index_add_(0, rows, y * weights[rows, slots, None].to(self.dtype))
        return out


class FusedExperts(CompressedExperts):
    """Barycenter products shared across the routed experts plus per-expert residual products."""

    def __init__(self, kind: ExpertKind, reader: Reader, lay: LayerSpec, dtype: torch.dtype, device: torch.device):
        super().__init__(kind, lay)
        self.dtype, self.device = dtype, device
        self.n = n = lay.num_neurons
        self.hidden = lay.matrix(kind.output).shape[-1]
        has_base = lay.adds_base
        mats = kind.inputs + (kind.output,)
        # B' = round_T(B) is the barycenter held, so that B' + D' of element-wise residuals is the restored
        # weight (residuals.rounded_residual); a matrix with low-rank or k-quant residuals keeps B (B + D unrounded)
        base = {m: reader.base(self.layer, m) for m in mats} if has_base else {}
        exact = {m: not any(r.get(m) is not None and unrounded(r[m]) for r in lay.residuals) for m in mats}
        held = {m: combine(b, None, lay.matrix(m).dtype).astype(np.float32) if exact[m] else b
                for m, b in base.items()}
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
        shared: dict[str, object] = {}
        # per expert: [(first column, last column, operator)] over the concatenated pre-activations
        self.in_ops: list[list[tuple[int, int, Residual]]] = []
        self.out_ops: list[Residual | None] = []
        for e in range(lay.num_experts):
            refs = [lay.residuals[e][m] for m in kind.inputs]
            if len(refs) > 1 and all(r is not None and r.encoding in SPARSE_ENCODINGS and not in_place(r, device) and
                                     (stored_bf16(r) or not unrounded(r)) for r in refs):
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
            if not has_base and (out is None or sum(b - a for a, b, _ in ops) < len(refs) * n):
                raise RmoeRuntimeError(f"layer {lay.index}: expert {e} has a matrix with neither base nor residual")
            self.in_ops.append(ops)
            self.out_ops.append(out)
            reader.release()
        if self.biased:
            def bias(name: str, e: int) -> np.ndarray:
                return combine(reader.base(self.layer, name) if has_base else None,
                               reader.residual(self.layer, e, name), lay.matrix(name).dtype).reshape(-1)

            E = range(lay.num_experts)
            self.bias_in = to_torch(np.stack([np.concatenate([bias(b, e) for b in kind.input_biases]) for e in E]),
                                  dtype, device)
            self.bias_out = to_torch(np.stack([bias(kind.output_bias, e) for e in E]), dtype, device)

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
        for a, b, op in self.in_ops[e]:
            pre[:, a:b] += op.apply_in(eye)
        if self.out_ops[e] is not None:
            out += self.out_ops[e].apply_out(torch.eye(n, dtype=self.dtype, device=self.device))
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
        shared_in = native.dense_bf16_linear(xd, as_tensor(self.base_in)) if self.base_in is not None else None
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
            for a, b, op in self.in_ops[e]:
                if isinstance(op, LowRankResidual) and op.v_shared_across:
                    # a V shared by the layer's experts (spec 4.8): x V^T once for all tokens, then U per expert
                    key = id(op.v)
                    if key not in xv:
                        xv[key] = xd @ as_tensor(op.v).T
                    pre[:, a:b] += xv[key][rows] @ as_tensor(op.u).T
                else:
                    pre[:, a:b] += op.apply_in(xe)
            self._add_expert(e, rows, slots, pre, weights, hsum, out)
        return self._finish(out, hsum)

    def _add_expert(self, e: int, rows, slots, pre: torch.Tensor, weights, hsum, out, scale=None) -> None:
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
        y = self.out_ops[e].apply_out(hw) if self.out_ops[e] is not None else None
        if self.biased:
            y = self.bias_out[e] * w if y is None else y + self.bias_out[e] * w
        if y is not None:
            out.index_add_(0, rows, y)

    def _finish(self, out: torch.Tensor, hsum) -> torch.Tensor:
        """``out`` plus the barycenter's output product, once for all experts (module docstring)."""
        if hsum is not None:
            h = hsum if self.kept is None else hsum[:, self.kept]
            out += (native.dense_bf16_linear(h, self.base_out_t) if self.base_out_t is not None
                    else h @ as_tensor(self.base_out))
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
            for a, b, op in self.in_ops[e]:
                for i in range(M):  # the columns of input i within [a, b): from input i
                    lo, hi = max(a, i * n), min(b, (i + 1) * n)
                    if lo >= hi:
                        continue
                    if b - a == hi - lo:
                        pre[:, lo:hi] += op.apply_in(xs[i])
                    else:  # an operator over several inputs' columns (one CSR for all)
                        pre[:, lo:hi] += op.apply_in(xs[i])[:, lo - a:hi - a]
            self._add_expert(e, rows, slots, pre, weights, hsum, out, self.aligned(e, hscale[rows]))
        return self._finish(out, hsum)
