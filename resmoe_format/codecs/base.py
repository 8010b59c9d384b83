"""What every residual/base encoding shares: the encoded record, validation helpers,
value-dtype conversion, int8 quantization and the ``quant`` record of int8 and k-quant values.

An encoded matrix is a set of named *parts* (numpy arrays that become tensors in the
file) plus small JSON *params*. Every codec is a class with the same four methods:
``encode``, ``decode``, ``check_layout`` (shapes/dtypes only, no data touched) and
``predict_nbytes`` (exact size from counts, used by ``auto``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .. import dtypes
from ..errors import RmoeFormatError
from . import kquant
from .kquant import KqLayout

#: Kind of each part name (its accounting category for float and int8 values; see :func:`part_category`).
PART_CATEGORY = {
    "values": "residual_values",
    "u": "residual_values",
    "v": "residual_values",
    "indices": "residual_index",
    "indptr": "residual_index",
    "mask": "residual_index",
    "quotients": "residual_index",
    "remainders": "residual_index",
    "scales": "scales",
    "u_scales": "scales",
    "v_scales": "scales",
    "group_scales": "group_scales",
    "u_group_scales": "group_scales",
    "v_group_scales": "group_scales",
    "sign": "coded_signs",
    "head": "coded_heads",
    "escapes": "coded_heads",
    "tail": "coded_tails",
}
VALUE_PARTS = ("values", "u", "v")

QUANT_SCHEMES = ("per_row", "per_block")
SCALE_DTYPES = ("fp32", "fp16", "bf16")
INT8_MAX = 127


@dataclass
class Quant:
    """int8 quantization of a values array: symmetric, one fp scale per group."""

    scheme: str = "per_row"  # "per_row" or "per_block"
    block: int | None = None  # group size for per_block
    scale_dtype: str = "fp32"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"scheme": self.scheme, "scale_dtype": self.scale_dtype}
        if self.scheme == "per_block":
            d["block"] = self.block
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> "Quant":
        if not isinstance(d, dict):
            raise RmoeFormatError(f"{where}: quant must be an object")
        scheme = d.get("scheme")
        if scheme not in QUANT_SCHEMES:
            raise RmoeFormatError(f"{where}: unknown quant scheme {scheme!r}")
        block = d.get("block")
        if scheme == "per_block" and not (_is_int(block) and 1 <= block <= 2**31):
            raise RmoeFormatError(f"{where}: per_block quant needs an integer block >= 1, got {block!r}")
        sd = d.get("scale_dtype", "fp32")
        if sd not in SCALE_DTYPES:
            raise RmoeFormatError(f"{where}: scale_dtype {sd!r} is not one of {SCALE_DTYPES}")
        return cls(scheme, block if scheme == "per_block" else None, sd)

    def validate(self) -> None:
        if self.scheme not in QUANT_SCHEMES:
            raise ValueError(f"quant scheme must be one of {QUANT_SCHEMES}, got {self.scheme!r}")
        if self.scheme == "per_block" and not (_is_int(self.block) and self.block >= 1):
            raise ValueError("per_block quant needs block >= 1")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}")


#: The ``quant`` record of a value part: int8 scales, or the layout of k-quant codes.
AnyQuant = Quant | KqLayout


def parse_quant(d: Any, where: str, value_dtype: str) -> AnyQuant | None:
    """The ``quant`` member of an encoded record (None when absent or null), checked against the value
    dtype: the ``kquant`` scheme goes with the k-quant value dtypes and with nothing else (spec 4.8)."""
    if d is None:
        if kquant.is_kquant(value_dtype):
            raise RmoeFormatError(f"{where}: value_dtype {value_dtype} needs a quant record with scheme kquant")
        return None
    if isinstance(d, dict) and d.get("scheme") == "kquant":
        if not kquant.is_kquant(value_dtype):
            raise RmoeFormatError(f"{where}: quant scheme kquant is only for the k-quant value dtypes "
                                  f"{', '.join(kquant.KQ_DTYPES)}, not {value_dtype}")
        return KqLayout.from_json(d, where)
    if kquant.is_kquant(value_dtype):
        raise RmoeFormatError(f"{where}: value_dtype {value_dtype} needs quant scheme kquant")
    return Quant.from_json(d, where)


def default_quant(value_dtype: str, quant: AnyQuant | None) -> AnyQuant | None:
    """The quant record an encoder writes: the given one, or the default for int8 (per_row fp32) and
    k-quant values (``KqLayout()``); None for float values (a given one is ignored there)."""
    if kquant.is_kquant(value_dtype):
        quant = KqLayout() if quant is None else quant
        if not isinstance(quant, KqLayout):
            raise ValueError(f"value_dtype {value_dtype} takes a KqLayout quant, got {quant!r}")
        quant.validate()
        return quant
    if value_dtype == "int8":
        quant = Quant() if quant is None else quant
        if not isinstance(quant, Quant):
            raise ValueError(f"value_dtype int8 takes a Quant (per_row or per_block), got {quant!r}")
        quant.validate()
        return quant
    return None


def part_category(part: str, value_dtype: str, base: bool) -> str:
    """Accounting category (spec 8) of part ``part`` of a record with this value dtype; ``base``: a base record.
    Raises KeyError for an unknown part name."""
    kind = PART_CATEGORY[part]
    kq = kquant.is_kquant(value_dtype)
    if part in VALUE_PARTS:
        return ("barycenter_codes" if base else "residual_codes") if kq else ("barycenters" if base else kind)
    if kind == "scales" and kq:
        return "superblock_scales"
    return {"residual_index": "residual_indices"}.get(kind, kind)


@dataclass
class Encoded:
    """One encoded matrix: its encoding, logical 2-D shape, value dtype, parts and params."""

    encoding: str
    shape: tuple[int, int]
    value_dtype: str
    parts: dict[str, np.ndarray]
    params: dict[str, Any] = field(default_factory=dict)
    quant: AnyQuant | None = None

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.parts.values())


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def value_storage_dtype(value_dtype: str) -> str:
    """The dtype the values tensor is stored in (int8 values as i8, k-quant codes as u8)."""
    if value_dtype not in dtypes.VALUE_DTYPES:
        raise RmoeFormatError(f"value_dtype {value_dtype!r} is not one of {dtypes.VALUE_DTYPES}")
    return "i8" if value_dtype == "int8" else "u8" if kquant.is_kquant(value_dtype) else value_dtype


def value_bytes(value_dtype: str) -> int:
    return dtypes.by_name(value_storage_dtype(value_dtype)).itemsize


def to_value_dtype(x: np.ndarray, value_dtype: str) -> np.ndarray:
    """Round float values to a float value dtype (round to nearest even); reject overflow."""
    with np.errstate(over="ignore"):
        out = np.asarray(x, dtype=np.float32).astype(dtypes.by_name(value_dtype).np)
    if value_dtype == "fp16" and not np.isfinite(out).all() and np.isfinite(x).all():
        raise ValueError("values overflow fp16 (|x| > 65504); use bf16 or fp32")
    return out


# ---- int8 quantization -------------------------------------------------------------

def group_absmax_contiguous(absvals: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Max of consecutive segments of ``absvals`` of the given lengths (0 for empty)."""
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros(len(counts), dtype=np.float32)
    nonempty = counts > 0
    if absvals.size and nonempty.any():
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]
        out[nonempty] = np.maximum.reduceat(absvals, starts)
    return out


def scales_from_absmax(absmax: np.ndarray, scale_dtype: str) -> np.ndarray:
    """Scale = absmax / 127 rounded to the scale dtype."""
    s = (absmax.astype(np.float32) / np.float32(INT8_MAX)).astype(dtypes.by_name(scale_dtype).np)
    return s


def quantize_with(values: np.ndarray, scale_per_value: np.ndarray) -> np.ndarray:
    """q = clip(rint(v / s), -127, 127); 0 where s == 0."""
    s = scale_per_value.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(values.astype(np.float32) / s)
    q = np.where(s == 0, 0, q)
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8)


def dequantize_with(q: np.ndarray, scale_per_value: np.ndarray) -> np.ndarray:
    """v = float32(q) * float32(s): one IEEE multiply per element."""
    return q.astype(np.float32) * scale_per_value.astype(np.float32)


def quantize_flat_blocks(flat: np.ndarray, block: int, scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """per_block quantization of a flat values array: groups of ``block`` consecutive values."""
    n = flat.size
    ng = -(-n // block)
    counts = np.full(ng, block, dtype=np.int64)
    if ng:
        counts[-1] = n - block * (ng - 1)
    scales = scales_from_absmax(group_absmax_contiguous(np.abs(flat.astype(np.float32)), counts), scale_dtype)
    per_value = np.repeat(scales.astype(np.float32), counts)
    return quantize_with(flat, per_value), scales


def block_scale_per_value(scales: np.ndarray, n: int, block: int) -> np.ndarray:
    return np.repeat(scales.astype(np.float32), block)[:n]


def n_block_groups(n: int, block: int) -> int:
    return -(-n // block)


# ---- layout checks -----------------------------------------------------------------

def check_part(parts: Mapping[str, Any], names: Mapping[str, str], part: str,
               shape: tuple[int, ...], allowed: tuple[str, ...]) -> None:
    """A part exists, has one of the allowed dtypes and exactly this shape."""
    tname = names.get(part, part)
    if part not in parts:
        raise RmoeFormatError(f"tensor for part {part!r} ({tname}) is missing")
    info = parts[part]
    dt, shp = info
    if dt not in allowed:
        raise RmoeFormatError(f"tensor {tname}: dtype {dt} not allowed here (expected one of {allowed})")
    if tuple(shp) != tuple(shape):
        raise RmoeFormatError(f"tensor {tname}: shape {list(shp)} but the schema implies {list(shape)}")


def check_no_extra(parts: Mapping[str, Any], names: Mapping[str, str], expected: set[str], encoding: str) -> None:
    extra = set(parts) - expected
    if extra:
        raise RmoeFormatError(f"{encoding}: unexpected parts {sorted(extra)} "
                              f"({', '.join(names.get(p, p) for p in sorted(extra))})")


def value_allowed(value_dtype: str) -> tuple[str, ...]:
    return (value_storage_dtype(value_dtype),)


def check_values(parts, names, value_dtype: str, quant: AnyQuant | None, part: str,
                 shape: tuple[int, ...], row_groups: int) -> set[str]:
    """Check value part ``part`` holding ``shape`` values (and its scales parts); return the part names used.

    Float and int8 values are one tensor of that shape (int8 with a scales part, 5.8); k-quant values are
    three tensors whose shapes follow from the number of values (5.10)."""
    n_values = 1
    for d in shape:
        n_values *= d
    if kquant.is_kquant(value_dtype):
        if not isinstance(quant, KqLayout):
            raise RmoeFormatError(f"value_dtype {value_dtype} needs a kquant quant record ({names.get(part, part)})")
        codes, gs, ss = kquant.part_names(part)
        check_part(parts, names, codes, (kquant.codes_nbytes(n_values, value_dtype),), ("u8",))
        check_part(parts, names, gs, (kquant.group_scales_nbytes(n_values, quant),), ("u8",))
        check_part(parts, names, ss, (quant.n_super(n_values), 2), ("fp16",))
        return {codes, gs, ss}
    check_part(parts, names, part, shape, value_allowed(value_dtype))
    return {part} | _check_int8_scales(parts, names, quant, value_dtype, part, row_groups, n_values)


def _check_int8_scales(parts, names, quant: AnyQuant | None, value_dtype: str, part: str,
                       row_groups: int, n_values: int) -> set[str]:
    """Check the scales part that goes with int8 values part ``part``; return the part names used."""
    scale_part = "scales" if part == "values" else f"{part}_scales"
    if value_dtype != "int8":
        if quant is not None:
            raise RmoeFormatError(f"quant given for float value_dtype {value_dtype} ({names.get(part, part)})")
        return set()
    if not isinstance(quant, Quant):
        raise RmoeFormatError(f"value_dtype int8 needs a per_row or per_block quant record ({names.get(part, part)})")
    n = row_groups if quant.scheme == "per_row" else n_block_groups(n_values, quant.block)
    check_part(parts, names, scale_part, (n,), (quant.scale_dtype,))
    return {scale_part}


def stored_count(enc: Encoded) -> int:
    """Number of values in the packed ``values`` part of a bitmap or rice record: ``params.nnz`` for
    k-quant values (their packed codes do not give it), else the length of ``values``."""
    return enc.params["nnz"] if kquant.is_kquant(enc.value_dtype) else int(enc.parts["values"].size)


def fail(tname: str, msg: str) -> RmoeFormatError:
    return RmoeFormatError(f"tensor {tname}: {msg}")

