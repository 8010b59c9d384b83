"""D²-MoE's calibration statistics, one decoder layer at a time: routing frequencies, Fisher-weighted bases.

The forward pass is :func:`calibrate.collect`'s (each compressed layer's routed expert inputs spilled to
unnamed temporary files), and it also keeps every decoder layer's input. The backward pass then walks the
decoder from the top: the language-model loss of each calibration window gives the gradient of the last
hidden states; each layer in turn gets its weights again, runs forward on its saved inputs and backward
with the gradient from above, which leaves the gradient for the layer below. A hook on every compressed
experts module records its input, routing and output gradient, from which each expert's weight gradient
for the window follows (the expert's own small forward and backward in canonical orientation). Fisher
information is the squared gradient summed over windows (one window, one sample); the base

    W_base = sum_j F_j f_j W_j / sum_k F_k f_k        (element-wise; f_j the routing frequency)

is formed once the layer's windows are done; the layer's Fisher tensors (as large as its experts) are
dropped with it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConversionError
from . import calibrate
from .calibrate import WINDOW, LayerInputs
from .layerwise import LayerwiseModel, Spill


class FisherMerge:
    """The Fisher information of E experts, accumulated window by window, and their merge.

    Per window only the squared gradient is added (one addition per weight); the weighting by frequency
    and the element-wise normalisation happen once, in :meth:`result`."""

    def __init__(self, experts: list[dict[str, torch.Tensor]], freq: np.ndarray):
        self.experts, self.freq = experts, np.asarray(freq, dtype=np.float64)
        self.fisher = [{m: torch.zeros_like(t, dtype=torch.float32) for m, t in e.items()} for e in experts]

    def add(self, expert: int, fisher: dict[str, torch.Tensor]) -> None:
        """Add Fisher information (squared gradients) of ``expert``'s matrices."""
        for m, g2 in fisher.items():
            self.fisher[expert][m] += g2

    def result(self) -> dict[str, torch.Tensor]:
        """The merged base (float32); where no expert has Fisher information, the frequency-weighted mean."""
        out = {}
        total = float(self.freq.sum())
        for m in self.fisher[0]:
            num = den = mean = 0
            for j, e in enumerate(self.experts):
                f = float(self.freq[j])
                w = self.fisher[j][m].double() * f
                num = num + w * e[m].double()
                den = den + w
                mean = mean + f * e[m].double()
            out[m] = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), mean / total).float()
        return out


def fisher_merge(experts: list[dict[str, torch.Tensor]], fishers: list[dict[str, torch.Tensor]],
                 freq: np.ndarray) -> dict[str, torch.Tensor]:
    """``sum_j F_j f_j W_j / sum_k F_k f_k`` element-wise, for given Fisher tensors (float32 result)."""
    acc = FisherMerge(experts, freq)
    for j, f in enumerate(fishers):
        acc.add(j, f)
    return acc.result()


def routing_frequency(inputs: LayerInputs, num_experts: int, layer: int, allow_unrouted: bool = False
                      ) -> np.ndarray:
    """Each expert's share of the routed (token, slot) pairs; refuses an expert that got no token unless
    ``allow_unrouted`` (then its share is 0: no weight in the merge, and its delta is not whitened)."""
    idx = inputs.index.reshape(-1)
    counts = np.bincount(idx[idx < num_experts].numpy(), minlength=num_experts)
    none = [int(e) for e in np.flatnonzero(counts == 0)]
    if none and not allow_unrouted:
        raise ConversionError(f"--calibration: the text routes no token to expert(s) {', '.join(map(str, none))} of "
                              f"layer {layer} ({inputs.tokens} tokens); d2moe needs every expert's inputs and Fisher "
                              f"information: give a longer or more varied calibration text, or "
                              f"--allow-unrouted-experts for experts no text reaches")
    return counts / counts.sum()


class _GradCapture:
    """Hooks on one experts module during the backward pass: its input and routing (forward pre-hook) and
    the gradient of its output (a tensor hook set by a forward hook)."""

    def __init__(self, lay, kind, module):
        self.lay, self.kind = lay, kind
        self.x = self.index = self.weights = self.grad = None
        self.hooks = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                      module.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs) -> None:
        vals = list(args) + list(kwargs.values())
        x, idx, w = self.kind.routing(self.lay.num_experts, vals[0], vals[1], vals[2])
        self.x = x.detach().float().reshape(-1, x.shape[-1])
        self.index = idx.detach().reshape(self.x.shape[0], -1)
        self.weights = w.detach().float().reshape(self.x.shape[0], -1)

    def _post(self, module, args, output) -> None:
        out = output[0] if isinstance(output, tuple) else output

        def keep(g: torch.Tensor) -> None:
            self.grad = g.detach().float().reshape(-1, g.shape[-1])

        out.register_hook(keep)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def accumulate(self, experts: list[dict[str, torch.Tensor]], acc: FisherMerge) -> None:
        """Each routed expert's squared weight gradient for this window, into ``acc``."""
        kind = self.kind
        if self.grad is None:  # the module's output did not reach the loss (cannot happen in a decoder)
            return
        for e in range(self.lay.num_experts):
            rows, slots = torch.nonzero(self.index == e, as_tuple=True)
            if rows.numel() == 0:
                continue
            leaves = {m: t.detach().requires_grad_() for m, t in experts[e].items()}
            xe = self.x[rows]
            y = kind.intermediate(xe, leaves) @ leaves[kind.output]
            if kind.output_bias:
                y = y + leaves[kind.output_bias]
            s = (y * (self.weights[rows, slots, None] * self.grad[rows])).sum()
            names = list(leaves)
            grads = torch.autograd.grad(s, [leaves[m] for m in names], allow_unused=True)
            acc.add(e, {m: g.square() for m, g in zip(names, grads) if g is not None})
        self.x = self.index = self.weights = self.grad = None


@dataclass
class LayerStats:
    """What d2moe needs of one compressed layer: routed inputs (whitening), frequencies, Fisher base."""

    inputs: LayerInputs
    freq: np.ndarray
    base: dict[str, torch.Tensor]


def _copy(src: Spill) -> Spill:
    out = Spill(*src.shape)
    for start in range(0, src.shape[0], 4096):
        out.write(start, src.read(start, start + 4096))
    return out


def collect(ckpt, moe_layouts, layouts, ids: np.ndarray, device: torch.device, progress: bool = False,
            allow_unrouted: bool = False, done: Callable[[Any, LayerStats], None] | None = None
            ) -> dict[int, LayerStats]:
    """Routed inputs, routing frequencies and Fisher-merged bases of the compressed ``layouts``
    (``allow_unrouted``: see :func:`routing_frequency`). ``done(layout, stats)``: each layer's statistics as
    soon as its Fisher pass ends, then dropped (nothing is returned for it), so that only one layer's base
    is held at a time; a layer's statistics do not depend on which other layers are in ``layouts``."""
    from tqdm import tqdm

    from ..disassemble import expert_matrices

    run = LayerwiseModel(ckpt, moe_layouts, device)
    wanted = {lay.index for lay in layouts}
    where = {i: [(lay, path) for lay, path in pairs if lay.index in wanted] for i, pairs in run.moe.items()}
    where = {i: here for i, here in where.items() if here}
    first, top = min(where), len(run.layers) - 1
    saved: dict[int, Spill] = {}
    freq: dict[int, np.ndarray] = {}

    def keep(i: int, hidden: Spill) -> None:
        if i >= first:
            saved[i] = _copy(hidden)

    def frequency(lay, got: LayerInputs) -> None:
        freq[lay.index] = routing_frequency(got, lay.num_experts, lay.index, allow_unrouted)

    hidden, calls, inputs = calibrate.forward(run, wanted, ids, top, progress, "calibrating (forward)", keep,
                                              frequency)
    logits_of = run.load_head()
    targets = torch.from_numpy(ids).to(device)
    grad = Spill(*hidden.shape)
    with torch.enable_grad():
        for start in range(0, ids.size, WINDOW):
            h = torch.from_numpy(hidden.read(start, start + WINDOW)).to(device).requires_grad_()
            n = h.shape[0]
            if n < 2:
                grad.write(start, np.zeros((n, hidden.shape[1]), np.float32))
                continue
            logits = logits_of(h[None])[0]
            F.cross_entropy(logits[:-1].float(), targets[start + 1:start + n]).backward()
            grad.write(start, h.grad.cpu().numpy())
    del hidden
    stats: dict[int, LayerStats] = {}
    for i in tqdm(range(top, first - 1, -1), desc="calibrating (Fisher)", unit="layer", disable=not progress,
                  leave=False):
        layer = run.load_layer(i)
        here = where.get(i, [])
        caps, merges, mats = [], [], []
        for lay, path in here:
            caps.append(_GradCapture(lay, run.kind, run.model.get_submodule(path)))
            mats.append([{m: t.to(device, torch.float32) for m, t in e.items()}
                         for e in expert_matrices(lay, ckpt.get)])
            merges.append(FisherMerge(mats[-1], freq[lay.index]))
        try:
            with torch.enable_grad():
                for start in range(0, ids.size, WINDOW):
                    x = torch.from_numpy(saved[i].read(start, start + WINDOW)).to(device).requires_grad_()
                    args, kwargs = calls[(i, x.shape[0])]
                    out = layer(x[None], *args, **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    out.backward(torch.from_numpy(grad.read(start, start + x.shape[0]))[None].to(device))
                    for cap, experts, acc in zip(caps, mats, merges):
                        cap.accumulate(experts, acc)
                    grad.write(start, x.grad.cpu().numpy())
        finally:
            for cap in caps:
                cap.remove()
            run.drop_layer(i)
        for (lay, _), acc in zip(here, merges):
            st = LayerStats(inputs[lay.index], freq[lay.index], acc.result())
            if done is None:
                stats[lay.index] = st
            else:
                done(lay, st)
                del inputs[lay.index], st
        del saved[i], caps, merges, mats
    return stats
