"""The converter's k-quant quantizer on torch (on ``--device``): the data-free grid search of
:mod:`resmoe_format.codecs.kquant` vectorised over whole expert stacks, and GPTQ on a fixed grid.

A grid's group scales and offsets are fp16 × small integer products, exact in binary32, so the
values this module dequantizes are bit for bit what a reader restores (spec section 5.10).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from resmoe_format.codecs import kquant
from resmoe_format.codecs.kquant import KqGrid, KqLayout

SEARCH_STEPS = 11


@dataclass
class TorchGrid:
    """Per-group scale ``a`` and offset ``b`` (float32, exact) of one flat value array, with the
    integer codes and fp16 super-block scales that store them."""

    a: torch.Tensor  # (G,)
    b: torch.Tensor  # (G,)
    sc: torch.Tensor  # (G,) uint8
    mc: torch.Tensor  # (G,) uint8
    supers: torch.Tensor  # (S, 2) float16

    def per_value(self, n: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a.repeat_interleave(group)[:n], self.b.repeat_interleave(group)[:n]

    def numpy(self) -> KqGrid:
        return KqGrid(self.sc.cpu().numpy(), self.mc.cpu().numpy(), self.supers.cpu().numpy())


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    n = x.numel()
    g = -(-n // group)
    out = x.new_zeros(g * group)
    out[:n] = x.reshape(-1)
    return out.reshape(g, group)


#: groups per call of :func:`_best_affine` in :func:`fit_grid`
AFFINE_ROWS = 4096


def _best_affine(x: torch.Tensor, w: torch.Tensor | None, top: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (row): scale a >= 0, offset b >= 0 (v = a q - b) minimising the weighted squared
    error (``w`` None: unweighted) over a search of candidate scales, each refitted by weighted
    least squares."""
    lo = torch.clamp(x.min(dim=1).values, max=0.0)
    hi = x.max(dim=1).values
    span = hi - lo
    ok = span > 0
    safe = torch.where(ok, span, torch.ones_like(span))
    best_err = torch.full_like(lo, float("inf"))
    best_a = torch.where(ok, span / top, torch.zeros_like(span))
    best_b = -lo
    wx = x if w is None else w * x
    sw = torch.full_like(lo, x.shape[1]) if w is None else w.sum(1)
    sx = wx.sum(1)
    shifted = x - lo[:, None]
    for t in np.linspace(-0.5, 0.5, steps) if steps > 1 else [0.0]:
        iscale = (top + float(t)) / safe
        q = torch.clamp(torch.round(shifted * iscale[:, None]), 0, top)
        wq = q if w is None else w * q
        sq, sqq, sqx = wq.sum(1), (wq * q).sum(1), (wq * x).sum(1)
        det = sw * sqq - sq * sq
        a = (sw * sqx - sq * sx) / det
        c = (sqq * sx - sq * sqx) / det
        bad = ~(det > 0) | (c > 0) | ~torch.isfinite(a) | ~torch.isfinite(c)
        a = torch.where(bad, sqx / sqq, a)
        c = torch.where(bad, torch.zeros_like(c), c)
        a = torch.where(torch.isfinite(a) & (a > 0), a, torch.zeros_like(a))
        r = a[:, None] * q + c[:, None] - x
        err = (r * r).sum(1) if w is None else (w * r * r).sum(1)
        take = err < best_err
        best_err = torch.where(take, err, best_err)
        best_a = torch.where(take, a, best_a)
        best_b = torch.where(take, -c, best_b)
    return best_a.float(), torch.clamp(best_b, min=0).float()


def _two_level(vals: torch.Tensor, layout: KqLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group values (>= 0) -> (codes uint8, fp16 step per super-block, exact float32 values)."""
    top = (1 << layout.scale_bits) - 1
    g = vals.numel()
    s = -(-g // layout.super)
    pad = vals.new_zeros(s * layout.super)
    pad[:g] = vals
    blocks = pad.reshape(s, layout.super)
    d = (blocks.max(dim=1).values / top).half()
    d32 = d.float()
    codes = torch.where(d32[:, None] > 0, torch.round(blocks / torch.where(d32 > 0, d32, 1)[:, None]),
                        torch.zeros_like(blocks))
    codes = torch.clamp(codes, 0, top).reshape(-1)[:g]
    exact = d32.repeat_interleave(layout.super)[:g] * codes
    return codes.to(torch.uint8), d, exact


def fit_grid(x: torch.Tensor, value_dtype: str, layout: KqLayout, weights: torch.Tensor | None = None,
             steps: int = SEARCH_STEPS) -> TorchGrid:
    """The grid of a flat array: weighted scale/offset search per group, then two-level codes."""
    x = x.reshape(-1).float()
    xg = _grouped(x, layout.group)
    if weights is None:
        w = None if x.numel() % layout.group == 0 else _grouped(torch.ones_like(x), layout.group)
    else:
        w = _grouped(weights.reshape(-1).float(), layout.group)
    # a few thousand groups at a time: the search's temporaries stay in the CPU's caches (rows are independent)
    parts = [_best_affine(xg[i:i + AFFINE_ROWS], None if w is None else w[i:i + AFFINE_ROWS],
                          kquant.levels(value_dtype) - 1, steps) for i in range(0, xg.shape[0], AFFINE_ROWS)]
    a, b = (torch.cat(t) for t in zip(*parts)) if len(parts) > 1 else parts[0]
    sc, d, a_exact = _two_level(a, layout)
    mc, dm, b_exact = _two_level(b, layout)
    return TorchGrid(a_exact, b_exact, sc, mc, torch.stack([d, dm], dim=1))


def assign(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, top: int) -> torch.Tensor:
    """Nearest codes clip(rint((x + b) / a), 0, top) (0 where a == 0), as float32."""
    q = torch.round((x + b) / torch.where(a > 0, a, torch.ones_like(a)))
    return torch.clamp(torch.where(a > 0, q, torch.zeros_like(q)), 0, top)


def dequant(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """v = (q * a) - b, two float32 operations (spec 5.10)."""
    return (q * a) - b


@dataclass
class Quantized:
    """One quantized value array: codes (float32 integers, flat), its grid, and what it restores."""

    codes: torch.Tensor
    grid: TorchGrid
    values: torch.Tensor  # dequantized, same shape as the input

    def parts(self, value_dtype: str, layout: KqLayout, part: str = "values") -> dict[str, np.ndarray]:
        codes = self.codes.to("cpu", torch.uint8).numpy()
        return kquant.parts_of(codes, self.grid.numpy(), value_dtype, layout, part)


def rtn(x: torch.Tensor, value_dtype: str, layout: KqLayout, weights: torch.Tensor | None = None) -> Quantized:
    """Round-to-nearest on the searched grid."""
    grid = fit_grid(x, value_dtype, layout, weights)
    a, b = grid.per_value(x.numel(), layout.group)
    q = assign(x.reshape(-1).float(), a, b, kquant.levels(value_dtype) - 1)
    return Quantized(q, grid, dequant(q, a, b).reshape(x.shape))


def gptq(x: torch.Tensor, hessian: torch.Tensor, input_axis: int, value_dtype: str, layout: KqLayout,
         damp: float = 0.01, block: int = 128) -> Quantized:
    """GPTQ (Frantar et al., 2023) on a fixed grid: codes chosen column by column along the input
    axis with second-order error compensation under ``hessian`` (inputs × inputs, X^T X / N).

    ``x`` is a canonical 2-D matrix; ``input_axis`` is the axis the layer's input multiplies
    (1 for ``x @ W.T`` matrices, 0 for an output matrix used as ``h @ W``). The grid is searched
    first with the Hessian's diagonal as importance, as llama.cpp's imatrix does."""
    x = x.float()
    w_in = torch.diagonal(hessian).float()
    importance = (w_in[None, :] if input_axis == 1 else w_in[:, None]).expand_as(x)
    grid = fit_grid(x, value_dtype, layout, importance + 1e-12 * importance.mean().clamp(min=1e-30))
    a, b = grid.per_value(x.numel(), layout.group)
    a, b = a.reshape(x.shape), b.reshape(x.shape)
    top = kquant.levels(value_dtype) - 1
    # GPTQ works on W (out, in)
    W, A, B = (x, a, b) if input_axis == 1 else (x.T, a.T, b.T)
    W = W.clone().double()
    A, B = A.double(), B.double()
    H = hessian.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += torch.eye(H.shape[0], dtype=H.dtype, device=H.device) * damp * torch.diagonal(H).mean()
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.zeros_like(W)
    ncols = W.shape[1]
    for i1 in range(0, ncols, block):
        i2 = min(i1 + block, ncols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            w = W1[:, j]
            aj, bj = A[:, i1 + j], B[:, i1 + j]
            q = torch.clamp(torch.round((w + bj) / torch.where(aj > 0, aj, torch.ones_like(aj))), 0, top)
            q = torch.where(aj > 0, q, torch.zeros_like(q))
            Q[:, i1 + j] = q
            err = (w - (q * aj - bj)) / Hinv1[j, j]
            W1[:, j:] -= err[:, None] * Hinv1[j, j:][None, :]
            Err1[:, j] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    codes = (Q if input_axis == 1 else Q.T).float().contiguous()
    a32, b32 = a.float(), b.float()
    return Quantized(codes.reshape(-1), grid, dequant(codes, a32, b32))


def output_error(diff: torch.Tensor, hessian: torch.Tensor | None, input_axis: int) -> float:
    """tr(ΔW H ΔWᵀ) along the input axis (the mean squared output error over the calibration
    inputs), or the squared Frobenius norm without a Hessian."""
    d = diff.double()
    if hessian is None:
        return float((d * d).sum())
    h = hessian.double()
    return float(((d @ h) * d).sum()) if input_axis == 1 else float(((h @ d) * d).sum())
