"""Reading and writing the safetensors framing: 8-byte length, JSON header, data buffer.

The reader trusts nothing: every size, offset, shape and dtype is checked against the
file size before any tensor byte is touched (spec/FORMAT.md, section 2).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from . import dtypes
from .errors import RmoeFormatError

#: Largest header accepted (the safetensors reference refuses more than 100 MB too).
MAX_HEADER = 100 * 1024 * 1024
HEADER_ALIGN = 8


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # format dtype name
    shape: tuple[int, ...]
    begin: int  # offset in the data buffer
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Header:
    header_len: int  # N, the JSON header's length in bytes
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]  # in data-offset order

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def parse_json(text: str | bytes, what: str) -> Any:
    """Parse strict JSON (RFC 8259): no ``NaN``/``Infinity``, no object with two members of one name.

    Any problem is an :class:`RmoeFormatError` whose message starts with ``what``.
    """
    def no_dupes(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise RmoeFormatError(f"{what}: key {k!r} appears twice in one object")
            d[k] = v
        return d

    def no_constant(name: str):
        raise RmoeFormatError(f"{what}: {name} is not valid JSON")

    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=no_dupes, parse_constant=no_constant)
    except RmoeFormatError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RmoeFormatError(f"{what} is not valid UTF-8 JSON: {e}") from None


def read_header(f: BinaryIO, file_size: int) -> Header:
    """Parse and validate the safetensors header of an open file of ``file_size`` bytes."""
    if file_size < 8:
        raise RmoeFormatError(f"file is {file_size} bytes: too short for a safetensors header length")
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER:
        raise RmoeFormatError(f"header length {n} exceeds the {MAX_HEADER}-byte limit")
    if 8 + n > file_size:
        raise RmoeFormatError(f"header length {n} runs past the end of the {file_size}-byte file (truncated?)")
    raw = f.read(n)
    if len(raw) != n:
        raise RmoeFormatError("header: short read (file truncated?)")
    doc = parse_json(raw, "header")
    if not isinstance(doc, dict):
        raise RmoeFormatError("header must be a JSON object")
    meta = doc.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise RmoeFormatError("header: __metadata__ must map strings to strings")
    data_len = file_size - 8 - n
    entries = []
    for name, e in doc.items():
        entries.append(_entry(name, e, data_len))
    entries.sort(key=lambda t: (t.begin, t.end))
    pos = 0
    for t in entries:
        if t.begin != pos:
            what = "overlaps the previous tensor" if t.begin < pos else f"leaves a gap at data offset {pos}"
            raise RmoeFormatError(f"tensor {t.name}: data_offsets [{t.begin}, {t.end}] {what}")
        pos = t.end
    if pos != data_len:
        raise RmoeFormatError(f"tensors cover {pos} data bytes but the file holds {data_len} "
                              f"({'truncated' if pos > data_len else 'trailing bytes'})")
    return Header(n, dict(meta), {t.name: t for t in entries})


def _entry(name: str, e: Any, data_len: int) -> TensorEntry:
    if not isinstance(e, dict):
        raise RmoeFormatError(f"tensor {name}: header entry must be an object")
    dt = dtypes.by_st(e.get("dtype"), f"tensor {name}").name
    shape = e.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s for s in shape):
        raise RmoeFormatError(f"tensor {name}: shape must be a list of at most 8 non-negative integers")
    offs = e.get("data_offsets")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise RmoeFormatError(f"tensor {name}: data_offsets must be two integers")
    b, end = offs
    if not 0 <= b <= end <= data_len:
        raise RmoeFormatError(f"tensor {name}: data_offsets [{b}, {end}] outside the {data_len}-byte data buffer")
    numel = 1
    for s in shape:
        numel *= s
    if numel * dtypes.by_name(dt).itemsize != end - b:
        raise RmoeFormatError(f"tensor {name}: {dt} {shape} needs {numel * dtypes.by_name(dt).itemsize} bytes, "
                              f"data_offsets give {end - b}")
    return TensorEntry(name, dt, tuple(shape), b, end)


def encode_header(metadata: dict[str, str], entries: list[TensorEntry]) -> bytes:
    """The 8-byte length plus JSON header, padded with spaces so data starts 8-aligned."""
    doc: dict[str, Any] = {"__metadata__": metadata}
    for t in entries:
        doc[t.name] = {"dtype": dtypes.by_name(t.dtype).st, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % HEADER_ALIGN)
    if len(raw) > MAX_HEADER:
        raise RmoeFormatError(f"header would be {len(raw)} bytes, over the {MAX_HEADER}-byte limit")
    return struct.pack("<Q", len(raw)) + raw
