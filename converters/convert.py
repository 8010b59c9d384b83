"""resmoe-convert's engine: a Hugging Face MoE checkpoint in, a .rmoe file out, layer by layer.

Everything that can be checked is checked before the output is created (architecture,
layer selection, budgets, flags); the output appears atomically only when complete.
"""
from __future__ import annotations

import gc
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import torch
from tqdm import tqdm

from resmoe_format import Writer, publish, shards
from resmoe_format.shards import open_writer
from resmoe_format.codecs import Quant
from resmoe_format.container import permutation_dtype
from resmoe_format.dtypes import by_name
from resmoe_format.errors import RmoeRuntimeError
from resmoe_format.memory import trim_heap
from resmoe_format.torch import tensors

from . import lossless
from .architectures import adapter_for
from .checkpoint import Checkpoint
from .disassemble import expert_matrices
from .emit import ELEMENTWISE, EmitOptions, emit_layer
from .encoders import get_encoder
from .encoders.budget import Budget
from .encoders.methods import DEFAULT_MAX_ITER, EncoderOptions
from .errors import ConversionError
from .layers import select_layers
from .paths import check_paths, checkpoint_inputs

VALUE_DTYPES = ("bf16", "fp16", "fp32", "int8")
#: The NaN/Inf check releases the checkpoint's pages after reading this many bytes.
CHECK_RELEASE_BYTES = 64 << 20


@dataclass
class ConvertOptions:
    """Every flag of resmoe-convert (see ``resmoe-convert --help``)."""

    method: str = "resmoe"
    keep: float | None = None
    residual_keep: float | None = None
    residual: str | None = None  # None: "svd" for --method svd, else "prune"
    residual_scope: str = "expert"
    rank: int | None = None
    layers: str = "all"
    value_dtype: str | None = None
    base_dtype: str | None = None  # None: the source dtype
    delta_format: str = "auto"
    lossless: bool = False
    compress_passthrough: bool = False  # --compress-passthrough: fields records for the non-expert tensors too
    device: str = "auto"
    max_iter: int | None = None  # None: DEFAULT_MAX_ITER (resmoe's barycenter iterations)
    bits: float | None = None  # --bits: k-quant allocation to this many bits per expert weight
    calibration: str | None = None  # --calibration: text file for GPTQ and output-error allocation
    sparse_residuals: bool = False  # --sparse-residuals: sparse residual choices for the --bits allocator
    lowrank_residuals: bool = False  # --lowrank-residuals: low-rank residual choices for the --bits allocator
    share_v: bool = False  # --share-v: d2moe, one input-side delta factor per matrix for all experts of a layer
    prune_base: float | None = None  # --prune-base F: d2moe, the base's intermediate channels removed (fraction)
    allow_unrouted_experts: bool = False  # d2moe: an expert no calibration token reaches gets no Fisher weight
    max_shard_size: str | int | None = None  # --max-shard-size: a sharded output (spec 11) of shards this large
    stream_experts: bool | None = None  # read a layer's experts one at a time (None: for layers over 1 GiB in fp32)


def resolve_device(name: str) -> torch.device:
    """``--device``: :func:`resmoe_format.torch.tensors.resolve_device` as a ConversionError."""
    try:
        return tensors.resolve_device(name)
    except RmoeRuntimeError as e:
        raise ConversionError(f"--device: {e}") from None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array of the same element type (bf16 and fp8 via ml_dtypes)."""
    special = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
               torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
               torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
    t = t.detach().cpu().contiguous()
    if t.dtype in special:
        raw, npt = special[t.dtype]
        return t.view(raw).numpy().view(npt)
    return t.numpy()


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ConversionError if a floating tensor holds NaN or Inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ConversionError(f"tensor {name} holds {bad} NaN or Inf value(s); refusing to convert")


def check_method_flags(o: ConvertOptions) -> None:
    """Refuse flags the chosen method ignores (merge stores no residual; only resmoe has a
    barycenter) and ``--rank`` together with a budget, which it would override."""
    if o.max_iter is not None:
        if o.method != "resmoe":
            raise ConversionError(f"--max-iter bounds resmoe's barycenter iterations; --method {o.method} has none")
        if o.max_iter < 1:
            raise ConversionError(f"--max-iter must be at least 1, got {o.max_iter}")
    if o.rank is not None and (o.keep is not None or o.residual_keep is not None):
        raise ConversionError("--rank fixes the SVD rank of every residual: give it or a budget (--keep, "
                              "--residual-keep), not both")
    if o.method == "merge" and not o.lossless:
        given = [flag for flag, on in (("--residual svd", o.residual == "svd"),
                                       (f"--residual-scope {o.residual_scope}", o.residual_scope != "expert"),
                                       ("--rank", o.rank is not None), ("--value-dtype", o.value_dtype is not None),
                                       (f"--delta-format {o.delta_format}", o.delta_format != "auto")) if on]
        if given:
            raise ConversionError(f"--method merge stores the experts' average and no residual: {given[0]} does "
                                  f"not apply")


class Plan:
    """A checked conversion: what to read, which layers to compress, with which encoder."""

    def __init__(self, src: str | Path, out: str | Path, options: ConvertOptions, config: str | Path | None = None,
                 progress: bool = False, check: bool = True):
        o = options
        self.options = o
        self.out = Path(out)
        self.bits = check_bits_flags(o)
        check_d2moe_flags(o)
        if o.value_dtype is not None and o.value_dtype not in VALUE_DTYPES:
            raise ConversionError(f"--value-dtype must be one of {', '.join(VALUE_DTYPES)}, got {o.value_dtype!r}")
        if o.base_dtype is not None and o.base_dtype not in VALUE_DTYPES:
            raise ConversionError(f"--base-dtype must be one of {', '.join(VALUE_DTYPES)}, got {o.base_dtype!r}")
        if o.base_dtype is not None and o.method != "resmoe":
            raise ConversionError("--base-dtype sets the dtype of the barycenter: it applies to --method resmoe")
        residual = o.residual or ("svd" if o.method in ("svd", "d2moe") or o.delta_format == "lowrank" else "prune")
        if o.lossless:
            if o.keep is not None or o.residual_keep is not None or o.rank is not None:
                raise ConversionError("--lossless keeps everything: do not combine it with --keep, "
                                      "--residual-keep or --rank")
            if o.value_dtype not in (None, "fp32"):
                raise ConversionError("--lossless stores float32 residuals; --value-dtype does not apply")
            if o.base_dtype is not None:
                raise ConversionError("--lossless keeps the barycenter in the source dtype; --base-dtype does not "
                                      "apply")
            if o.delta_format not in ELEMENTWISE:
                raise ConversionError(f"--lossless stores exact residuals element-wise; --delta-format "
                                      f"{o.delta_format} cannot")
            budget = Budget(residual_keep=1.0)
        else:
            budget = Budget.of(o.keep, o.residual_keep)
        if residual == "prune" and o.delta_format == "lowrank":
            raise ConversionError("--delta-format lowrank needs --residual svd")
        if residual == "svd" and o.delta_format not in ("auto", "lowrank", "dense"):
            raise ConversionError(f"--residual svd stores factors: --delta-format must be auto, lowrank or dense, "
                                  f"not {o.delta_format}")
        if o.rank is not None and residual != "svd":
            raise ConversionError("--rank applies to --residual svd (or --method svd)")
        check_method_flags(o)
        self.encoder = get_encoder(o.method, EncoderOptions(budget, residual, o.residual_scope, o.rank,
                                                             o.lossless, DEFAULT_MAX_ITER if o.max_iter is None
                                                             else o.max_iter))
        if o.method == "d2moe":
            self.encoder.share_v, self.encoder.prune_base = o.share_v, o.prune_base
        # d2moe stores its deltas as factors (the runtime's products), never densified by auto
        fmt = "lowrank" if o.method == "d2moe" and o.delta_format == "auto" else o.delta_format
        self.emit = EmitOptions(o.value_dtype, fmt, Quant(), o.base_dtype)
        #: --lossless with the fields encoding (spec 5.11); an explicit --delta-format or --value-dtype fp32
        #: keeps the float32 residuals of spec 6.3
        self.fields = o.lossless and o.delta_format == "auto" and o.value_dtype is None
        if o.compress_passthrough and not self.fields:
            raise ConversionError("--compress-passthrough codes the non-expert tensors exactly: it goes with "
                                  "--lossless (and no --delta-format or --value-dtype)")
        self.device = resolve_device(o.device)
        self.max_shard_size = check_shard_size(o.max_shard_size)
        self.src = Path(src)
        self.ckpt = Checkpoint(src, config)
        try:
            self.inputs = inputs = [*checkpoint_inputs(src, config), *(i.file for i in self.ckpt.tensors.values())]
            check_paths(inputs, files=output_files(out, self.max_shard_size))
            if self.max_shard_size is not None:
                check_shard_inputs(out, inputs)
            self.adapter = adapter_for(self.ckpt.config, self.ckpt.tensors)
            layouts = self.moe_layouts = self.adapter.moe_layers()
            chosen = set(select_layers(o.layers, [lay.index for lay in layouts]))
            self.layouts = [lay for lay in layouts if lay.index in chosen]
            for lay in self.layouts:
                if lay.num_experts < 2 and o.method in ("resmoe", "merge"):
                    raise ConversionError(f"layer {lay.index} has {lay.num_experts} expert; {o.method} needs "
                                          f"two or more")
                if not self.bits:
                    self.encoder.check_layer(lay.matrices, lay.num_experts)  # budget and --rank fit these shapes
            if self.bits:
                self.check_bits_budget()
            self.calibration_ids = self.read_calibration() if o.calibration is not None else None
            if o.method == "merge" and o.keep is not None and not o.lossless:
                experts = sorted({lay.num_experts for lay in self.layouts})
                if any(abs(o.keep - 1 / e) > 1e-9 for e in experts):
                    shares = ", ".join(f"1/{e} = {1 / e:.1%}" for e in experts)
                    warnings.warn(f"--method merge stores the experts' average only ({shares} of the expert "
                                  f"parameters), whatever --keep says (--keep {o.keep} only bounds it)", stacklevel=2)
            compressed = {s.name for lay in self.layouts for s in lay.sources}
            self.passthrough = [n for n in self.ckpt.tensors if n not in compressed]
            if check:  # False: the caller checks each tensor as it reads it (distributed ranks)
                self.check_weights(progress)
        except BaseException:
            self.ckpt.close()
            raise

    def expert_weights(self) -> int:
        return sum(lay.num_experts * int(np.prod(m.shape)) for lay in self.layouts for m in lay.matrices)

    def budget_bytes(self) -> int:
        """--bits as bytes for the compressed layers' expert part (spec section 8's expert bytes)."""
        return int(self.options.bits * self.expert_weights() // 8)

    def check_bits_budget(self) -> None:
        """Refuse a --bits no allocation reaches, or one at or above the source's bits, from shapes alone."""
        from .encoders.allocate import min_bytes
        from .encoders.bits import shape_tables

        b = self.options.bits
        weights = self.expert_weights()
        if not weights:
            raise ConversionError("--bits: the selected layers hold no expert weights")
        src_bits = 8 * sum(lay.num_experts * int(np.prod(m.shape)) * by_name(m.dtype).itemsize
                           for lay in self.layouts for m in lay.matrices) / weights
        if b >= src_bits:
            raise ConversionError(f"--bits {b:g} is not below the source's {src_bits:g} bits per expert weight: "
                                  f"nothing would be saved")
        m = self.options.method
        cheapest = 8 * min_bytes(shape_tables(self.layouts, m in ("resmoe", "d2moe"), m == "resmoe")) / weights
        if b < cheapest:
            raise ConversionError(f"--bits {b:g} is below what the cheapest encoding reaches for these experts "
                                  f"({cheapest:.4f} bits per expert weight with --method {self.options.method})")

    def read_calibration(self) -> np.ndarray:
        """--calibration's token ids (the checks of calibrate.read_text and tokenize), before any work."""
        import importlib.util

        from .encoders import calibrate

        if importlib.util.find_spec("transformers") is None:
            raise ConversionError("--calibration runs the source model in transformers: pip install 'resmoe[torch]'")
        calibrate.check_model(self.ckpt.config)
        text = calibrate.read_text(self.options.calibration)
        return calibrate.tokenize(text, self.ckpt.files().get("tokenizer.json"), self.options.calibration)

    def check_weights(self, progress: bool = False) -> None:
        """Refuse NaN or Inf anywhere in the checkpoint before the output is created (one
        streamed read pass; pages are released as it goes)."""
        touched = 0
        for name in tqdm(self.ckpt.tensors, desc="checking", unit="tensor", disable=not progress, leave=False):
            t = self.ckpt.get(name)
            check_finite(name, t)
            touched += t.numel() * t.element_size()
            del t
            if touched >= CHECK_RELEASE_BYTES:  # by bytes, not tensors: 64 of DeepSeek-V3's experts are 1.9 GB
                self.ckpt.release()
                touched = 0
        self.ckpt.release()

    def model_info(self) -> dict[str, Any]:
        """The schema's ``model`` object: architecture, source dtype, compressed layers."""
        dts = sorted({m.dtype for lay in self.layouts for m in lay.matrices})
        archs = self.ckpt.config.get("architectures") or [self.ckpt.config.get("model_type")]
        return {"architecture": archs[0], "model_type": self.ckpt.config.get("model_type"),
                "source_dtype": dts[0] if len(dts) == 1 else ",".join(dts),
                "adapter": type(self.adapter).__name__, "compressed_layers": [lay.index for lay in self.layouts]}

    def method_info(self) -> dict[str, Any]:
        """The schema's ``method`` object (spec 4.13): method, budget, residual, flags."""
        from resmoe_format import __version__

        e = self.encoder.options
        info = {"name": self.options.method, **e.budget.to_json(), "residual": e.residual, "residual_scope": e.scope,
                "value_dtype": self.options.value_dtype, "base_dtype": self.options.base_dtype,
                "delta_format": self.options.delta_format,
                "lossless": e.lossless, "writer": f"resmoe {__version__}"}
        if self.fields:
            info["delta_format"] = "fields"
            info["compress_passthrough"] = self.options.compress_passthrough
        if e.rank is not None:
            info["rank"] = e.rank
        if self.bits:
            info = {"name": self.options.method, "bits": self.options.bits, "quantizer": "kquant",
                    "calibration": "gptq" if self.options.calibration else None, "writer": f"resmoe {__version__}"}
            if self.options.method == "d2moe":
                info.update({"calibration": "fisher+whitening", "base": "fisher"})
                return info
        if self.options.method == "d2moe":
            info.update({"base": "fisher", "calibration": "fisher+whitening", "share_v": self.options.share_v,
                         "prune_base": self.options.prune_base,
                         "allow_unrouted_experts": self.options.allow_unrouted_experts})
        if self.options.method == "resmoe":
            info["barycenter"] = {"solver": "exact assignment, alternating", "max_iter": e.max_iter}
        return info


def convert(src: str | Path, out: str | Path, options: ConvertOptions | None = None,
            config: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Convert ``src`` to ``out``; returns the report (see ``--report``)."""
    plan = Plan(src, out, options or ConvertOptions(), config, progress)
    t_start = time.perf_counter()
    report = new_report(plan)
    try:
        with open_writer(plan.out, report["model"], report["method"], plan.max_shard_size) as w:
            write_head(plan, w, progress)
            if plan.bits:
                from .quantized import convert_layers_bits

                report["allocation"] = convert_layers_bits(plan, w, report["layers"], progress)
            elif plan.options.method == "d2moe":
                from .delta import convert_layers_d2moe

                report["calibration"] = convert_layers_d2moe(plan, w, report["layers"], progress)
            else:
                bar = tqdm(plan.layouts, desc=f"{plan.options.method}", unit="layer", disable=not progress)
                for lay in bar:
                    bar.set_postfix_str(f"layer {lay.index}")
                    report["layers"].append(convert_layer(plan, lay, w))
    finally:
        plan.ckpt.close()
    return finish_report(plan, report, w, t_start)


def new_report(plan: Plan) -> dict[str, Any]:
    """The report's head (``--report``); the layers' entries are appended as they are written."""
    return {"source": str(plan.src), "output": str(plan.out), "model": plan.model_info(),
            "method": plan.method_info(), "device": str(plan.device), "layers": []}


def write_head(plan: Plan, w: Writer, progress: bool = False, check: bool = False) -> None:
    """Embed the checkpoint's files and write its passthrough tensors (``check``: refuse NaN or Inf in them)."""
    for rel, data in sorted(plan.ckpt.files().items()):
        w.add_file(rel, data)
    for name in tqdm(plan.passthrough, desc="passthrough", unit="tensor", disable=not progress, leave=False):
        t = plan.ckpt.get(name)
        if check:
            check_finite(name, t)
        w.add_passthrough(name, to_numpy(t), coded=plan.options.compress_passthrough)
        del t
    plan.ckpt.release()


def convert_layer(plan: Plan, lay, w: Writer) -> dict[str, Any]:
    """Compress one layer (not ``--bits``) into ``w``; its report entry. Memory is released afterwards."""
    from .streamed import convert_layer_streamed, streams

    if plan.fields:
        entry = lossless.convert_layer(plan, lay, w)
    elif streams(plan, lay):
        entry = convert_layer_streamed(plan, lay, w)
    else:
        entry = _convert_layer(plan, lay, w)
    gc.collect()
    plan.ckpt.release()
    trim_heap()
    return entry


def finish_report(plan: Plan, report: dict[str, Any], w, t_start: float) -> dict[str, Any]:
    """The report's totals once ``w`` is closed (warns when the experts came out larger than their source)."""
    report["seconds"] = time.perf_counter() - t_start
    outputs = getattr(w, "outputs", None) or [plan.out]
    if len(outputs) > 1:
        report["shards"] = [str(p) for p in outputs[:-1]]
        report["index"] = str(outputs[-1])
    report["summary"] = summarize(report, sum(p.stat().st_size for p in outputs))
    frac = report["summary"]["expert_bytes_fraction"]
    if frac is not None and frac > 1 and not plan.options.lossless:
        flag = "--rank" if plan.options.rank is not None else plan.encoder.options.budget.flag().split()[0]
        warnings.warn(f"the compressed experts take {frac:.1%} of their source size (indices and permutations "
                      f"included): nothing is saved; lower {flag} or use a smaller --value-dtype", stacklevel=3)
    return report


def load_experts(plan: Plan, lay) -> list[dict[str, torch.Tensor]]:
    """One layer's experts as canonical float32 tensors on the plan's device."""
    raw = expert_matrices(lay, plan.ckpt.get)
    experts = []
    for e in raw:
        experts.append({m: t.to(plan.device, torch.float32) for m, t in e.items()})
    return experts


def layer_entry(lay, stats: dict[str, Any], permutations) -> dict[str, Any]:
    """A layer's report entry from its per-matrix statistics."""
    entry: dict[str, Any] = {"index": lay.index, "prefix": lay.prefix, "num_experts": lay.num_experts,
                             "num_neurons": lay.num_neurons, "matrices": stats}
    itemsize = by_name(permutation_dtype(lay.num_neurons)).itemsize
    perm_bytes = sum(int(np.asarray(p).size) * itemsize for p in (permutations or []))
    entry["permutation_bytes"] = perm_bytes
    entry["bytes"] = perm_bytes + sum(s["bytes"] for s in stats.values())
    entry["params"] = sum(s["params"] for s in stats.values())
    entry["source_bytes"] = sum(s["params"] * by_name(s["dtype"]).itemsize for s in stats.values())
    entry["kept"] = sum(s["kept"] for s in stats.values())
    # the budget in both conventions, as achieved: total kept (base included) and per residual
    entry["keep"] = entry["kept"] / entry["params"] if entry["params"] else None
    entry["residual_keep"] = (sum(s["residual_kept"] for s in stats.values()) / entry["params"]
                              if entry["params"] else None)
    return entry


def _convert_layer(plan: Plan, lay, w: Writer) -> dict[str, Any]:
    t0 = time.perf_counter()
    experts = load_experts(plan, lay)
    dtype = lay.matrices[0].dtype
    result, aligned = plan.encoder.encode(experts, lay.matrices, dtype)
    layer, stats = emit_layer(lay, result, aligned, dtype, plan.emit)
    w.add_layer(layer)
    entry = layer_entry(lay, stats, result.permutations)
    bary = getattr(plan.encoder, "last_barycenter", None)
    if bary:
        entry["barycenter"] = bary
    entry["seconds"] = time.perf_counter() - t0
    return entry


def summarize(report: dict[str, Any], file_size: int) -> dict[str, Any]:
    """Whole-model totals of a report: parameters and bytes kept, both budget conventions, errors."""
    layers = report["layers"]
    errs = [e for lay in layers for s in lay["matrices"].values() for e in s["rel_error"]]
    params = sum(lay["params"] for lay in layers)
    src_bytes = sum(lay["source_bytes"] for lay in layers)
    stored = sum(lay["bytes"] for lay in layers)
    kept = sum(lay["kept"] for lay in layers)
    keep = kept / params if params else None
    residual_kept = sum(s["residual_kept"] for lay in layers for s in lay["matrices"].values())
    return {"compressed_layers": len(layers), "expert_params": params, "kept_params": kept,
            "kept_fraction": keep, "keep": keep, "residual_keep": residual_kept / params if params else None,
            "expert_bytes_source": src_bytes, "expert_bytes_stored": stored,
            "expert_bytes_fraction": (stored / src_bytes) if src_bytes else None,
            "rel_error_mean": float(np.mean(errs)) if errs else None,
            "rel_error_max": float(np.max(errs)) if errs else None, "file_bytes": file_size}


def check_shard_size(size: str | int | None) -> int | None:
    """``--max-shard-size`` in bytes (None: one file); a bad size is a ConversionError."""
    if size is None:
        return None
    try:
        return shards.parse_size(size)
    except ValueError as e:
        raise ConversionError(f"--max-shard-size: {e}") from None


def output_files(out: str | Path, max_shard_size: int | None) -> list[Path]:
    """The output paths known before the run: the file, and with sharding its index."""
    return [Path(out)] + ([shards.index_path(out)] if max_shard_size is not None else [])


def check_shard_inputs(out: str | Path, inputs) -> None:
    """Refuse a sharded output whose shard names (``OUT-00001-of-0000N.rmoe``, N unknown yet) could be an input."""
    from .paths import PathError

    parent = os.path.realpath(Path(out).parent)
    for p in inputs:
        for form in {os.path.abspath(p), os.path.realpath(p)}:
            if os.path.dirname(form) == parent and shards.is_shard_of(out, os.path.basename(form)):
                raise PathError(f"output {out}: its shards would be named like the input {p}; refusing to "
                                f"overwrite an input")


def check_bits_flags(o: ConvertOptions) -> bool:
    """Whether this is a --bits conversion; refuses the flags it cannot take, before any work."""
    if o.calibration is not None and o.bits is None and o.method != "d2moe":
        raise ConversionError("--calibration calibrates the --bits quantizer (or d2moe's base): give --bits too")
    for flag, on in (("--sparse-residuals", o.sparse_residuals), ("--lowrank-residuals", o.lowrank_residuals)):
        if on and (o.bits is None or o.method != "resmoe"):
            raise ConversionError(f"{flag} is a choice of the --bits allocator for --method resmoe: give --bits")
    if o.method == "quant" and o.bits is None:
        raise ConversionError("--method quant quantizes to a bit budget: give --bits B (bits per expert weight)")
    if o.bits is None:
        return False
    if not (isinstance(o.bits, (int, float)) and math.isfinite(o.bits) and o.bits > 0):
        raise ConversionError(f"--bits must be a positive number of bits per expert weight, got {o.bits}")
    if o.method not in ("resmoe", "quant", "d2moe"):
        raise ConversionError(f"--bits applies to --method resmoe, quant and d2moe, not {o.method}")
    if o.method == "d2moe" and (o.share_v or o.prune_base is not None):
        raise ConversionError("--bits with --method d2moe allocates per-expert k-quant factors: --share-v and "
                              "--prune-base are not available with it yet")
    given = [flag for flag, on in (("--keep", o.keep is not None), ("--residual-keep", o.residual_keep is not None),
                                   ("--rank", o.rank is not None), ("--residual", o.residual is not None),
                                   ("--residual-scope", o.residual_scope != "expert"),
                                   ("--value-dtype", o.value_dtype is not None),
                                   ("--base-dtype", o.base_dtype is not None),
                                   ("--delta-format", o.delta_format != "auto"), ("--lossless", o.lossless)) if on]
    if given:
        raise ConversionError(f"--bits chooses the size and every encoding itself: do not combine it with {given[0]}")
    return True


def check_d2moe_flags(o: ConvertOptions) -> None:
    """Refuse d2moe without calibration text, and its own flags with other methods, before any work."""
    if o.method != "d2moe":
        for flag, on in (("--share-v", o.share_v), ("--prune-base", o.prune_base is not None),
                         ("--allow-unrouted-experts", o.allow_unrouted_experts)):
            if on:
                raise ConversionError(f"{flag} is a D²-MoE option: use it with --method d2moe")
        return
    if o.calibration is None:
        raise ConversionError("--method d2moe merges the experts by Fisher information and whitens the deltas by "
                              "their inputs, both from text: give --calibration FILE.txt")
    if o.lossless:
        raise ConversionError("--lossless is not available with --method d2moe (its deltas are low rank)")
    if o.delta_format not in ("auto", "lowrank"):
        raise ConversionError(f"--method d2moe stores its deltas as low-rank factors: --delta-format must be auto or "
                              f"lowrank, not {o.delta_format}")
    if o.prune_base is not None and not (isinstance(o.prune_base, (int, float)) and math.isfinite(o.prune_base)
                                         and 0 < o.prune_base < 1):
        raise ConversionError(f"--prune-base must be a fraction in (0, 1) of the base's channels, got {o.prune_base}")


def write_report(report: dict[str, Any], path: str | Path) -> None:
    """Write the report as JSON (``--report``), atomically."""
    publish.write_bytes(path, (json.dumps(report, indent=1) + "\n").encode())


__all__ = ["ConvertOptions", "convert", "Plan", "write_report"]
