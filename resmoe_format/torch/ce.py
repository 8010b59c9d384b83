"""Compressed experts (spec 4.5 ``compressed_experts``, version 6.0): of a token's top-k routed experts the
k - n_ce with the largest routing weights run in full; the other n_ce ("auxiliary") are not computed. Each
expert e has three learned vectors ce_e = (e1, e2, e3); the auxiliary experts' vectors are averaged with their
routing weights renormalised among them,

    c = sum_a (w_a / sum_a' w_a') ce_a                      (3, L), L = max(hidden, n)

and every main expert m computes, IA3-style, with its own (not renormalised) routing weight w_m:

    y += w_m * down(act(gate(x * c1)) * up(x * c3) * c2[:n])

(for kinds with biases: the input biases are added after the products, the output bias after ``down``).
With every vector equal to one this is the top-k model with the auxiliary experts dropped; with n_ce = 0
it is the full top-k model. :class:`CEExperts` wraps any experts module: transformers' own (materialize
mode, training), :class:`~resmoe_format.torch.experts.LazyExperts` or ``FusedExperts``; only the main
experts' products are ever computed.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import RmoeRuntimeError
from .experts import groups
from .kinds import ExpertKind


def top_k_of(config) -> int | None:
    """The routed experts per token of a transformers config (None when it names none)."""
    for key in ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts"):
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def check_n_ce(config, kind: ExpertKind, n_ce: int, where: str = "n_ce") -> int:
    """The model's top-k, after checking that ``n_ce`` auxiliary experts leave at least one main expert
    and that the kind's experts have the two inputs the vectors scale (RmoeRuntimeError otherwise)."""
    k = top_k_of(config)
    if k is None:
        raise RmoeRuntimeError(f"{where}: the model's config names no routed experts per token "
                               f"(num_experts_per_tok): compressed experts need a top-k MoE")
    if k < 2:
        raise RmoeRuntimeError(f"{where}: the model routes each token to {k} expert; compressed experts replace some "
                               f"of a token's top-k experts and need top-k >= 2")
    if not isinstance(n_ce, int) or isinstance(n_ce, bool) or not 1 <= n_ce < k:
        raise RmoeRuntimeError(f"{where}={n_ce!r}: must be an integer with 1 <= n_ce < top-k = {k} (at least one "
                               f"expert of each token must run in full)")
    if len(kind.inputs) != 2:
        raise RmoeRuntimeError(f"{where}: compressed experts scale a gated expert's two input products (gate, up); "
                               f"{type(kind).__name__} experts have {len(kind.inputs)} input matrix "
                               f"({', '.join(kind.inputs)})")
    return k


def split_routing(index: torch.Tensor, weights: torch.Tensor, n_ce: int, vectors: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(main index (T, k - n_ce), main weights, c (T, 3, L)) from the top-k routing and the vectors (E, 3, L).

    Main experts are the k - n_ce largest weights (ties: the earlier slot); an index equal to E ("no expert",
    weight 0) contributes a vector of ones. When the auxiliary weights of a token sum to zero, c is all ones.
    """
    k = index.shape[1]
    w, order = torch.sort(weights, dim=1, descending=True, stable=True)
    idx = torch.gather(index, 1, order)
    main_idx, aux_idx = idx[:, :k - n_ce], idx[:, k - n_ce:].clamp(max=vectors.shape[0] - 1)
    aux_w = w[:, k - n_ce:].to(vectors.dtype)
    total = aux_w.sum(1, keepdim=True)
    ok = total > 0  # (T, 1); "no expert" slots (index E) have weight 0 and so a share of 0
    share = aux_w / torch.where(ok, total, torch.ones_like(total))
    if n_ce == 1:
        c = vectors[aux_idx[:, 0]]
    else:
        c = torch.einsum("ta,tajl->tjl", share, vectors[aux_idx])
    if not bool(ok.all()):
        c = torch.where(ok[:, :, None], c, torch.ones_like(c))
    return main_idx, w[:, :k - n_ce], c


#: :class:`CEExperts` over a transformers experts module computes a call that routes at most this many
#: (token, expert) pairs token by token (:meth:`CEExperts._run_direct`), above it expert by expert
DIRECT_PAIRS = 16


class CEExperts(nn.Module):
    """An experts module with compressed experts: ``inner`` (any experts module taking (hidden, top-k index,
    top-k weights)) runs the full top-k when ``n_ce`` is 0, else only the main experts, scaled by the
    auxiliary experts' vectors (module docstring). ``vectors`` (E, 3, L) is a parameter (trainable when
    ``trainable``).

    Over a transformers experts module (materialize mode), a call with at most ``direct_pairs`` routed
    (token, expert) pairs (decoding) runs token by token on views of the routed experts' weights, without the
    grouping of tokens by expert and the scatter that pay off for many tokens: the same function, n_ce = 0
    included (then in place of the module's own forward); ``direct_pairs = 0`` turns it off."""

    def __init__(self, inner: nn.Module, kind: ExpertKind, vectors: torch.Tensor, n_ce: int, num_neurons: int,
                 hidden: int, trainable: bool = False, direct_pairs: int = DIRECT_PAIRS):
        super().__init__()
        E = vectors.shape[0]
        if tuple(vectors.shape) != (E, 3, max(hidden, num_neurons)):
            raise RmoeRuntimeError(f"compressed-expert vectors of shape {list(vectors.shape)}; the layer needs "
                                   f"[{E}, 3, {max(hidden, num_neurons)}]")
        self.inner = inner
        self.kind = kind
        self.num_experts = E
        self.n = num_neurons
        self.hidden = hidden
        self.n_ce = n_ce
        self.vectors = nn.Parameter(vectors, requires_grad=trainable)
        self.direct_pairs = direct_pairs
        # resmoe's own modules (LazyExperts, FusedExperts) take the scaled inputs themselves (``_run``)
        self._resmoe_run = getattr(inner, "_run", None)
        self._views: dict[int, dict[str, torch.Tensor]] = {}  # expert -> read_dense's views, while _stamp holds
        self._stamp: tuple = ()

    def extra_repr(self) -> str:
        return f"n_ce={self.n_ce}, num_experts={self.num_experts}, vectors={list(self.vectors.shape)}"

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        kind = self.kind
        x, index, weights = kind.routing(self.num_experts, hidden_states, top_k_index, top_k_weights)
        direct = self._resmoe_run is None and index.shape[0] * (index.shape[1] - self.n_ce) <= self.direct_pairs
        if self.n_ce == 0:
            if not direct:
                return self.inner(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            dt = self._dtype(x)
            xd = x.to(dt)
            pairs, _ = self._route_direct(index, weights, dt)
            return self._run_direct(pairs, [xd] * len(kind.inputs), None).to(hidden_states.dtype)
        if index.shape[1] <= self.n_ce:
            raise RmoeRuntimeError(f"n_ce={self.n_ce} but tokens are routed to {index.shape[1]} experts")
        dt = self._dtype(x)
        if direct:
            pairs, c = self._route_direct(index, weights, dt)
        else:
            main_idx, main_w, c = split_routing(index, weights, self.n_ce, self.vectors)
        c = c.to(dt)
        xd = x.to(dt)
        xg = xd.unsqueeze(1) * c[:, ::2, :self.hidden]  # (T, 2, hidden): x * c1 and x * c3 in one product
        xin = [xg[:, 0], xg[:, 1]]
        hscale = c[:, 1, :self.n]
        if direct:
            out = self._run_direct(pairs, xin, hscale)
        elif self._resmoe_run is not None:  # LazyExperts, FusedExperts
            out = self._resmoe_run(xd, main_idx, main_w, xin=xin, hscale=hscale)
        else:
            out = self._run_dense(main_idx, main_w, xin, hscale, dt)
        return out.to(hidden_states.dtype)

    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        for p in self.inner._parameters.values():  # transformers' stacked experts: the module's own parameters
            if p is not None and p.is_floating_point():
                return p.dtype
        dt = getattr(self.inner, "dtype", None)
        if isinstance(dt, torch.dtype):
            return dt
        p = next((p for p in self.inner.parameters() if p.is_floating_point()), None)
        return p.dtype if p is not None else x.dtype

    def _run_dense(self, index, weights, xin, hscale, dt):
        """The main experts of a transformers experts module, its weights read in place (kind.read_dense)."""
        kind = self.kind
        out = torch.zeros(xin[0].shape[0], self.hidden, dtype=dt, device=xin[0].device)
        for e, rows, slots in groups(index, self.num_experts):
            mats = kind.read_dense(self.inner, e)
            biased = bool(kind.input_biases) and all(b in mats for b in kind.input_biases)
            pre = [nn.functional.linear(xin[i][rows], mats[m], mats[kind.input_biases[i]] if biased else None)
                   for i, m in enumerate(kind.inputs)]
            h = kind.activate(pre) * hscale[rows]
            y = h @ mats[kind.output]
            if biased and kind.output_bias in mats:
                y = y + mats[kind.output_bias]
            out.index_add_(0, rows, y * weights[rows, slots, None].to(dt))
        return out

    def _route_direct(self, index: torch.Tensor, weights: torch.Tensor, dt: torch.dtype):
        """:func:`split_routing` for few tokens, on Python numbers: per token its main (expert, weight in ``dt``)
        pairs, largest weights first (ties: the earlier slot), and c (T, 3, L) (None at n_ce = 0)."""
        E, main = self.num_experts, index.shape[1] - self.n_ce
        idx, w = index.tolist(), weights.tolist()
        wd = weights.to(dt).tolist() if weights.dtype != dt else w
        if self.n_ce == 0:
            return [list(zip(i, ww)) for i, ww in zip(idx, wd)], None
        pairs, cs, vec = [], [], self.vectors
        for i, ww, wwd in zip(idx, w, wd):
            order = sorted(range(len(i)), key=lambda j: -ww[j])  # stable: ties keep the slot order
            pairs.append([(i[j], wwd[j]) for j in order[:main]])
            aux = [(min(i[j], E - 1), ww[j]) for j in order[main:]]  # "no expert" (E) has weight 0: no share
            total = sum(a for _, a in aux)
            if not total > 0:
                cs.append(torch.ones_like(vec[0]))
            elif len(aux) == 1:
                cs.append(vec[aux[0][0]])
            else:
                cs.append(sum(vec[e] * (a / total) for e, a in aux))
        return pairs, torch.stack(cs)

    def _expert_views(self):
        """e -> kind.read_dense(inner, e); without autograd the views are kept for later calls while the module's
        own parameters keep their storage (a dtype or device change, or new parameters, drop them)."""
        if torch.is_grad_enabled() or not self.inner._parameters:
            return lambda e: self.kind.read_dense(self.inner, e)
        stamp = (torch.is_inference_mode_enabled(),) + tuple(
            (id(t), t.data_ptr(), t.dtype, t.device) for t in self.inner._parameters.values() if t is not None)
        if stamp != self._stamp:
            self._views, self._stamp = {}, stamp
        views = self._views

        def get(e: int) -> dict[str, torch.Tensor]:
            v = views.get(e)
            if v is None:
                v = views[e] = self.kind.read_dense(self.inner, e)
            return v

        return get

    def _run_direct(self, pairs: list[list[tuple[int, float]]], xin, hscale):
        """:meth:`_run_dense` (with ``hscale`` None: the module's own top-k) for few tokens: token by token, each
        routed expert's products on views of its weights, the pairs of a token summed: no grouping of tokens by
        expert, no scatter, no copy of weights. A "no expert" index (E) adds nothing."""
        kind, E = self.kind, self.num_experts
        expert = self._expert_views()
        out = []
        for t, routed in enumerate(pairs):
            xs = [v[t:t + 1] for v in xin]
            acc = None
            for e, w in routed:
                if e >= E:
                    continue
                mats = expert(e)
                biased = bool(kind.input_biases) and all(b in mats for b in kind.input_biases)
                h = kind.activate([nn.functional.linear(xs[i], mats[m], mats[kind.input_biases[i]] if biased else None)
                                   for i, m in enumerate(kind.inputs)])
                if hscale is not None:
                    h = h * hscale[t:t + 1]
                y = h @ mats[kind.output]
                if biased and kind.output_bias in mats:
                    y = y + mats[kind.output_bias]
                y = y * w
                acc = y if acc is None else acc + y
            out.append(acc if acc is not None else torch.zeros_like(xs[0]))
        return out[0] if len(out) == 1 else torch.cat(out)


def ce_modules(model: nn.Module) -> list[CEExperts]:
    return [m for m in model.modules() if isinstance(m, CEExperts)]


def set_direct_pairs(model: nn.Module, pairs: int) -> None:
    """The most routed (token, expert) pairs for which every compressed-experts layer of ``model`` runs its
    direct path (0: never; at n_ce = 0 the transformers experts module's own forward)."""
    for m in ce_modules(model):
        m.direct_pairs = pairs


def set_n_ce(model: nn.Module, n_ce: int) -> None:
    """Run every compressed-experts layer of ``model`` with ``n_ce`` auxiliary experts (0: the full top-k)."""
    for m in ce_modules(model):
        m.n_ce = n_ce
