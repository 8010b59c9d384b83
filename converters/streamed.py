"""Bounded memory per layer: a layer's experts streamed from the memory-mapped checkpoint.

For a layer too large to hold in float32 (``STREAM_BYTES``, or ``ConvertOptions.stream_experts``), the
barycenter iteration (:func:`~converters.encoders.barycenter.streamed_barycenter`) reads each expert once
per iteration and keeps only the barycenter, its running sum and the best iterate; then each expert is
read once more, aligned, its residual compressed, encoded and written (``add_layer_stream``) before the
next is read. Memory holds O(1) experts whatever their number; the file is byte for byte the in-memory
path's. Methods resmoe, prune and svd (not ``--lossless``, ``--bits`` or merge, which keep their
in-memory paths).
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np
import torch

from resmoe_format import MoELayer
from resmoe_format.memory import large_blocks_unmapped

from .disassemble import expert_matrices
from .emit import LayerEmitter
from .encoders.barycenter import streamed_barycenter
from .encoders.methods import neuron_specs, round_to, split_design
from .encoders.parts import LayerResult

#: Layers whose experts take more than this in float32 are streamed by default.
STREAM_BYTES = 1 << 30
STREAMED_METHODS = ("resmoe", "prune", "svd")


def streams(plan, lay) -> bool:
    """Whether ``lay`` is converted expert by expert (``ConvertOptions.stream_experts``; None: by size)."""
    o = plan.options
    if o.lossless or o.bits is not None or o.method not in STREAMED_METHODS:
        return False
    if o.stream_experts is not None:
        return o.stream_experts
    return lay.num_experts * sum(int(np.prod(m.shape)) for m in lay.matrices) * 4 > STREAM_BYTES


class ExpertSource:
    """A layer's experts read one at a time from the checkpoint: canonical float32 tensors on the plan's
    device. Each read maps only the sources that hold the expert, copies its matrices out and unmaps
    them again, so the pages read never accumulate in the process."""

    def __init__(self, plan, lay):
        self.plan, self.lay = plan, lay
        self.reads = 0

    def _views(self, k: int | None) -> dict[str, torch.Tensor]:
        """Expert k's matrices from the source tensors that hold it (reading a tensor reads all of it: the
        other experts' come from their headers alone, on the meta device); None: every source on meta."""
        from resmoe_format.torch.tensors import TORCH_DTYPES

        ck = self.plan.ckpt
        needed = {s.name for s in self.lay.sources if k is not None and s.expert in ("all", k)}

        def get(name: str) -> torch.Tensor:
            if name in needed:
                return ck.get(name)
            info = ck.tensors[name]
            return torch.empty(info.shape, dtype=TORCH_DTYPES.get(info.dtype), device="meta")

        return expert_matrices(self.lay, get)[k or 0]

    def check(self) -> None:
        """Every source's shape and dtype, from the headers (what the in-memory path checks as it reads)."""
        self._views(None)

    def design(self, k: int, neur) -> torch.Tensor:
        """Expert k's design matrix (:func:`~converters.encoders.methods.design`), filled in place from the
        source dtype: one (n, d) float32 buffer, no per-matrix copies."""
        raw = self._views(k)
        n = raw[neur[0].name].shape[0]
        widths = [raw[m.name].reshape(n, -1).shape[1] for m in neur]
        out = torch.empty((n, sum(widths)), dtype=torch.float32, device=self.plan.device)
        at = 0
        for m, w in zip(neur, widths):
            out[:, at:at + w].copy_(raw[m.name].reshape(n, -1))
            at += w
        del raw
        self._done()
        return out

    def __call__(self, k: int) -> dict[str, torch.Tensor]:
        raw = self._views(k)
        out = {m: t.to(self.plan.device, torch.float32, copy=True) for m, t in raw.items()}
        del raw
        self._done()
        return out

    def _done(self) -> None:
        self.reads += 1
        self.plan.ckpt.release()


def convert_layer_streamed(plan, lay, w) -> dict[str, Any]:
    """Write one layer expert by expert into ``w`` (a Writer or ShardedWriter); its report entry."""
    from .convert import layer_entry

    t0 = time.perf_counter()
    large_blocks_unmapped()
    enc = plan.encoder
    specs = list(lay.matrices)
    dtype = specs[0].dtype
    src = ExpertSource(plan, lay)
    src.check()
    e = lay.num_experts
    timing: dict[str, Any] = {}
    base: dict[str, torch.Tensor] = {}
    perms = None
    neur = neuron_specs(specs)
    others = [m for m in specs if m.neuron_axis != 0]
    if enc.name == "resmoe":
        marks = [time.perf_counter()]
        res = streamed_barycenter(lambda k: src.design(k, neur), e, max_iter=enc.options.max_iter,
                                  progress=lambda it, obj: marks.append(time.perf_counter()))
        timing["iteration_seconds"] = [b - a for a, b in zip(marks, marks[1:])]
        perms = [np.asarray(p, dtype=np.int64) for p in res.permutations]
        base = split_design(res.barycenter, neur)
        if others:  # small (biases): stacked as the in-memory path does
            experts = [src(k) for k in range(e)]
            for m in others:
                base[m.name] = torch.stack([x[m.name] for x in experts]).mean(0)
            del experts
        base = {k: round_to(v, dtype) for k, v in base.items()}
        enc.last_barycenter = {"objective": res.objective, "iterations": res.iterations}
        del res
    budget = enc.residual_budget(specs, e)
    em = LayerEmitter(lay, LayerResult(enc.base_kind, base, perms, []), dtype, plan.emit)

    def records() -> Iterator[dict]:
        for k in range(e):
            if perms is not None:
                idx = torch.from_numpy(perms[k]).to(plan.device)
                aligned = split_design(src.design(k, neur).index_select(0, idx), neur)
                if others:
                    x = src(k)
                    aligned.update({m.name: x[m.name] for m in others})
                    del x
            else:
                aligned = src(k)
            r = {m.name: (aligned[m.name] - base[m.name]) if base else aligned[m.name] for m in specs}
            parts = enc.compress(r, specs, budget)
            del r
            out = em.expert(parts, aligned)
            del parts, aligned
            yield out

    t1 = time.perf_counter()
    w.add_layer_stream(MoELayer(lay.index, lay.num_neurons, specs, enc.base_kind, em.base, [], perms,
                                list(lay.sources), lay.prefix), records())
    entry = layer_entry(lay, em.stats(), perms)
    if enc.name == "resmoe":
        entry["barycenter"] = enc.last_barycenter
    entry["streamed"] = {"expert_reads": src.reads, **timing, "encode_seconds": time.perf_counter() - t1}
    entry["seconds"] = time.perf_counter() - t0
    return entry
