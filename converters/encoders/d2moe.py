"""D²-MoE: a Fisher-weighted base per layer and each expert's delta as an activation-whitened low-rank product.

For an expert matrix that maps inputs X (rows: that expert's routed calibration tokens) the delta
D = W_j - W_base is compressed as SVD-LLM does: S = Cholesky factor of X^T X (float64, eigenvalues
lifted by 1e-5 of their mean), D S = U Sigma V^T, and D ~= (U_r Sigma_r^1/2)(Sigma_r^1/2 V_r^T S^-1): the
truncation keeps the directions that matter for the outputs ||D X^T|| rather than for ||D||.
At full rank the product is D.

Orientation: matrices are canonical (neuron axis first, spec 4.14). An input matrix (gate, up) is (n, H)
and maps x (H) to n, so its input axis is 1; the output matrix (down) is stored (n, H) transposed and maps
h (n) to H, so its input axis is 0 and the whitening acts on the other side.

``--share-v``: one input-side factor per matrix for all experts of the layer (the reference's shared V),
from one SVD of the experts' stacked whitened deltas; the whitening is the routing-frequency weighted mean
of the experts' X^T X. In the file the shared factor is ``v`` of an input matrix and ``u`` of the output
matrix (spec 4.8).
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np
import torch

from resmoe_format import MatrixSpec

from ..errors import ConversionError
from .methods import Encoder, register
from .parts import LowRankPart, SparsePart

#: channels are pruned from the base in multiples of this, where the layer has at least twice as many
PRUNE_MULTIPLE = 64
#: the per-batch probe looks at this fraction of each calibration window's tokens, those of largest norm
PROBE_FRACTION = 0.1
#: X^T X gets this fraction of its mean eigenvalue added to the diagonal before the Cholesky factor
CLAMP = 1e-5


def whitening(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with S S^T = X^T X + floor I, floor = CLAMP times the mean eigenvalue (float64, S lower
    triangular): every eigenvalue is lifted to at least the floor. The identity for a zero Gram (an expert no
    calibration token reached: its SVD is not whitened)."""
    g = h.double()
    g = (g + g.T) / 2
    n = g.shape[0]
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    mean = float(torch.diagonal(g).sum()) / n  # the mean eigenvalue, without an eigendecomposition
    if not mean > 0:
        return eye, eye
    floor = mean * CLAMP
    s, info = torch.linalg.cholesky_ex(g + floor * eye)
    if int(info) != 0:  # rounding left it indefinite: clamp the eigenvalues themselves (slow, exact)
        lam, q = torch.linalg.eigh(g)
        hc = (q * (lam.clamp(min=0) + floor)) @ q.T
        s = torch.linalg.cholesky((hc + hc.T) / 2)
    s_inv = torch.linalg.solve_triangular(s, eye, upper=False)
    return s, s_inv


def _factors(m: torch.Tensor, s: torch.Tensor, s_inv: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P (out, r), Q (r, in) with P Q ~= m (out, in) truncated in the whitened space of S."""
    u, sig, vt = torch.linalg.svd(m.double() @ s, full_matrices=False)
    root = sig[:rank].sqrt()
    return u[:, :rank] * root, (root[:, None] * vt[:rank]) @ s_inv


def whitened_svd(delta: torch.Tensor, hessian: torch.Tensor, rank: int, input_axis: int,
                  white: tuple[torch.Tensor, torch.Tensor] | None = None) -> LowRankPart:
    """``delta`` (canonical) ~= u @ v at ``rank``, truncated for the outputs of inputs with Gram ``hessian``
    (``white``: its :func:`whitening`, when the caller has it)."""
    s, s_inv = white if white is not None else whitening(hessian)
    if input_axis == 1:
        p, q = _factors(delta, s, s_inv, rank)
        return LowRankPart(p.float(), q.float())
    p, q = _factors(delta.T, s, s_inv, rank)
    return LowRankPart(q.T.float().contiguous(), p.T.float().contiguous())


def shared_whitened_svd(deltas: list[torch.Tensor], hessian: torch.Tensor, rank: int, input_axis: int
                        ) -> list[LowRankPart]:
    """One SVD of the stacked whitened deltas: per expert its own output-side factor, one shared input-side
    factor (the same tensor object in every part)."""
    s, s_inv = whitening(hessian)
    maps = [d if input_axis == 1 else d.T for d in deltas]
    p, q = _factors(torch.cat(maps), s, s_inv, rank)
    rows = maps[0].shape[0]
    shared = q.float().contiguous() if input_axis == 1 else q.T.float().contiguous()
    out = []
    for j in range(len(deltas)):
        own = p[j * rows:(j + 1) * rows].float()
        out.append(LowRankPart(own.contiguous(), shared, shared_across="v") if input_axis == 1
                   else LowRankPart(shared, own.T.contiguous(), shared_across="u"))
    return out


def matrix_ranks(specs: list[MatrixSpec], budget: int, num_experts: int, share_v: bool,
                 output: str | None = None) -> dict[str, int]:
    """Each 2-D matrix's rank under ``budget`` parameters per expert (biases first, kept whole), the budget
    split in proportion to the matrices' sizes; with ``share_v`` a shared factor costs 1/E per expert. The
    shared factor is on the input side of the map: (r, cols) of a canonical (rows, cols) input matrix, but
    (rows, r) of the ``output`` matrix, whose canonical form is its map transposed."""
    mats = [m for m in specs if len(m.shape) == 2]
    left = budget - sum(m.shape[0] for m in specs if len(m.shape) == 1)
    size = sum(m.shape[0] * m.shape[1] for m in mats)
    ranks = {}
    for m in mats:
        rows, cols = m.shape
        share = max(0, left) * rows * cols / size
        if share_v:
            own, shared = (cols, rows) if m.name == output else (rows, cols)
            # per expert: own x r of its own, plus 1/E of the shared x r
            r = math.floor(num_experts * share / (num_experts * own + shared))
            ranks[m.name] = min(r, rows, cols)  # the format's bound (spec 5.3): a factor's rank is at most min(m, n)
        else:
            ranks[m.name] = min(math.floor(share / (rows + cols)), min(rows, cols))
    return ranks


def pruned_count(n: int, fraction: float) -> int:
    """How many of ``n`` base channels ``--prune-base fraction`` removes: floor(fraction n), in multiples of
    PRUNE_MULTIPLE where n allows, at most n - 1."""
    k = math.floor(fraction * n + 1e-9)
    if n >= 2 * PRUNE_MULTIPLE and k >= PRUNE_MULTIPLE:
        k = k // PRUNE_MULTIPLE * PRUNE_MULTIPLE
    return min(k, n - 1)


def channel_scores(x: torch.Tensor, base: dict[str, torch.Tensor], kind, window: int) -> torch.Tensor:
    """Importance of each of the base's intermediate channels (higher: keep), semi-dynamic as D²-MoE scores them.

    h = act(x B_in^T) are the base's intermediate activations on every calibration token the layer saw. The
    static statistic is mean(h_c^2) over all tokens; each window (a batch) adds a probe, mean(h_c^2) over its
    PROBE_FRACTION tokens of largest norm, and the two mix as the reference's ``dynaratio`` does:
    (s^2 + p^2) / (s + p). A channel scores sqrt of that, averaged over the windows, times the L1 norm of its
    row of the output matrix (Wanda-style: activation size times the weights it feeds)."""
    x = x.double()
    h2 = kind.intermediate(x, base).square()
    static = h2.mean(0)
    norms = x.norm(dim=1)
    total = torch.zeros_like(static)
    windows = 0
    for start in range(0, x.shape[0], window):
        rows = slice(start, start + window)
        k = max(1, math.ceil(PROBE_FRACTION * h2[rows].shape[0]))
        probe = h2[rows][norms[rows].topk(k).indices].mean(0)
        mixed = (static.square() + probe.square()) / (static + probe).clamp(min=1e-30)
        total += mixed.sqrt()
        windows += 1
    return total / windows * base[kind.output].double().abs().sum(1)


@dataclass
class D2Stats:
    """One layer's calibration: Fisher-merged base, routing frequencies, per-expert input Grams."""

    base: dict[str, torch.Tensor]
    freq: np.ndarray
    hessians: ExpertGrams  # hessians[k][matrix]: the Gram of expert k's matrix's input
    output: str  # the output matrix's name (its input axis is 0)


@register
class D2MoE(Encoder):
    """Fisher-weighted base (no permutations), whitened low-rank deltas (``--method d2moe``).

    The base and Hessians come from calibration (:mod:`.fisher`); the driver sets :attr:`stats` before
    each layer's :meth:`encode`."""

    name = "d2moe"
    base_kind = "weighted"
    supports_lossless = False
    residual_kind = "svd"
    share_v = False
    #: --prune-base: the fraction of the base's channels removed (None: none)
    prune_base: float | None = None
    stats: D2Stats | None = None

    def base_params(self, specs: list[MatrixSpec]) -> int:
        n = next((m.shape[m.neuron_axis] for m in specs if m.neuron_axis is not None), 0)
        kept = n - pruned_count(n, self.prune_base) if self.prune_base and n else n
        return sum(int(np.prod(m.kept(kept).shape)) for m in specs)

    def check_layer(self, specs: list[MatrixSpec], num_experts: int) -> None:
        super().check_layer(specs, num_experts)
        if self.options.rank is not None:
            return
        budget = self.residual_budget(specs, num_experts)
        if not any(matrix_ranks(specs, budget, num_experts, self.share_v).values()):
            raise ConversionError(f"{self.options.budget.flag()} leaves each expert {budget} parameters after the "
                                  f"base: not rank 1 of any delta (matrices "
                                  f"{', '.join(f'{m.name} {m.shape}' for m in specs)}); raise it")

    def encode(self, experts, specs, dtype, progress=None):
        from .methods import round_to
        from .parts import LayerResult

        stats = self.stats
        base = {m.name: round_to(stats.base[m.name].to(experts[0][m.name].device), dtype) for m in specs}
        hess = stats.hessians  # per expert: matrix name -> X^T X of its input
        channels = None
        if self.prune_base:
            n = next(m.shape[0] for m in specs if m.neuron_axis == 0)
            from .calibrate import WINDOW

            scores = channel_scores(hess.x, base, hess.kind, WINDOW)
            keep = n - pruned_count(n, self.prune_base)
            channels = torch.sort(torch.topk(scores, keep).indices).values.cpu().numpy()
            dropped = torch.ones(n, dtype=torch.bool, device=scores.device)
            dropped[torch.from_numpy(channels).to(scores.device)] = False
            # the deltas are taken against the base as restoration adds it (zero on the pruned channels), so the
            # low-rank deltas can take up part of what pruning removes
            for m in specs:
                if m.neuron_axis == 0:
                    base[m.name] = base[m.name].clone()
                    base[m.name][dropped] = 0
        E = len(experts)
        budget = self.residual_budget(specs, E)
        ranks = ({m.name: self.options.rank for m in specs if len(m.shape) == 2} if self.options.rank is not None
                 else matrix_ranks(specs, budget, E, self.share_v, stats.output))
        residuals: list[dict] = [{} for _ in experts]
        mats = [m for m in specs if len(m.shape) == 2 and ranks[m.name] > 0]
        for m in specs:
            if len(m.shape) == 1:  # biases: kept whole (they are counted in the budget first)
                for k, e in enumerate(experts):
                    d = e[m.name] - base[m.name]
                    residuals[k][m.name] = SparsePart(d, torch.ones_like(d, dtype=torch.bool))
            elif ranks[m.name] <= 0:
                for k in range(E):
                    residuals[k][m.name] = None
        if self.share_v:  # the frequency-weighted mean Gram of each matrix, accumulated one expert at a time
            mean: dict[str, torch.Tensor] = {}
            for k in range(E):
                g = hess[k]
                for m in mats:
                    mean[m.name] = mean.get(m.name, 0) + float(stats.freq[k]) * g[m.name]
            for m in mats:
                deltas = [e[m.name] - base[m.name] for e in experts]
                parts = shared_whitened_svd(deltas, mean[m.name] / float(stats.freq.sum()), ranks[m.name],
                                            0 if m.name == stats.output else 1)
                for k, part in enumerate(parts):
                    residuals[k][m.name] = part
        else:
            for k, e in enumerate(experts):
                g = hess[k]
                whites: dict[int, tuple] = {}  # gate and up share one Gram object: whiten it once per expert
                for m in mats:
                    h = g[m.name]
                    if id(h) not in whites:
                        whites[id(h)] = whitening(h)
                    residuals[k][m.name] = whitened_svd(e[m.name] - base[m.name], h, ranks[m.name],
                                                        0 if m.name == stats.output else 1, whites[id(h)])
        if channels is not None:
            idx = torch.from_numpy(channels).to(scores.device)
            base = {m.name: base[m.name].index_select(0, idx) if m.neuron_axis == 0 else base[m.name] for m in specs}
        return LayerResult(self.base_kind, base, None, residuals, base_channels=channels), experts


class ExpertGrams:
    """X^T X (float64) of each matrix's input over the tokens routed to one expert, computed on demand (one
    expert's at a time: E of them would not fit for large hidden sizes). The input matrices see x; the
    output matrix sees h = act(x W_in^T), computed with the source weights."""

    def __init__(self, inputs, experts: list[dict[str, torch.Tensor]], kind, device: torch.device):
        self.inputs, self.experts, self.kind, self.device = inputs, experts, kind, device
        self.x = inputs.x.to(device)

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, e: int) -> dict[str, torch.Tensor]:
        kind, mats = self.kind, self.experts[e]
        rows = torch.nonzero((self.inputs.index == e).any(dim=1).to(self.device)).reshape(-1)
        xe = self.x[rows].double()
        h_in = xe.T @ xe
        h = kind.intermediate(xe, mats)
        return {**{name: h_in for name in kind.inputs}, kind.output: h.T @ h}
