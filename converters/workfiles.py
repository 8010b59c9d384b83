"""The work directory's records beside the layer parts (:mod:`.distributed`): calibration statistics and
``--bits`` rate–distortion tables, one safetensors file per compressed layer, checksummed and published
atomically (a half-written record is only a hidden temporary).

``cal-00003.safetensors``: what the per-layer work of a calibrated conversion needs of layer 3, recorded by
rank 0's forward pass (and d2moe's Fisher backward pass): the layer's routed inputs ``x`` (tokens, hidden,
float32) and ``index`` (tokens, k), and for d2moe the routing frequencies ``freq`` and the Fisher-merged base
``base.<matrix>``. ``table-00003.safetensors``: layer 3's rate–distortion table
(:class:`.encoders.allocate.LayerTable`, its arrays ``m<i>.*``; every rank reads every table), and for
``--method resmoe`` ``base-00003.safetensors``: the barycenter ``base.<matrix>`` and permutations ``perm.<k>``
that pass 2 encodes against (read by the rank that encodes the layer).

A record's safetensors metadata ``resmoe-work`` (JSON) holds its kind, the conversion's key
(:func:`.distributed.part_key`), the layer, its fields and the CRC-32 of every tensor; it is used only when
all of them check. Every value round-trips exactly, so a layer computed from records is the one a single
process computes from memory.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resmoe_format.errors import RmoeFormatError
from resmoe_format.publish import atomic_path

from .encoders.allocate import LayerTable, MatrixTable
from .encoders.calibrate import LayerInputs
from .encoders.fisher import LayerStats
from .errors import ConversionError

META = "resmoe-work"
CAL, TABLE, BASE = "cal", "table", "base"


def record_path(work: Path, kind: str, index: int) -> Path:
    return work / f"{kind}-{index:05d}.safetensors"


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


def save_record(path: Path, kind: str, key: str, index: int, tensors: dict[str, np.ndarray],
                fields: dict[str, Any]) -> None:
    """Write a record atomically."""
    from safetensors.numpy import save_file

    arrays = {n: np.ascontiguousarray(a) for n, a in tensors.items()}
    meta = {"kind": kind, "key": key, "layer": index, "fields": fields,
            "crc32": {n: _crc(a) for n, a in arrays.items()}}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata={META: json.dumps(meta)})


def load_record(path: Path, kind: str, key: str, index: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, fields) of a record; RmoeFormatError unless it is a complete, verified ``kind`` record of layer
    ``index`` made with ``key``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})[META])
            arrays = {n: f.get_tensor(n) for n in f.keys()}
    except Exception as e:  # missing, truncated or foreign: safetensors raises its own error types
        raise RmoeFormatError(f"{path}: not a readable work record ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or (meta.get("kind"), meta.get("key"), meta.get("layer")) != (kind, key, index):
        raise RmoeFormatError(f"{path}: not a {kind} record of layer {index} of this conversion")
    crcs = meta.get("crc32")
    if not isinstance(crcs, dict) or set(crcs) != set(arrays):
        raise RmoeFormatError(f"{path}: its checksums do not name its tensors")
    for n, a in arrays.items():
        if _crc(a) != crcs[n]:
            raise RmoeFormatError(f"{path}: tensor {n} fails its CRC-32")
    return arrays, meta["fields"]


def valid(path: Path, kind: str, key: str, index: int) -> bool:
    """Whether ``path`` is a complete, verified record (nothing is removed)."""
    try:
        load_record(path, kind, key, index)
    except RmoeFormatError:
        return False
    return True


def _load(work: Path, kind: str, key: str, index: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = record_path(work, kind, index)
    try:
        return load_record(path, kind, key, index)
    except RmoeFormatError as e:
        what = {CAL: "calibration record", TABLE: "rate–distortion table", BASE: "--bits base record"}[kind]
        raise ConversionError(f"layer {index}: its {what} is missing or damaged ({e}); rerun with --resume") from None


# ---- calibration ---------------------------------------------------------------------------------------------

class Rows:
    """A record's recorded inputs in memory, read as a :class:`.encoders.layerwise.Spill` is."""

    def __init__(self, a: np.ndarray):
        self.a, self.shape = a, a.shape

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.a[start:stop]


def save_calibration(work: Path, key: str, lay, inputs: LayerInputs, stats: LayerStats | None = None) -> None:
    """Layer ``lay``'s recorded inputs (and with ``stats``, d2moe's frequencies and Fisher base)."""
    tensors = {"x": inputs.rows.read(0, inputs.tokens), "index": inputs.index.cpu().numpy()}
    if stats is not None:
        tensors["freq"] = np.asarray(stats.freq)
        tensors.update({f"base.{m}": t.detach().cpu().numpy() for m, t in stats.base.items()})
    save_record(record_path(work, CAL, lay.index), CAL, key, lay.index, tensors,
                {"tokens": inputs.tokens, "base": None if stats is None else list(stats.base)})


def load_calibration(work: Path, key: str, lay, device: torch.device) -> LayerStats:
    """Layer ``lay``'s calibration record (``freq`` and ``base`` None unless it is d2moe's); ConversionError
    when it is missing or damaged."""
    t, fields = _load(work, CAL, key, lay.index)
    inputs = LayerInputs(Rows(t["x"]), int(fields["tokens"]), torch.from_numpy(t["index"]))
    if fields["base"] is None:
        return LayerStats(inputs, None, None)
    return LayerStats(inputs, t["freq"], {m: torch.from_numpy(t[f"base.{m}"]).to(device) for m in fields["base"]})


# ---- --bits tables -------------------------------------------------------------------------------------------

def save_table(work: Path, key: str, table: LayerTable, base: tuple | None, tokens: int | None) -> None:
    """A layer's rate–distortion table with its calibration token count (None without calibration), and its
    (barycenter, permutations) ``base`` if any as a record of its own."""
    tensors: dict[str, np.ndarray] = {}
    mats = []
    for i, t in enumerate(table.matrices):
        p = f"m{i}."
        tensors[p + "direct_bytes"], tensors[p + "direct_error"] = t.direct_bytes, t.direct_error
        for name in ("aligned_error", "residual_bytes"):
            if getattr(t, name) is not None:
                tensors[p + name] = getattr(t, name)
        for bw, e in t.residual_error.items():
            tensors[f"{p}residual_error.{bw}"] = e
        mats.append({"name": t.name, "base_bytes": t.base_bytes, "residual_error": list(t.residual_error)})
    if base is not None:
        b, perms = base
        tb = {f"base.{m}": v.detach().cpu().numpy() for m, v in b.items()}
        tb.update({f"perm.{k}": np.asarray(q) for k, q in enumerate(perms or [])})
        save_record(record_path(work, BASE, table.index), BASE, key, table.index, tb,
                    {"matrices": list(b), "permutations": None if perms is None else len(perms)})
    fields = {"permutation_bytes": table.permutation_bytes, "matrices": mats, "tokens": tokens,
              "base": base is not None}
    save_record(record_path(work, TABLE, table.index), TABLE, key, table.index, tensors, fields)


def table_done(work: Path, key: str, index: int) -> tuple[bool, bool]:
    """(whether layer ``index``'s table record is there and verified, whether its base record is too or it has
    none)."""
    try:
        _, fields = load_record(record_path(work, TABLE, index), TABLE, key, index)
    except RmoeFormatError:
        return False, False
    return True, not fields["base"] or valid(record_path(work, BASE, index), BASE, key, index)


def load_table(work: Path, key: str, index: int) -> tuple[LayerTable, int | None]:
    """(table, calibration tokens or None) of layer ``index``; ConversionError when the record is missing or
    damaged."""
    t, fields = _load(work, TABLE, key, index)
    mats = []
    for i, m in enumerate(fields["matrices"]):
        p = f"m{i}."
        mats.append(MatrixTable(m["name"], t[p + "direct_bytes"], t[p + "direct_error"], t.get(p + "aligned_error"),
                                {k: int(v) for k, v in m["base_bytes"].items()}, t.get(p + "residual_bytes"),
                                {bw: t[f"{p}residual_error.{bw}"] for bw in m["residual_error"]}))
    return LayerTable(index, int(fields["permutation_bytes"]), mats), fields["tokens"]


def load_base(work: Path, key: str, index: int, device: torch.device) -> tuple | None:
    """Layer ``index``'s (barycenter, permutations) if its table says it has one; ConversionError when a record
    is missing or damaged."""
    if not _load(work, TABLE, key, index)[1]["base"]:
        return None
    t, fields = _load(work, BASE, key, index)
    perms = None if fields["permutations"] is None else [t[f"perm.{k}"] for k in range(fields["permutations"])]
    return {m: torch.from_numpy(t[f"base.{m}"]).to(device) for m in fields["matrices"]}, perms


__all__ = ["record_path", "save_record", "load_record", "valid", "save_calibration", "load_calibration",
           "save_table", "table_done", "load_table", "load_base", "CAL", "TABLE", "BASE"]
