"""``resmoe-export FILE --to compressed-tensors OUTDIR --scheme w4a16|w8a16``: a Hugging Face
checkpoint in the compressed-tensors format, as vLLM and SGLang load it.

The experts are restored from the ``.rmoe`` file (original neuron order) and quantized by the
``compressed-tensors`` package itself: symmetric integer weights with one scale per group of
``group_size`` input columns (``calculate_qparams`` on each group's range), packed into int32 by
its ``pack-quantized`` compressor (``weight_packed``, ``weight_scale``, ``weight_shape``), the
layout vLLM runs through its Marlin MoE kernels. Every other tensor is written as the source had
it, and listed in the config's ``ignore``; ``config.json`` gets the ``quantization_config`` the
package's ``ModelCompressor`` writes. Shards of at most ``shard_bytes`` with a
``model.safetensors.index.json`` when there is more than one; the embedded tokenizer and
generation files are copied. The directory is built beside OUTDIR and renamed into place.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

import resmoe_format
from resmoe_format import publish, restore
from resmoe_format.architectures import BY_MODEL_TYPE, SWITCH, Family, check_layers
from resmoe_format.stream import StreamingWriter

from ..errors import ConversionError

#: ``--scheme``: weight bits of compressed-tensors' ``W<bits>A16`` presets (16-bit activations).
SCHEMES = {"w4a16": 4, "w8a16": 8}
DEFAULT_GROUP_SIZE = 128
#: Largest shard (bytes) before the checkpoint is split, as transformers' save_pretrained default.
SHARD_BYTES = 5 * 10**9
#: Families vLLM and SGLang do not serve as a compressed-tensors MoE, with the reason.
REFUSED = {SWITCH.name: "an encoder-decoder model; vLLM and SGLang serve decoder-only MoE models"}


def refusal(f: Family) -> str | None:
    """Why a family is not exported to compressed-tensors, or None when it is."""
    if f.name in REFUSED:
        return REFUSED[f.name]
    if not all(r.per_expert for r in f.source):
        return "experts stacked in 3-D tensors with biases, not the per-expert Linear layers pack-quantized takes"
    return None


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ConversionError("compressed-tensors export needs the compressed-tensors package: "
                              "pip install 'resmoe[export]'") from None


def quant_scheme(scheme: str, group_size: int):
    """The compressed-tensors QuantizationScheme of ``--scheme`` with ``group_size`` (targets Linear)."""
    _ct()
    from compressed_tensors.quantization import preset_name_to_scheme

    if scheme not in SCHEMES:
        raise ConversionError(f"--scheme {scheme!r} is not supported; supported: {', '.join(SCHEMES)} (vLLM's "
                              "Marlin MoE kernels run int4 and int8 weights with 16-bit activations)")
    if group_size < 1:
        raise ConversionError(f"--group-size {group_size}: must be a positive number of input columns")
    s = preset_name_to_scheme(scheme.upper(), ["Linear"])
    s.weights.group_size = group_size
    return s


def quantize_weight(w, scheme) -> dict[str, Any]:
    """One (out, in) weight quantized and packed by compressed-tensors' pack-quantized compressor:
    ``weight_packed`` (int32), ``weight_scale`` (out, in / group, in ``w``'s dtype), ``weight_shape``."""
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    g = scheme.weights.group_size
    groups = w.float().reshape(w.shape[0], w.shape[1] // g, g)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    scale = scale.to(w.dtype)
    # a group of zeros has scale 0; any positive scale encodes it exactly
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    return compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero.to(torch.int8)},
                               scheme)


def _module(name: str) -> str:
    return name[:-len(".weight")] if name.endswith(".weight") else name


def export_compressed_tensors(src: str | os.PathLike, outdir: str | os.PathLike, scheme: str = "w4a16",
                              group_size: int = DEFAULT_GROUP_SIZE, shard_bytes: int = SHARD_BYTES,
                              progress: bool = False, ignore_ce: bool = False) -> Path:
    """Write ``src`` (.rmoe) as a compressed-tensors checkpoint directory ``outdir`` (module docstring).

    ``outdir`` must not exist or be empty; a failure leaves nothing. Architectures vLLM would not
    serve this way, a group size that does not divide every expert matrix's input width and an
    unknown scheme are :class:`ConversionError` before any output exists.
    """
    from resmoe_format.torch.tensors import to_torch

    from ..convert import to_numpy
    from ..paths import check_paths, rmoe_inputs

    check_paths(rmoe_inputs(src), dirs=[outdir], forceable=False)
    sch = quant_scheme(scheme, group_size)
    fmt = _format()
    sch.format = fmt
    out = Path(outdir)
    with resmoe_format.open(src) as r:
        if not ignore_ce:
            from resmoe_format.compressed_experts import refuse_ce

            refuse_ce(r, "a compressed-tensors checkpoint (vLLM, SGLang)", ConversionError)
        cfg = r.config()
        if cfg is None:
            raise ConversionError(f"{src} embeds no config.json: a compressed-tensors checkpoint needs it")
        fam = BY_MODEL_TYPE.get(cfg.get("model_type"))
        if fam is None:
            raise ConversionError(f"compressed-tensors export does not support model_type {cfg.get('model_type')!r}")
        why = refusal(fam)
        if why:
            raise ConversionError(f"compressed-tensors export does not support {fam.name}: {why}")
        check_layers(fam, r.layers, ConversionError)
        experts = _expert_widths(r, fam)
        bad = sorted({f"{k} (input width {n})" for k, n in experts.items() if n % group_size})
        if bad:
            raise ConversionError(f"--group-size {group_size} does not divide the input width of "
                                  f"{len(bad)} expert matrices, e.g. {bad[0]}; choose a divisor of every width")
        total = len(r.schema.passthrough) + sum(len(fam.source_specs(lay.prefix, lay)) for lay in r.layers)
        bar = _progress(progress, total)
        with publish.atomic_dir(os.path.realpath(out)) as tmp:
            ignore = _write_tensors(r, fam, tmp, sch, shard_bytes, to_torch, to_numpy, bar)
            ignore = _with_transformers_names(r, ignore)
            for rel, data in r.files.items():
                if rel != "config.json":
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    publish.write_bytes(tmp / rel, data)
            _write_config(tmp, cfg, sch, ignore)
        bar.close()
    return out


def _format() -> str:
    from compressed_tensors.config import CompressionFormat

    return CompressionFormat.pack_quantized.value


def _progress(on: bool, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="compressed-tensors", unit="tensor", disable=not on, leave=False)


def _expert_widths(r, fam: Family) -> dict[str, int]:
    """Input width of every expert Linear weight (compressed layers' and passthrough experts')."""
    widths = {}
    for lay in r.layers:
        for spec in fam.source_specs(lay.prefix, lay):
            if spec.name.endswith(".weight") and len(spec.shape) == 2:
                widths[spec.name] = spec.shape[1]
    for name in r.schema.passthrough:
        if fam.match_expert_tensor(name) is not None and name.endswith(".weight"):
            widths[name] = r.tensor(name).shape[1]
    return widths


def _is_expert_weight(fam: Family, name: str, a: np.ndarray) -> bool:
    return fam.match_expert_tensor(name) is not None and name.endswith(".weight") and a.ndim == 2


def _write_tensors(r, fam: Family, base: Path, sch, shard_bytes: int, to_torch, to_numpy, bar) -> list[str]:
    """Every tensor, expert weights quantized, into shards of at most ``shard_bytes`` (one tensor
    larger than that has a shard of its own); returns the modules left unquantized."""
    done: list[tuple[Path, list[str]]] = []  # committed shards under temporary names
    cur: StreamingWriter | None = None
    names: list[str] = []
    size = 0
    ignore: list[str] = []

    def close() -> None:
        nonlocal cur, names
        if cur is not None:
            cur.commit({"format": "pt"})
            done.append((cur.path, names))
        cur, names = None, []

    def put(name: str, a: np.ndarray) -> None:
        nonlocal cur, size
        if cur is not None and size + a.nbytes > shard_bytes:
            close()
        if cur is None:
            cur, size = StreamingWriter(base / f".part-{len(done):05d}.safetensors"), 0
        cur.put(name, a)
        names.append(name)
        size += a.nbytes

    try:
        for name, a in restore.restore_all(r, original_order=True):
            if _is_expert_weight(fam, name, a):
                for k, v in quantize_weight(to_torch(np.asarray(a), copy=True), sch).items():
                    put(f"{_module(name)}.{k}", to_numpy(v))
            else:
                if name.endswith(".weight") and a.ndim == 2:
                    ignore.append(_module(name))
                put(name, np.asarray(a))
            bar.update(1)
        close()
    except BaseException:
        if cur is not None:
            cur.abort()
        raise
    n = len(done)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for (path, tensors), fname in zip(done, final):
        os.replace(path, base / fname)
        weight_map.update(dict.fromkeys(tensors, fname))
    if n > 1:
        total = sum((base / f).stat().st_size for f in final)
        publish.write_bytes(base / "model.safetensors.index.json", (json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"
        ).encode())
    return ignore


def _with_transformers_names(r, modules: list[str]) -> list[str]:
    """The unquantized modules under their checkpoint names (what vLLM and SGLang match) and, where
    transformers renames one when it loads (Phi-MoE's ``block_sparse_moe.gate`` is ``mlp.router``),
    under that name too, so that transformers leaves it unquantized as well."""
    from resmoe_format.torch.load import model_tensor_names

    renamed = model_tensor_names(r, [f"{m}.weight" for m in modules])
    return sorted(set(modules) | {_module(n) for n in renamed.values()})


def _write_config(base: Path, cfg: dict, sch, ignore: list[str]) -> None:
    """config.json with the quantization_config compressed-tensors' ModelCompressor writes."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    publish.write_bytes(base / "config.json", (json.dumps(cfg, indent=2) + "\n").encode())
    qc = QuantizationConfig(config_groups={"group_0": sch}, format=sch.format, ignore=sorted(ignore),
                            quantization_status=QuantizationStatus.COMPRESSED)
    ModelCompressor(quantization_config=qc).update_config(str(base))
