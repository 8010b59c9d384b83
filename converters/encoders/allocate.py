"""``--bits``: rate–distortion tables of every layer and a Lagrangian allocation under one byte budget.

For each layer, matrix and expert the converter measures the bytes and the error of each way to
store it: directly at every k-quant width, or as a residual (dense at every width, sparse at every
density and low width, or not at all) over a shared base quantized at each base width.
:func:`allocate` picks, per layer, whether the layer keeps a base (and pays its permutations), per
matrix the base width or no base, and per expert the residual's form, minimising the summed
error under the budget: the Lagrangian solution at the smallest multiplier that fits, then greedy
upgrades into what is left.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

#: widths an expert matrix may be stored at directly
DIRECT = ("ternary", "q2", "q3", "q4", "q5", "q6", "q8")
#: widths of a shared base
BASE = ("q2", "q3", "q4", "q6")
#: a sparse residual keeps this share of its entries (the largest, importance-weighted) in a bitmap
DENSITIES = (0.5, 0.25, 0.1)
#: widths of a sparse residual's kept values
SPARSE_WIDTHS = ("ternary", "q2", "q3")
#: a low-rank residual keeps this share of min(rows, cols) singular directions as factors U, V
RANKS = (0.5, 0.25, 0.1, 0.05)
#: widths of a low-rank residual's factors
LOWRANK_WIDTHS = ("q3", "q4", "q5")
#: the low-rank forms ``--lowrank-residuals`` offers resmoe (d2moe, whose residuals are only low rank, gets all)
RESMOE_RANKS, RESMOE_LOWRANK_WIDTHS = (0.25, 0.1, 0.05), ("q3", "q4")
#: forms of a residual over a base: None (no residual, the expert is the base), a width (dense),
#: ``"width@density"`` (sparse: a bitmap of the kept entries and their values at that width) or
#: ``"width@rFRACTION"`` (low rank: factors U, V at that width)
RESIDUAL = ((None, "ternary", "q2", "q3", "q4", "q5", "q6")
            + tuple(f"{w}@{d:g}" for d in DENSITIES for w in SPARSE_WIDTHS)
            + tuple(f"{w}@r{f:g}" for f in RANKS for w in LOWRANK_WIDTHS))


class Form(NamedTuple):
    """A residual label parsed: its width and, for a sparse one, its density, for a low-rank one the
    share of singular directions it keeps."""

    width: str
    density: float | None = None
    rank: float | None = None


def residual_form(label: str) -> Form:
    """The :class:`Form` of a residual label."""
    width, _, rest = label.partition("@")
    if rest.startswith("r"):
        return Form(width, rank=float(rest[1:]))
    return Form(width, density=float(rest) if rest else None)


def rank_of(shape: tuple[int, int], share: float) -> int:
    """The rank a low-rank residual of ``shape`` keeps at ``share``."""
    return max(1, int(round(share * min(shape))))


def kept(n: int, density: float) -> int:
    """Entries a sparse residual of ``n`` values at ``density`` keeps."""
    return max(1, int(round(density * n)))


@dataclass
class MatrixTable:
    """Measured points of one matrix of one layer (E experts)."""

    name: str
    direct_bytes: np.ndarray  # (len(DIRECT),)
    direct_error: np.ndarray  # (E, len(DIRECT)), experts in source order
    aligned_error: np.ndarray | None = None  # the same in aligned order (a layer with a base stores them so)
    base_bytes: dict[str, int] = field(default_factory=dict)  # base width -> bytes
    residual_bytes: np.ndarray | None = None  # (len(RESIDUAL),)
    residual_error: dict[str, np.ndarray] = field(default_factory=dict)  # base width -> (E, len(RESIDUAL))


@dataclass
class LayerTable:
    index: int
    permutation_bytes: int  # paid once when any matrix of the layer keeps a base
    matrices: list[MatrixTable]


@dataclass
class MatrixChoice:
    base: str | None  # base width, or None (stored directly)
    experts: list[str | None]  # per expert: width (None: no residual, only with a base)
    bytes: int
    error: float


@dataclass
class LayerChoice:
    index: int
    uses_base: bool
    matrices: dict[str, MatrixChoice]

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.matrices.values())


def _pick(err: np.ndarray, nbytes: np.ndarray, lam: float) -> tuple[np.ndarray, float, int, float]:
    """Per expert the option minimising err + lam*bytes: (indices, cost, bytes, error)."""
    cost = err + lam * nbytes[None, :]
    idx = np.argmin(cost, axis=1)
    rows = np.arange(err.shape[0])
    return idx, float(cost[rows, idx].sum()), int(nbytes[idx].sum()), float(err[rows, idx].sum())


def direct_errors(t: MatrixTable, aligned: bool) -> np.ndarray:
    return t.aligned_error if aligned and t.aligned_error is not None else t.direct_error


def _matrix_direct(t: MatrixTable, lam: float, aligned: bool = False) -> tuple[float, MatrixChoice]:
    idx, cost, b, e = _pick(direct_errors(t, aligned), t.direct_bytes, lam)
    return cost, MatrixChoice(None, [DIRECT[i] for i in idx], b, e)


def _matrix_based(t: MatrixTable, lam: float) -> tuple[float, MatrixChoice] | None:
    best = None
    for bw, berr in t.residual_error.items():
        idx, cost, b, e = _pick(berr, t.residual_bytes, lam)
        cost += lam * t.base_bytes[bw]
        if best is None or cost < best[0]:
            best = (cost, MatrixChoice(bw, [RESIDUAL[i] for i in idx], b + t.base_bytes[bw], e))
    return best


def solve(tables: list[LayerTable], lam: float) -> list[LayerChoice]:
    """The choice minimising error + lam * bytes, layer by layer."""
    out = []
    for lay in tables:
        direct = {t.name: _matrix_direct(t, lam) for t in lay.matrices}
        plain = sum(c for c, _ in direct.values())
        choice = LayerChoice(lay.index, False, {n: c for n, (_, c) in direct.items()})
        if any(t.residual_error for t in lay.matrices):
            mixed, picks = lam * lay.permutation_bytes, {}
            for t in lay.matrices:
                cand = [_matrix_direct(t, lam, aligned=True)]
                based = _matrix_based(t, lam)
                if based is not None:
                    cand.append(based)
                c, m = min(cand, key=lambda x: x[0])
                mixed += c
                picks[t.name] = m
            if mixed < plain and any(m.base is not None for m in picks.values()):
                choice = LayerChoice(lay.index, True, picks)
        out.append(choice)
    return out


def total_bytes(tables: list[LayerTable], choices: list[LayerChoice]) -> int:
    return sum(c.bytes + (t.permutation_bytes if c.uses_base else 0) for t, c in zip(tables, choices))


def total_error(choices: list[LayerChoice]) -> float:
    return sum(m.error for c in choices for m in c.matrices.values())


def min_bytes(tables: list[LayerTable]) -> int:
    """The fewest bytes any allocation can reach (the choice at an infinite multiplier)."""
    return total_bytes(tables, solve(tables, 1e30))


def _upgrades(tables: list[LayerTable], choices: list[LayerChoice], slack: int):
    """Best single-expert width change (lower error, more bytes within ``slack``) by error saved
    per byte: (gain per byte, layer i, matrix, expert, new width, delta bytes, delta error)."""
    best = None
    for i, (t, c) in enumerate(zip(tables, choices)):
        for mt in t.matrices:
            mc = c.matrices[mt.name]
            if mc.base is None:
                opts, nb, err = DIRECT, mt.direct_bytes, direct_errors(mt, c.uses_base)
            else:
                opts, nb, err = RESIDUAL, mt.residual_bytes, mt.residual_error[mc.base]
            for k, cur in enumerate(mc.experts):
                j = opts.index(cur)
                for jj in range(len(opts)):
                    db, de = int(nb[jj] - nb[j]), float(err[k, jj] - err[k, j])
                    if 0 < db <= slack and de < 0:
                        g = -de / db
                        if best is None or g > best[0]:
                            best = (g, i, mt.name, k, opts[jj], db, de)
    return best


def allocate(tables: list[LayerTable], budget: int) -> tuple[list[LayerChoice], float]:
    """The allocation with the least summed error whose bytes do not exceed ``budget``
    (raises ValueError if even the cheapest does not fit). Returns (choices, multiplier)."""
    hi = 1.0
    while total_bytes(tables, solve(tables, hi)) > budget:
        hi *= 4
        if hi > 1e30:
            raise ValueError(f"no allocation fits in {budget} bytes (the cheapest needs {min_bytes(tables)})")
    lo = 0.0
    if total_bytes(tables, solve(tables, lo)) <= budget:
        hi = lo
    else:
        lo = hi / 4 if hi > 1 else 0.0
        while total_bytes(tables, solve(tables, lo)) <= budget and lo > 1e-30:
            lo /= 4
        for _ in range(60):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
            if total_bytes(tables, solve(tables, mid)) <= budget:
                hi = mid
            else:
                lo = mid
    choices = solve(tables, hi)
    slack = budget - total_bytes(tables, choices)
    while True:
        up = _upgrades(tables, choices, slack)
        if up is None:
            break
        _, i, name, k, width, db, de = up
        mc = choices[i].matrices[name]
        mc.experts[k] = width
        mc.bytes += db
        mc.error += de
        slack -= db
    return choices, hi
