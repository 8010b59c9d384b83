"""The ``--method d2moe`` conversion: calibrate (forward and Fisher backward, one decoder layer at a time),
then encode and write each compressed layer against its Fisher-weighted base."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from tqdm import tqdm

from resmoe_format import Writer

from .emit import emit_layer
from .quantized import expert_kind, memo_key, release_layer

#: the calibration statistics of the last source, so that a library caller converting one source at several
#: budgets (benchmarks/eval.py) runs the forward and Fisher passes once
_MEMO: dict[tuple, dict] = {}


def calibration_stats(plan, progress: bool) -> dict:
    """:func:`.encoders.fisher.collect` for ``plan``, memoised (the last source, calibration and layers)."""
    from .encoders import fisher

    key = memo_key(plan)
    if key not in _MEMO:
        _MEMO.clear()
        _MEMO[key] = fisher.collect(plan.ckpt, plan.moe_layouts, plan.layouts, plan.calibration_ids, plan.device,
                                    progress, plan.options.allow_unrouted_experts)
    return _MEMO[key]


def d2moe_layer(plan, lay, st, kind, w: Writer) -> dict[str, Any]:
    """One compressed layer with D²-MoE against its calibration statistics ``st`` (a :class:`.encoders.fisher.
    LayerStats`) into ``w``; its report entry. Memory is released afterwards."""
    from .convert import layer_entry, load_experts
    from .encoders.d2moe import D2Stats, ExpertGrams

    t1 = time.perf_counter()
    experts = load_experts(plan, lay)
    plan.encoder.stats = D2Stats(st.base, st.freq, ExpertGrams(st.inputs, experts, kind, plan.device), kind.output)
    dtype = lay.matrices[0].dtype
    try:
        result, aligned = plan.encoder.encode(experts, lay.matrices, dtype)
    finally:
        plan.encoder.stats = None
    layer, mstats = emit_layer(lay, result, aligned, dtype, plan.emit)
    w.add_layer(layer)
    entry = layer_entry(lay, mstats, None)
    entry["routing_frequency"] = [float(f) for f in st.freq]
    entry["unrouted_experts"] = [int(e) for e in np.flatnonzero(st.freq == 0)]
    entry["seconds"] = time.perf_counter() - t1
    del layer, result, aligned, experts
    release_layer(plan)
    return entry


def convert_layers_d2moe(plan, w: Writer, layer_reports: list[dict[str, Any]], progress: bool) -> dict[str, Any]:
    """Write every compressed layer of ``plan`` with D²-MoE; append one report entry per layer to
    ``layer_reports`` and return the calibration summary."""
    t0 = time.perf_counter()
    kind = expert_kind(plan)
    stats = calibration_stats(plan, progress)
    t_cal = time.perf_counter() - t0
    tokens = {}
    for lay in tqdm(plan.layouts, desc="d2moe", unit="layer", disable=not progress):
        layer_reports.append(d2moe_layer(plan, lay, stats[lay.index], kind, w))
        tokens[str(lay.index)] = {"tokens": stats[lay.index].inputs.tokens}
    return {"calibration_seconds": t_cal, "tokens": tokens}
