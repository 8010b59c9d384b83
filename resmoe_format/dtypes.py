"""Element types of the format: names, safetensors codes, numpy types, sizes."""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import RmoeFormatError


@dataclass(frozen=True)
class DType:
    name: str  # the format's name ("bf16"), used in the schema and on the CLI
    st: str  # the safetensors dtype code ("BF16")
    np: np.dtype
    itemsize: int


_ALL = [
    DType("bool", "BOOL", np.dtype(np.bool_), 1),
    DType("u8", "U8", np.dtype(np.uint8), 1),
    DType("i8", "I8", np.dtype(np.int8), 1),
    DType("u16", "U16", np.dtype("<u2"), 2),
    DType("i16", "I16", np.dtype("<i2"), 2),
    DType("fp16", "F16", np.dtype("<f2"), 2),
    DType("bf16", "BF16", np.dtype(ml_dtypes.bfloat16), 2),
    DType("u32", "U32", np.dtype("<u4"), 4),
    DType("i32", "I32", np.dtype("<i4"), 4),
    DType("fp32", "F32", np.dtype("<f4"), 4),
    DType("u64", "U64", np.dtype("<u8"), 8),
    DType("i64", "I64", np.dtype("<i8"), 8),
    DType("fp64", "F64", np.dtype("<f8"), 8),
    DType("f8_e4m3", "F8_E4M3", np.dtype(ml_dtypes.float8_e4m3fn), 1),
    DType("f8_e5m2", "F8_E5M2", np.dtype(ml_dtypes.float8_e5m2), 1),
]
BY_NAME = {d.name: d for d in _ALL}
BY_ST = {d.st: d for d in _ALL}

#: Group-wise integer codes with two-level scales (spec 5.10; ``codecs.kquant.KQ_DTYPES``, version 3.0).
KQUANT_DTYPES = ("ternary", "q2", "q3", "q4", "q5", "q6", "q8")
#: Value dtypes a residual or base may be stored in.
VALUE_DTYPES = ("bf16", "fp16", "fp32", "int8") + KQUANT_DTYPES
#: Float dtypes of source expert weights (and of restored output).
SOURCE_DTYPES = ("bf16", "fp16", "fp32")


def by_name(name: str, what: str = "dtype") -> DType:
    """Look up a format dtype name, raising RmoeFormatError for an unknown one."""
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        raise RmoeFormatError(f"{what}: unknown dtype {name!r}") from None


def by_st(code: str, what: str = "dtype") -> DType:
    """Look up a safetensors dtype code, raising RmoeFormatError for an unknown one."""
    try:
        return BY_ST[code]
    except (KeyError, TypeError):
        raise RmoeFormatError(f"{what}: unknown safetensors dtype {code!r}") from None


def of_array(a: np.ndarray) -> DType:
    """The format dtype of a numpy array (little-endian or native)."""
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    for d in _ALL:
        if d.np == dt:
            return d
    raise RmoeFormatError(f"numpy dtype {a.dtype} has no .rmoe equivalent")

