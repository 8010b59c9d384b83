"""Compressed GGUF (spec/GGUF_RMOE.md): a ``.rmoe`` file's tensors and schema in a GGUF container.

``rmoe_to_gguf`` stores every tensor of a ``.rmoe`` file (bases, permutations, residual parts,
passthrough tensors, embedded files, the checksum table) as a GGUF tensor holding the same bytes,
and the ``__metadata__`` plus a tensor name table as ``resmoe.*`` keys. ``gguf_to_rmoe`` rebuilds
the ``.rmoe`` file byte for byte, or fails. The file is for runtimes that implement ResMoE
restoration; stock llama.cpp refuses it (``general.architecture`` is ``resmoe``). Needs the
``gguf`` package (imported when used); every failure is a :class:`GgufRmoeError`.
"""
from __future__ import annotations

import io
import mmap
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import container, dtypes
from .container import META_FORMAT, META_SCHEMA, META_SCHEMA_CRC, META_VERSION
from .errors import GgufRmoeError, RmoeFormatError
from .publish import atomic_path, user_path
from .safetensors_header import TensorEntry, encode_header, read_header
from .schema import FORMAT_NAME

#: Version of this mapping (spec/GGUF_RMOE.md), independent of the .rmoe version it carries.
FORMAT_VERSION = "1.0"
READ_MAJOR = 1
ARCHITECTURE = "resmoe"
ALIGNMENT = 32
GGUF_VERSION = 3
MAX_NAME_BYTES = 63  # llama.cpp's GGML_MAX_NAME is 64 bytes, NUL included
MAX_GGUF_DIMS = 4  # GGML_MAX_DIMS

K_FORMAT_VERSION = "resmoe.format_version"
K_RMOE_VERSION = "resmoe.rmoe_version"
K_SCHEMA = "resmoe.rmoe_schema"
K_SCHEMA_CRC = "resmoe.rmoe_schema_crc32"
K_META_KEYS = "resmoe.metadata.keys"
K_META_VALUES = "resmoe.metadata.values"
K_GGUF_NAMES = "resmoe.tensors.gguf_names"
K_NAMES = "resmoe.tensors.names"
K_DTYPES = "resmoe.tensors.dtypes"
K_NDIMS = "resmoe.tensors.n_dims"
K_DIMS = "resmoe.tensors.dims"
K_HEADER = "resmoe.rmoe_header"
K_SIZE = "resmoe.rmoe_size"
K_CRC = "resmoe.rmoe_crc32"

#: .rmoe dtype -> GGML type of the same width. The bytes are stored unchanged, so the unsigned,
#: bool and fp8 dtypes, which GGML lacks, are bit-cast to the signed integer type of their width.
GGML_TYPE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "fp64": "F64", "i8": "I8", "i16": "I16",
             "i32": "I32", "i64": "I64", "bool": "I8", "u8": "I8", "f8_e4m3": "I8", "f8_e5m2": "I8",
             "u16": "I16", "u32": "I32", "u64": "I64"}
_STANDARD_META = (META_FORMAT, META_VERSION, META_SCHEMA, META_SCHEMA_CRC)
_COPY_CHUNK = 1 << 24


@dataclass(frozen=True)
class _Row:
    """One entry of the tensor table: a GGUF tensor and the .rmoe tensor it holds."""

    gguf_name: str
    name: str
    dtype: str  # .rmoe format dtype name (FORMAT.md 1.3)
    shape: tuple[int, ...]  # .rmoe shape, outermost dimension first

    @property
    def nbytes(self) -> int:
        n = dtypes.by_name(self.dtype).itemsize
        for s in self.shape:
            n *= s
        return n


def gguf_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The GGUF tensor's shape (numpy order): the .rmoe shape if GGML can hold it, else flattened.

    GGML tensors have 1 to 4 dimensions, and llama.cpp divides by the outer dimensions when
    checking sizes, so scalars, empty tensors and tensors of more than 4 dimensions are 1-D.
    """
    n = 1
    for s in shape:
        n *= s
    return tuple(shape) if 1 <= len(shape) <= MAX_GGUF_DIMS and n > 0 else (n,)


def gguf_names(names: list[str]) -> list[str]:
    """GGUF names for .rmoe names: the name itself if it fits in 63 UTF-8 bytes, else ``rmoe.t.{i}``."""
    fits = [len(n.encode("utf-8")) <= MAX_NAME_BYTES for n in names]
    taken = {n for n, f in zip(names, fits) if f}
    out = []
    for i, (n, f) in enumerate(zip(names, fits)):
        g, j = (n, 0) if f else (f"rmoe.t.{i}", 0)
        while not f and g in taken:
            j += 1
            g = f"rmoe.t.{i}.{j}"
        taken.add(g)
        out.append(g)
    return out


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GgufRmoeError("compressed GGUF needs the gguf package: pip install 'resmoe[export]'") from None
    return gguf


def _check_out(out: Path) -> None:
    if not out.parent.is_dir():
        raise GgufRmoeError(f"output directory {out.parent} does not exist")
    if out.is_dir():
        raise GgufRmoeError(f"output path {out} is a directory")


def _canonical_metadata(version: str, schema: str, schema_crc: str, extra: dict[str, str]) -> dict[str, str]:
    """``__metadata__`` in the reference writer's key order, then any other keys."""
    return {META_FORMAT: FORMAT_NAME, META_VERSION: version, META_SCHEMA: schema, META_SCHEMA_CRC: schema_crc,
            **extra}


# ---------------------------------------------------------------------------------------
# .rmoe -> GGUF

def rmoe_to_gguf(src: str | Path, out: str | Path) -> Path:
    """Write the ``.rmoe`` file ``src`` as a compressed GGUF at ``out``; returns ``out``.

    Every tensor keeps its bytes; nothing is restored. ``src`` is validated (header, schema,
    every tensor's CRC-32) first; on any failure nothing is left at ``out``.
    """
    src, out = Path(src), Path(out)
    _check_out(out)
    gguf = _gguf()
    try:
        if src.name.endswith(".json"):  # a sharded file's index (spec 11): each shard is a .rmoe file of its own
            raise GgufRmoeError(f"{src} is the index of a sharded .rmoe file; a compressed GGUF holds one .rmoe "
                                f"file: export each shard")
        with container.open(src, shard_only=True) as r:
            with open(src, "rb") as f:
                f.seek(8)
                raw_header = f.read(r.header.header_len)
                size, crc = _file_crc(f)
            if size != r.file_size:
                raise RmoeFormatError("the file changed while being read")
            with atomic_path(out) as tmp:
                _write_gguf(gguf, r, raw_header, size, crc, tmp)
    except GgufRmoeError:
        raise
    except RmoeFormatError as e:
        raise GgufRmoeError(f"{src}: {e}") from None
    except UnicodeEncodeError as e:
        raise GgufRmoeError(f"{src}: a name or metadata string is not valid Unicode ({e.reason})") from None
    return out


def _file_crc(f) -> tuple[int, int]:
    f.seek(0)
    size, crc = 0, 0
    while b := f.read(_COPY_CHUNK):
        size += len(b)
        crc = zlib.crc32(b, crc)
    return size, crc


def _write_gguf(gguf, r, raw_header: bytes, size: int, crc: int, path: Path) -> None:
    meta = r.header.metadata
    extra = {k: v for k, v in meta.items() if k not in _STANDARD_META}
    entries = list(r.header.tensors.values())  # data order: the checksum table's order too
    canonical = encode_header(_canonical_metadata(meta[META_VERSION], meta[META_SCHEMA], meta[META_SCHEMA_CRC], extra),
                              entries)[8:]
    rows = [_Row(g, t.name, t.dtype, t.shape) for g, t in zip(gguf_names([t.name for t in entries]), entries)]

    V = gguf.GGUFValueType
    w = gguf.GGUFWriter(str(path), ARCHITECTURE)
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_custom_alignment(ALIGNMENT)
        for key, val in ((K_FORMAT_VERSION, FORMAT_VERSION), (K_RMOE_VERSION, meta[META_VERSION]),
                         (K_SCHEMA_CRC, meta[META_SCHEMA_CRC]), (K_SCHEMA, meta[META_SCHEMA])):
            w.add_key_value(key, val, V.STRING)
        w.add_key_value(K_SIZE, size, V.UINT64)
        w.add_key_value(K_CRC, crc, V.UINT32)
        arrays = [(K_META_KEYS, list(extra), V.STRING), (K_META_VALUES, list(extra.values()), V.STRING),
                  (K_GGUF_NAMES, [x.gguf_name for x in rows], V.STRING), (K_NAMES, [x.name for x in rows], V.STRING),
                  (K_DTYPES, [x.dtype for x in rows], V.STRING), (K_NDIMS, [len(x.shape) for x in rows], V.UINT32),
                  (K_DIMS, [d for x in rows for d in x.shape], V.UINT64)]
        for key, val, sub in arrays:
            if val:  # GGUF writers (gguf-py included) cannot write an empty array: absent means empty
                w.add_key_value(key, val, V.ARRAY, sub_type=sub)
        if raw_header != canonical:
            w.add_key_value(K_HEADER, raw_header.decode("utf-8"), V.STRING)
        for x in rows:
            a = r.tensor(x.name)  # checks the tensor's CRC-32
            width = dtypes.by_name(x.dtype).itemsize
            w.add_tensor(x.gguf_name, a.reshape(-1).view(f"<i{width}"), raw_shape=gguf_shape(x.shape),
                         raw_dtype=gguf.GGMLQuantizationType[GGML_TYPE[x.dtype]])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


# ---------------------------------------------------------------------------------------
# GGUF -> .rmoe

def gguf_to_rmoe(src: str | Path, out: str | Path) -> Path:
    """Rebuild the ``.rmoe`` file held by the compressed GGUF ``src`` at ``out``; returns ``out``.

    The result is byte-identical to the ``.rmoe`` file the GGUF was made from: its size and
    CRC-32 are recorded in the GGUF and checked, and the result must open as a ``.rmoe`` file.
    Any problem raises GgufRmoeError with a one-line message; nothing is left at ``out``.
    """
    src, out = Path(src), Path(out)
    _check_out(out)
    gguf = _gguf()
    try:
        _gguf_to_rmoe(gguf, src, out)
    except GgufRmoeError as e:
        raise GgufRmoeError(f"{src}: {e}") from None
    except OSError as e:
        where = f": {user_path(e.filename)}" if e.filename else ""
        raise GgufRmoeError(f"{src}: {e.strerror or e}{where}") from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, ArithmeticError, RecursionError) as e:
        raise GgufRmoeError(f"{src}: malformed compressed GGUF ({type(e).__name__}: {e})") from None
    return out


def _gguf_to_rmoe(gguf, src: Path, out: Path) -> None:
    size = src.stat().st_size
    if size < 24:
        raise GgufRmoeError(f"file is {size} bytes: too short for a GGUF header (not a GGUF file?)")
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        _check_framing(mm)
    reader = _open_reader(gguf, src)
    doc = _read_doc(gguf, reader)
    rows = _check_tensors(reader, doc)
    head = _rmoe_header(doc, rows)
    with atomic_path(out) as tmp:
        _write_rmoe(reader, head, rows, doc.crc, tmp)


def _open_reader(gguf, src: Path):
    try:
        return gguf.GGUFReader(src)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, ArithmeticError, RecursionError) as e:
        raise GgufRmoeError(f"not a readable GGUF file ({type(e).__name__}: {e})") from None


class _Scan:
    """Walks a GGUF header checking every count, length and offset against the file size.

    gguf.GGUFReader does not bound them: a corrupt array length makes it loop (and allocate)
    up to 2**64 times, and truncated tensor data surfaces as a reshape error; so this runs first.
    """

    SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
    STRING, ARRAY, UINT32 = 8, 9, 4

    def __init__(self, buf):
        self.buf, self.pos, self.alignment = buf, 0, ALIGNMENT

    def take(self, n: int, what: str) -> int:
        if n > len(self.buf) - self.pos:
            raise GgufRmoeError(f"{what} at byte {self.pos} runs past the end of the {len(self.buf)}-byte file "
                                  "(truncated?)")
        self.pos += n
        return self.pos - n

    def num(self, fmt: str, what: str) -> int:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> bytes:
        n = self.num("<Q", what)
        p = self.take(n, what)
        return bytes(self.buf[p:p + n])

    def value(self, t: int, what: str) -> None:
        if t in self.SCALAR:
            self.take(self.SCALAR[t], what)
        elif t == self.STRING:
            self.take(self.num("<Q", what), what)
        elif t == self.ARRAY:
            sub, n = self.num("<I", what), self.num("<Q", what)
            if sub in self.SCALAR:
                self.take(n * self.SCALAR[sub], what)
                return
            if n > (len(self.buf) - self.pos) // 8:  # a string or array element takes 8 bytes at least
                raise GgufRmoeError(f"{what}: array of {n} elements runs past the end of the file (truncated?)")
            for _ in range(n):
                self.value(sub, what)
        else:
            raise GgufRmoeError(f"{what}: unknown GGUF value type {t}")


def _check_framing(buf) -> None:
    """Check a GGUF file's framing (``buf``: its bytes) before gguf.GGUFReader parses it."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    s = _Scan(buf)
    if bytes(buf[:4]) != b"GGUF":
        raise GgufRmoeError("not a GGUF file (no GGUF magic)")
    s.take(4, "magic")
    version = s.num("<I", "GGUF version")
    if version != GGUF_VERSION:
        raise GgufRmoeError(f"GGUF version {version}; a compressed GGUF is GGUF version {GGUF_VERSION}")
    n_tensors, n_kv = s.num("<Q", "tensor count"), s.num("<Q", "metadata count")
    if n_kv > (len(buf) - s.pos) // 13 or n_tensors > (len(buf) - s.pos) // 24:
        raise GgufRmoeError(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in the file "
                              "(truncated or corrupt header)")
    for i in range(n_kv):
        key = s.string(f"metadata key {i}")
        what = f"metadata {key.decode('utf-8', 'replace')!r}"
        t = s.num("<I", what)
        if key == b"general.alignment" and t == s.UINT32 and len(buf) - s.pos >= 4:
            s.alignment = struct.unpack_from("<I", buf, s.pos)[0]
        s.value(t, what)
    infos = []
    for i in range(n_tensors):
        name = s.string(f"tensor info {i}").decode("utf-8", "replace")
        nd = s.num("<I", f"tensor {name}")
        if nd > MAX_GGUF_DIMS:
            raise GgufRmoeError(f"tensor {name}: {nd} dimensions (GGUF tensors have at most {MAX_GGUF_DIMS})")
        dims = struct.unpack_from(f"<{nd}Q", buf, s.take(8 * nd, f"tensor {name}"))
        infos.append((name, dims, s.num("<I", f"tensor {name}"), s.num("<Q", f"tensor {name}")))
    if s.alignment == 0 or s.alignment & (s.alignment - 1):
        raise GgufRmoeError(f"general.alignment {s.alignment} is not a power of two")
    start = -(-s.pos // s.alignment) * s.alignment
    for name, dims, t, off in infos:
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t)]
        except (ValueError, KeyError):
            raise GgufRmoeError(f"tensor {name}: unknown GGML type {t}") from None
        n = 1
        for d in dims:
            n *= d
        if start + off + n * size // block > len(buf):
            raise GgufRmoeError(f"tensor {name}: data runs past the end of the {len(buf)}-byte file (truncated?)")


def _field(gguf, reader, key: str, vtype, sub=None, required: bool = True) -> Any:
    """A metadata value of the given GGUF type; an absent optional array is empty."""
    V = gguf.GGUFValueType
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise GgufRmoeError(f"metadata key {key} is missing")
        return [] if vtype == V.ARRAY else None
    want = [vtype] + ([sub] if sub is not None else [])
    if f.types != want and not (vtype == V.ARRAY and f.types == [V.ARRAY]):  # an empty array has no element type
        got = "/".join(t.name for t in f.types)
        raise GgufRmoeError(f"metadata key {key} is {got}, expected {'/'.join(t.name for t in want)}")
    try:
        return f.contents()
    except UnicodeDecodeError:
        raise GgufRmoeError(f"metadata key {key} is not valid UTF-8") from None


@dataclass
class _Doc:
    meta: dict[str, str]
    names: list[str]
    gguf_names: list[str]
    dtypes: list[str]
    n_dims: list[int]
    dims: list[int]
    header: str | None
    size: int
    crc: int


def _read_doc(gguf, reader) -> _Doc:
    V = gguf.GGUFValueType
    arch = _field(gguf, reader, "general.architecture", V.STRING, required=False)
    if arch != ARCHITECTURE or K_FORMAT_VERSION not in reader.fields:
        what = f"general.architecture is {arch!r}" if arch != ARCHITECTURE else f"{K_FORMAT_VERSION} is missing"
        raise GgufRmoeError(f"not a resmoe compressed GGUF ({what}); expected general.architecture "
                              f"{ARCHITECTURE!r} and resmoe.* keys")
    _check_version(_field(gguf, reader, K_FORMAT_VERSION, V.STRING))

    def arr(key: str, sub, required: bool = True) -> list:
        return _field(gguf, reader, key, V.ARRAY, sub, required)

    keys, values = arr(K_META_KEYS, V.STRING, False), arr(K_META_VALUES, V.STRING, False)
    if len(keys) != len(values) or len(set(keys)) != len(keys) or set(keys) & set(_STANDARD_META):
        raise GgufRmoeError(f"{K_META_KEYS} and {K_META_VALUES} must pair unique keys other than "
                              f"{', '.join(_STANDARD_META)} with values")
    version, schema, schema_crc = (_field(gguf, reader, k, V.STRING) for k in (K_RMOE_VERSION, K_SCHEMA, K_SCHEMA_CRC))
    if not (schema_crc.isascii() and schema_crc.isdigit()) or int(schema_crc) != zlib.crc32(schema.encode("utf-8")):
        raise GgufRmoeError(f"{K_SCHEMA} does not match {K_SCHEMA_CRC} (corrupt metadata)")
    meta = _canonical_metadata(version, schema, schema_crc, dict(zip(keys, values)))
    return _Doc(meta, arr(K_NAMES, V.STRING), arr(K_GGUF_NAMES, V.STRING), arr(K_DTYPES, V.STRING),
                arr(K_NDIMS, V.UINT32), arr(K_DIMS, V.UINT64, False),
                _field(gguf, reader, K_HEADER, V.STRING, required=False),
                _field(gguf, reader, K_SIZE, V.UINT64), _field(gguf, reader, K_CRC, V.UINT32))


def _check_version(v: str) -> None:
    major, _, minor = v.partition(".")
    if not (major.isdigit() and minor.isdigit() and major.isascii() and minor.isascii()):
        raise GgufRmoeError(f"{K_FORMAT_VERSION} {v!r} is not of the form major.minor")
    if int(major) != READ_MAJOR:
        raise GgufRmoeError(f"this is compressed GGUF version {v}; this reader reads major version {READ_MAJOR} "
                              "only (upgrade resmoe to read it)")


def _check_tensors(reader, doc: _Doc) -> list[tuple[_Row, int]]:
    """The table's rows with each tensor's absolute file offset; every size and offset is checked."""
    n = len(reader.tensors)
    lens = {K_NAMES: doc.names, K_GGUF_NAMES: doc.gguf_names, K_DTYPES: doc.dtypes, K_NDIMS: doc.n_dims}
    for key, val in lens.items():
        if len(val) != n:
            raise GgufRmoeError(f"{key} has {len(val)} entries for {n} tensors")
    if sum(doc.n_dims) != len(doc.dims):
        raise GgufRmoeError(f"{K_DIMS} has {len(doc.dims)} entries, {K_NDIMS} adds up to {sum(doc.n_dims)}")
    if len(set(doc.names)) != n:
        raise GgufRmoeError(f"{K_NAMES} names a .rmoe tensor twice")
    out, k, pos, align = [], 0, 0, int(reader.alignment)
    for i, t in enumerate(reader.tensors):
        nd = doc.n_dims[i]
        if nd > 8:
            raise GgufRmoeError(f"tensor {doc.names[i]}: {nd} dimensions (a .rmoe tensor has at most 8)")
        row = _Row(doc.gguf_names[i], doc.names[i], doc.dtypes[i], tuple(doc.dims[k:k + nd]))
        k += nd
        where = f"tensor {row.name}" + (f" (GGUF tensor {t.name})" if t.name != row.name else "")
        if t.name != row.gguf_name:
            raise GgufRmoeError(f"GGUF tensor {i} is {t.name!r}, {K_GGUF_NAMES} says {row.gguf_name!r}")
        if row.dtype not in GGML_TYPE:
            raise GgufRmoeError(f"{where}: unknown .rmoe dtype {row.dtype!r}")
        want_type, want_dims = GGML_TYPE[row.dtype], list(reversed(gguf_shape(row.shape)))
        if t.tensor_type.name != want_type or [int(d) for d in t.shape] != want_dims:
            raise GgufRmoeError(f"{where}: GGUF holds {t.tensor_type.name} {[int(d) for d in t.shape]}, the "
                                  f"table's {row.dtype} {list(row.shape)} needs {want_type} {want_dims}")
        if t.data_offset != reader.data_offset + pos or int(t.n_bytes) != row.nbytes:
            raise GgufRmoeError(f"{where}: data at file offset {t.data_offset}, expected "
                                  f"{reader.data_offset + pos} (tensors must follow each other in table order)")
        pos += -(-row.nbytes // align) * align
        out.append((row, t.data_offset))
    if reader.data_offset + pos != len(reader.data):
        raise GgufRmoeError(f"the file is {len(reader.data)} bytes but its tensors and their padding end at byte "
                              f"{reader.data_offset + pos} (truncated or trailing bytes)")
    return out


def _rmoe_header(doc: _Doc, rows: list[tuple[_Row, int]]) -> bytes:
    """The .rmoe file's 8-byte length and header: canonical, or the verbatim copy after checking it."""
    entries, pos = [], 0
    for row, _ in rows:
        entries.append(TensorEntry(row.name, row.dtype, row.shape, pos, pos + row.nbytes))
        pos += row.nbytes
    try:
        if doc.header is None:
            head = encode_header(doc.meta, entries)
        else:
            raw = doc.header.encode("utf-8")
            head = struct.pack("<Q", len(raw)) + raw
            h = read_header(io.BytesIO(head), len(head) + pos)
            if h.metadata != doc.meta or {t.name: t for t in h.tensors.values()} != {t.name: t for t in entries}:
                raise GgufRmoeError(f"{K_HEADER} disagrees with the tensor table or the metadata keys")
    except RmoeFormatError as e:
        raise GgufRmoeError(f"the .rmoe header cannot be rebuilt: {e}") from None
    if len(head) + pos != doc.size:
        raise GgufRmoeError(f"the .rmoe file would be {len(head) + pos} bytes, {K_SIZE} says {doc.size}")
    return head


def _write_rmoe(reader, head: bytes, rows: list[tuple[_Row, int]], want_crc: int, path: Path) -> None:
    crc = zlib.crc32(head)
    with open(path, "wb") as f:
        f.write(head)
        for row, off in rows:
            for p in range(off, off + row.nbytes, _COPY_CHUNK):
                chunk = reader.data[p:min(p + _COPY_CHUNK, off + row.nbytes)]
                f.write(chunk)
                crc = zlib.crc32(chunk, crc)
    if crc != want_crc:
        raise GgufRmoeError(f"the rebuilt .rmoe file has CRC-32 {crc}, {K_CRC} says {want_crc} "
                              "(corrupt tensor data or metadata)")
    try:
        container.open(path, shard_only=True).close()  # a shard (spec 11) is checked as the file it is
    except RmoeFormatError as e:
        raise GgufRmoeError(f"the rebuilt .rmoe file is not valid: {e}") from None
