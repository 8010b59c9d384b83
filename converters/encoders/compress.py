"""Residual compression in torch: magnitude pruning and truncated SVD under a parameter budget.

Matrices follow the converter's canonical layout: every 2-D matrix has the hidden-neuron
axis first (n, width); 1-D matrices are biases. "expert" scope treats an expert's 2-D
matrices as one residual design matrix (n, sum of widths), as the ResMoE reference does:
one pruning threshold, or one SVD whose U serves every matrix.
"""
from __future__ import annotations

import math

import torch

from resmoe_format import MatrixSpec
from resmoe_format.codecs.lowrank import split_svd

from .parts import LowRankPart, SparsePart

SCOPES = ("expert", "matrix")


def top_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` largest entries of ``a`` (non-negative), never keeping zeros.

    Ties at the threshold are kept in flat index order, so the result is deterministic.
    """
    flat = a.reshape(-1)
    k = min(k, int((flat > 0).sum()))
    if k <= 0:
        return torch.zeros_like(a, dtype=torch.bool)
    if k == flat.numel():
        return torch.ones_like(a, dtype=torch.bool)
    t = torch.kthvalue(flat, flat.numel() - k + 1).values
    mask = flat > t
    short = k - int(mask.sum())
    if short > 0:
        ties = torch.nonzero(flat == t).reshape(-1)[:short]
        mask[ties] = True
    return mask.reshape(a.shape)


def prune(residual: dict[str, torch.Tensor], specs: list[MatrixSpec], budget: int,
          scope: str) -> dict[str, SparsePart | None]:
    """Keep the ``budget`` largest-magnitude entries: over the whole expert, or a share per matrix."""
    total = sum(residual[m.name].numel() for m in specs)
    if scope == "expert":
        flat = torch.cat([residual[m.name].reshape(-1).abs() for m in specs])
        mask = top_mask(flat, budget)
        out, at = {}, 0
        for m in specs:
            n = residual[m.name].numel()
            out[m.name] = _sparse(residual[m.name], mask[at:at + n].reshape(residual[m.name].shape))
            at += n
        return out
    frac = budget / total if total else 0.0
    out = {}
    for m in specs:
        r = residual[m.name]
        out[m.name] = _sparse(r, top_mask(r.abs(), math.floor(frac * r.numel())))
    return out


def _sparse(x: torch.Tensor, mask: torch.Tensor) -> SparsePart | None:
    if not bool(mask.any()):
        return None
    return SparsePart(torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)), mask)


def svd_factors(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD ``x ~= u @ v`` with sqrt(sigma) on both sides (float64 maths on x's device;
    the truncation is :func:`resmoe_format.codecs.lowrank.split_svd`)."""
    u, v = split_svd(*torch.linalg.svd(x.double(), full_matrices=False), rank)
    return u.float(), v.float()


def shares_u(specs: list[MatrixSpec], scope: str) -> bool:
    """Whether :func:`svd` stores one U for the expert: expert scope and 2-D matrices of one height."""
    return scope == "expert" and len({m.shape[0] for m in specs if len(m.shape) == 2}) == 1


def rank_limit(specs: list[MatrixSpec], scope: str) -> int:
    """The largest rank :func:`svd` can store for every 2-D matrix of ``specs``: with a shared U
    (n, r) and one V (r, width) per matrix, min(n, every width); otherwise the smallest min(rows, cols)."""
    mats = [m for m in specs if len(m.shape) == 2]
    if not mats:
        return 0
    if shares_u(specs, scope):
        return min(mats[0].shape[0], *(m.shape[1] for m in mats))
    return min(min(m.shape) for m in mats)


def shared_rank(specs: list[MatrixSpec], budget: int) -> int:
    """The rank a budget of ``budget`` parameters buys with one shared U (biases kept first)."""
    mats = [m for m in specs if len(m.shape) == 2]
    left = budget - sum(m.shape[0] for m in specs if len(m.shape) == 1)
    return max(0, left) // (mats[0].shape[0] + sum(m.shape[1] for m in mats)) if mats else 0


def svd(residual: dict[str, torch.Tensor], specs: list[MatrixSpec], budget: int, scope: str,
        rank: int | None = None) -> dict[str, SparsePart | LowRankPart | None]:
    """Truncated SVD under ``budget`` parameters (or a fixed ``rank``); biases kept dense.

    Expert scope: one SVD of the (n, W) design matrix of the 2-D matrices, rank
    ``budget / (n + W)``, its U stored once and shared. Matrix scope: each matrix gets rank
    ``share / (rows + cols)`` with the budget shared in proportion to size.
    """
    vecs = [m for m in specs if len(m.shape) == 1]
    mats = [m for m in specs if len(m.shape) == 2]
    out: dict[str, SparsePart | LowRankPart | None] = {}
    vec_params = sum(m.shape[0] for m in vecs)
    if vec_params <= budget:
        for m in vecs:
            out[m.name] = SparsePart(residual[m.name], torch.ones_like(residual[m.name], dtype=torch.bool))
        budget -= vec_params
    else:
        out.update(prune(residual, vecs, budget, "expert"))
        budget = 0
    if not mats:
        return out
    if shares_u(specs, scope):
        widths = [m.shape[1] for m in mats]
        # a budget near 1 can buy more rank than a V of the narrowest matrix holds: clamp (Encoder.check_layer warns)
        r = rank if rank is not None else min(shared_rank(mats, budget), rank_limit(mats, scope))
        if r <= 0:
            out.update({m.name: None for m in mats})
            return out
        u, v = svd_factors(torch.cat([residual[m.name] for m in mats], dim=1), r)
        at = 0
        for i, (m, w) in enumerate(zip(mats, widths)):
            out[m.name] = LowRankPart(u, v[:, at:at + w].contiguous(), None if i == 0 else mats[0].name,
                                      owner=i == 0 and len(mats) > 1)
            at += w
        return out
    size = sum(m.shape[0] * m.shape[1] for m in mats)
    for m in mats:
        rr, cc = m.shape
        r = rank if rank is not None else math.floor(budget * (rr * cc / size) / (rr + cc))
        out[m.name] = LowRankPart(*svd_factors(residual[m.name], r)) if r > 0 else None
    return out
