"""The ``--bits`` conversion: measure every layer, allocate the budget, then encode and write.

Layers stream twice (each pass holds one layer's experts); between the passes only the
barycenters, permutations and rate–distortion tables stay in memory (with ``--calibration``, the
recorded expert inputs wait in unnamed temporary files).
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from resmoe_format import Writer
from resmoe_format.memory import trim_heap

from .encoders import calibrate
from .encoders.allocate import LayerChoice, LayerTable, allocate, total_bytes, total_error
from .encoders.bits import LAYOUT, BitsConverter
from .errors import ConversionError

#: measurements of recent sources, so that a library caller converting one source at several budgets
#: (benchmarks/eval.py) measures it once: key -> (tables, converter); at most MEMO_SIZE entries
_MEMO: dict[tuple, tuple[list[LayerTable], BitsConverter]] = {}
MEMO_SIZE = 2


def memo_key(plan) -> tuple:
    """What identifies a measurement: the source files, method, calibration file, options and layers."""
    o = plan.options
    files = sorted({(str(i.file), i.file.stat().st_mtime_ns, i.file.stat().st_size)
                    for i in plan.ckpt.tensors.values()})
    cal = None
    if o.calibration is not None:
        st = Path(o.calibration).stat()
        cal = (str(Path(o.calibration).resolve()), st.st_mtime_ns, st.st_size)
    return (tuple(files), o.method, cal, o.sparse_residuals, o.lowrank_residuals, o.allow_unrouted_experts,
            tuple(lay.index for lay in plan.layouts), str(plan.device), plan.encoder.options.max_iter)


def release_layer(plan) -> None:
    gc.collect()
    plan.ckpt.release()
    trim_heap()


def bits_converter(plan) -> BitsConverter:
    """The --bits converter of ``plan``, without calibration statistics (the caller sets ``inputs`` and, for
    d2moe, ``fisher_bases``: all layers' in one process, one layer's at a time in a distributed rank)."""
    o = plan.options
    conv = BitsConverter(use_base=o.method in ("resmoe", "d2moe"), device=plan.device,
                         max_iter=plan.encoder.options.max_iter, sparse=o.sparse_residuals, lowrank=o.lowrank_residuals)
    if o.calibration is not None:
        conv.kind = expert_kind(plan)
    return conv


def expert_kind(plan):
    """The runtime's expert kind of ``plan``'s model (how its experts are called and what they compute)."""
    import transformers

    from resmoe_format.torch.kinds import kind_for

    return kind_for(transformers.AutoConfig.for_model(**plan.ckpt.config))


def _measure(plan, progress: bool) -> tuple[list[LayerTable], BitsConverter]:
    """Pass 1: the rate–distortion table of every layer (after recording calibration inputs)."""
    from .convert import load_experts

    o = plan.options
    conv = bits_converter(plan)
    if o.method == "d2moe":
        from .delta import calibration_stats

        stats = calibration_stats(plan, progress)
        conv.inputs = {i: st.inputs for i, st in stats.items()}
        conv.fisher_bases = {i: st.base for i, st in stats.items()}
    elif o.calibration is not None:
        conv.inputs = calibrate.collect(plan.ckpt, plan.moe_layouts, plan.layouts, plan.calibration_ids, plan.device,
                                        progress)
    tables = []
    for lay in tqdm(plan.layouts, desc="measuring", unit="layer", disable=not progress):
        tables.append(conv.analyze(lay, load_experts(plan, lay)))
        release_layer(plan)
    return tables, conv


def allocate_bits(plan, tables: list[LayerTable]) -> tuple[list[LayerChoice], float]:
    """:func:`.encoders.allocate.allocate` of ``plan``'s budget over ``tables`` (layer order): (choices, multiplier)."""
    try:
        return allocate(tables, plan.budget_bytes())
    except ValueError as e:
        raise ConversionError(f"--bits {plan.options.bits:g}: {e}") from None


def encode_layer(plan, conv: BitsConverter, lay, choice: LayerChoice, w: Writer) -> dict[str, Any]:
    """Pass 2 for one layer: encode it as ``choice`` says into ``w``; its report entry."""
    from .convert import layer_entry, load_experts

    t1 = time.perf_counter()
    layer, stats = conv.encode(lay, load_experts(plan, lay), choice)
    w.add_layer(layer)
    entry = layer_entry(lay, stats, layer.permutations)
    entry["base"] = choice.uses_base
    entry["seconds"] = time.perf_counter() - t1
    del layer
    release_layer(plan)
    return entry


def allocation_report(plan, tables: list[LayerTable], choices: list[LayerChoice], lam: float, t_measure: float,
                      tokens: dict[str, Any] | None) -> dict[str, Any]:
    """The report's ``allocation`` section (``tokens``: calibration tokens by layer, or None)."""
    o = plan.options
    weights = plan.expert_weights()
    achieved = total_bytes(tables, choices)
    return {"budget_bits": o.bits, "budget_bytes": plan.budget_bytes(), "expert_bytes": achieved,
            "bits_per_expert_weight": 8 * achieved / weights, "expert_weights": weights,
            "predicted_error": total_error(choices), "lagrange_multiplier": lam,
            "error_measure": "output (calibrated)" if o.calibration else "squared weight error",
            "layout": LAYOUT.to_json(), "measure_seconds": t_measure, "calibration": tokens}


def convert_layers_bits(plan, w: Writer, layer_reports: list[dict[str, Any]], progress: bool) -> dict[str, Any]:
    """Write every compressed layer of ``plan`` under its --bits budget; append one report entry per
    layer to ``layer_reports`` and return the allocation summary."""
    t0 = time.perf_counter()
    key = memo_key(plan)
    if key in _MEMO:
        tables, conv = _MEMO[key]
    else:
        tables, conv = _measure(plan, progress)
        while len(_MEMO) >= MEMO_SIZE:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = (tables, conv)
    choices, lam = allocate_bits(plan, tables)
    t_measure = time.perf_counter() - t0
    for lay, choice in zip(tqdm(plan.layouts, desc="encoding", unit="layer", disable=not progress), choices):
        layer_reports.append(encode_layer(plan, conv, lay, choice, w))
    tokens = {str(lay.index): {"tokens": conv.inputs[lay.index].tokens} for lay in plan.layouts} if conv.inputs \
        else None
    return allocation_report(plan, tables, choices, lam, t_measure, tokens)
