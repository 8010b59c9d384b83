"""Reading and writing .rmoe files: a safetensors file whose ``__metadata__`` carries the
schema. The reader mmaps the file and hands out zero-copy numpy views; the writer streams
tensors to disk as they come and publishes the file atomically."""
from __future__ import annotations

import functools
import json
import mmap
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import codecs, dtypes
from .codecs import Encoded, kquant, part_category
from .errors import RmoeFormatError
from .safetensors_header import Header, TensorEntry, parse_json, read_header
from .stream import StreamingWriter, crc32
from .codecs.fields import Predictor, uses_predictor
from .schema import (BASE_VERSION_STR, CE_DTYPES, CE_VERSION, CE_VERSION_STR, CROSS_FACTORS_VERSION,
                     CROSS_FACTORS_VERSION_STR, FIELDS_VERSION, FIELDS_VERSION_STR, FORMAT_NAME, KQUANT_VERSION,
                     KQUANT_VERSION_STR, SHARED_FACTORS_VERSION, SHARED_FACTORS_VERSION_STR, CodedTensor, EncodedRef,
                     LayerSpec, MatrixSpec, Schema, SourceSpec, claim_file_path, claim_output, parse_version)

CHECKSUM_TENSOR = "rmoe.checksums"
RESERVED_PREFIX = "rmoe."
META_FORMAT, META_VERSION, META_SCHEMA, META_SCHEMA_CRC = "format", "rmoe_version", "rmoe_schema", "rmoe_schema_crc32"
#: Default cap on the elements of one decoded expert matrix (2**28: 1 GiB as float32). Sparse
#: and low-rank encodings decode to far more bytes than they store, so a reader bounds what a
#: hostile schema can make it allocate; every released MoE's expert matrices are far below this.
MAX_MATRIX_ELEMENTS = 2**28


def _guard(fn):
    """Whatever bytes a file holds, only RmoeFormatError leaves the reader."""
    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except RmoeFormatError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, ArithmeticError,
                RecursionError, AttributeError, BufferError) as e:
            raise RmoeFormatError(f"malformed file ({type(e).__name__}: {e})") from e
    return wrapper


# ---------------------------------------------------------------------------------------
# roles: what every tensor is, derived from the schema

@dataclass(frozen=True)
class Role:
    category: str  # accounting category (spec section 7)
    layer: int | None = None
    expert: int | None = None


#: Parts of a lowrank residual record that other lowrank records of the same expert may share
#: (spec 4.8, version 2.0 and later; ``u_group_scales`` with k-quant values, 3.0 and later).
SHAREABLE_PARTS = ("u", "u_scales", "u_group_scales")
#: The two factors of a lowrank record, each with its parts: either may be shared by the records of one matrix
#: in several experts of a layer (spec 4.8, cross-expert factors, version 5.0 and later).
FACTOR_PARTS = {"u": SHAREABLE_PARTS, "v": ("v", "v_scales", "v_group_scales")}


def tensor_roles(schema: Schema, allow_shared: bool = False, allow_cross: bool = False) -> dict[str, Role]:
    """Map every tensor the schema references to its role; a name used twice is an error.

    With ``allow_shared`` (files of major version 2 and later) the one exception of spec 4.8
    holds: the ``u`` (and ``u_scales``, ``u_group_scales``) part of a ``lowrank`` residual record
    may name the same tensor as that part of other lowrank records of the same layer and expert,
    if they agree in value dtype and quantization and share all of U's parts together. With ``allow_cross``
    (major version 5 and later) a factor (``u`` or ``v`` with its scale parts) of a lowrank residual record may
    also name the same tensors as that factor of the records of the same matrix in other experts of the layer,
    if they agree in value dtype, quantization and rank.
    """
    roles: dict[str, Role] = {}

    def put(name: str, role: Role) -> None:
        if name in roles:
            raise RmoeFormatError(f"tensor {name} is referenced twice by the schema")
        roles[name] = role

    put(schema.checksum["tensor"], Role("checksums"))
    for f in schema.files:
        put(f["tensor"], Role("embedded_files"))
    for p in schema.passthrough:
        put(p, Role("passthrough"))
    for c in schema.coded:
        for t in c.record.tensors.values():
            put(t, Role("passthrough"))
    for lay in schema.layers:
        cross: dict[str, tuple] = {}  # lowrank residual tensor -> (expert, matrix, part, dtype, quant, rank)
        cross_group: dict[tuple[str, str], tuple] = {}  # (factor, tensor) -> (first expert, the factor's tensors)
        within: set[str] = set()  # tensors shared by records of several matrices of one expert
        crossed: set[str] = set()  # tensors shared across experts
        for ref in lay.base.values():
            for part, t in ref.tensors.items():
                put(t, Role(_category(part, ref, t, base=True), lay.index))
        if lay.base_channels is not None:
            put(lay.base_channels, Role("permutations", lay.index))
        for k, p in enumerate(lay.permutations or []):
            put(p, Role("permutations", lay.index, k))
        for k, res in enumerate(lay.residuals):
            shared: dict[str, tuple] = {}  # tensor -> (matrix, part, value dtype, quant, U's rows and rank)
            partner: dict[tuple[str, str], tuple] = {}  # (part, tensor) -> the record's shareable tensors
            for m, ref in res.items():
                if ref is None:
                    continue
                lowrank = allow_shared and ref.encoding == "lowrank"
                for part, t in ref.tensors.items():
                    key = (part, ref.value_dtype, json.dumps(ref.quant.to_json() if ref.quant else None),
                           (lay.matrix(m).shape2d[0], ref.params.get("rank")))
                    xkey = (m, part, ref.value_dtype, json.dumps(ref.quant.to_json() if ref.quant else None),
                            ref.params.get("rank"))
                    if allow_cross and ref.encoding == "lowrank" and t in cross and cross[t][0] != k:
                        if t in within:
                            raise RmoeFormatError(
                                f"layer {lay.index}: tensor {t} is shared by expert {cross[t][0]}'s records of "
                                f"several matrices and by expert {k}: a factor shared across experts cannot also be "
                                f"the u of another matrix's record")
                        crossed.add(t)
                        if cross[t][1:] != xkey:
                            raise RmoeFormatError(
                                f"layer {lay.index}: tensor {t} is shared by the low-rank records of expert "
                                f"{cross[t][0]} matrix {cross[t][1]} and expert {k} matrix {m}, which differ in "
                                f"matrix, part, value dtype, quantization or rank (a cross-expert factor is one "
                                f"matrix's)")
                        continue
                    if lowrank and part in SHAREABLE_PARTS and t in shared:
                        if t in crossed:
                            raise RmoeFormatError(
                                f"layer {lay.index} expert {k}: tensor {t} is shared across experts and by the "
                                f"records of {shared[t][0]} and {m}: a factor shared across experts cannot also be "
                                f"the u of another matrix's record")
                        within.add(t)
                        if shared[t][1:4] != key[:3]:
                            raise RmoeFormatError(
                                f"layer {lay.index} expert {k}: tensor {t} is shared by the low-rank records of "
                                f"{shared[t][0]} and {m}, which differ in part, value dtype or quantization")
                        if kquant.is_kquant(ref.value_dtype) and shared[t][4] != key[3]:  # shapes give m*r only
                            raise RmoeFormatError(
                                f"layer {lay.index} expert {k}: tensor {t} is shared by the low-rank records of "
                                f"{shared[t][0]} and {m}, whose U differ in shape (m, rank): {shared[t][4]}, {key[3]}")
                        continue
                    put(t, Role(_category(part, ref, t), lay.index, k))
                    if lowrank and part in SHAREABLE_PARTS:
                        shared[t] = (m, *key)
                    if allow_cross and ref.encoding == "lowrank":
                        cross[t] = (k, *xkey)
                if lowrank:
                    group = tuple(ref.tensors.get(p) for p in SHAREABLE_PARTS)
                    if any(partner.setdefault((p, t), group) != group for p, t in zip(SHAREABLE_PARTS, group) if t):
                        raise RmoeFormatError(
                            f"layer {lay.index} expert {k} matrix {m}: low-rank records that share u must share "
                            f"u_scales too (and u_group_scales, with k-quant values), and the reverse "
                            f"(tensors {', '.join(t for t in group if t)})")
                if allow_cross and ref.encoding == "lowrank":
                    for factor, parts in FACTOR_PARTS.items():
                        group = tuple(ref.tensors.get(p) for p in parts)
                        for t in group:
                            if not t:
                                continue
                            k0, g0 = cross_group.setdefault((factor, t), (k, group))
                            if k0 != k and g0 != group:
                                raise RmoeFormatError(
                                    f"layer {lay.index} expert {k} matrix {m}: low-rank records that share a factor "
                                    f"across experts must share all its parts ({', '.join(parts)}), and the "
                                    f"reverse (tensors {', '.join(x for x in group if x)})")
        for ext in lay.extensions.values():
            for t in ext.get("tensors", {}).values():
                put(t, Role("extensions", lay.index))
        if lay.ce is not None:
            put(lay.ce.vectors, Role("compressed_experts", lay.index))
    return roles


def records(lay: LayerSpec):
    """(where, record) for every encoded record of a layer: base records, then residuals."""
    for m, ref in lay.base.items():
        yield f"layer {lay.index} base matrix {m}", ref
    for k, res in enumerate(lay.residuals):
        for m, ref in res.items():
            if ref is not None:
                yield f"layer {lay.index} expert {k} matrix {m}", ref


def cross_shared(lay: LayerSpec) -> bool:
    """Whether some tensor of a layer's lowrank residual records is named by the records of two experts."""
    owner: dict[str, int] = {}
    for k, res in enumerate(lay.residuals):
        for ref in res.values():
            if ref is not None and ref.encoding == "lowrank":
                for t in ref.tensors.values():
                    if owner.setdefault(t, k) != k:
                        return True
    return False


def lowest_version(schema: Schema) -> str:
    """The lowest version that expresses ``schema`` (spec 1.4): 4.0 when a record is ``fields`` or a base is
    of kind ``predictor`` (spec 5.11), else 3.0 when a record has k-quant values (spec 5.10), else 2.0 when a
    tensor is referenced by more than one record (a shared low-rank factor, spec 4.8), else 1.0."""
    if any(lay.ce is not None for lay in schema.layers):
        return CE_VERSION_STR
    if any(cross_shared(lay) or lay.base_channels is not None for lay in schema.layers):
        return CROSS_FACTORS_VERSION_STR
    if schema.coded or any(uses_fields(lay) for lay in schema.layers):
        return FIELDS_VERSION_STR
    if any(kquant.is_kquant(ref.value_dtype) for lay in schema.layers for _, ref in records(lay)):
        return KQUANT_VERSION_STR
    refs = 1 + len(schema.files) + len(schema.passthrough) + sum(len(c.record.tensors) for c in schema.coded)
    for lay in schema.layers:
        refs += sum(len(r.tensors) for r in lay.base.values()) + len(lay.permutations or [])
        refs += sum(len(r.tensors) for res in lay.residuals for r in res.values() if r is not None)
        refs += sum(len(e.get("tensors", {})) for e in lay.extensions.values())
    return SHARED_FACTORS_VERSION_STR if refs > len(tensor_roles(schema, allow_shared=True)) else BASE_VERSION_STR


def uses_fields(lay: LayerSpec) -> bool:
    """Whether a layer uses what version 4.0 added: a ``fields`` record or a ``predictor`` base (spec 5.11)."""
    return lay.base_kind == "predictor" or any(ref.encoding == "fields" for _, ref in records(lay))


def check_predictors(lay: LayerSpec) -> None:
    """Spec 5.11: a ``fields`` record coded against a predictor is a residual record of a ``predictor`` layer
    whose base has that matrix, with the same value dtype, and the base record itself uses no predictor."""
    for m, ref in lay.base.items():
        if ref.encoding == "fields" and uses_predictor(ref.params):
            raise RmoeFormatError(f"layer {lay.index} base matrix {m}: a base record has no predictor")
    for k, res in enumerate(lay.residuals):
        for m, ref in res.items():
            if ref is None or ref.encoding != "fields" or not uses_predictor(ref.params):
                continue
            where = f"layer {lay.index} expert {k} matrix {m}"
            if lay.base_kind != "predictor" or m not in lay.base:
                raise RmoeFormatError(f"{where}: coded against a predictor, but the layer's base kind is "
                                      f"{lay.base_kind} or it has no base for {m}")
            if lay.base[m].value_dtype != ref.value_dtype:
                raise RmoeFormatError(f"{where}: value_dtype {ref.value_dtype} differs from its predictor's "
                                      f"{lay.base[m].value_dtype}")


def permutation_dtype(num_neurons: int) -> str:
    """The dtype of a layer's permutation tensors (spec 6.4): u16 up to 65535 neurons, else i32."""
    return "u16" if num_neurons <= 65535 else "i32"


def _category(part: str, ref: EncodedRef, tname: str, base: bool = False) -> str:
    try:
        return part_category(part, ref.value_dtype, base)
    except KeyError:
        raise RmoeFormatError(f"tensor {tname}: unknown part name {part!r}") from None


# ---------------------------------------------------------------------------------------
# schema <-> tensor table consistency (no tensor data touched)

def check_schema_layout(schema: Schema, tensors: dict[str, TensorEntry],
                        max_matrix_elements: int = MAX_MATRIX_ELEMENTS, major: int = 1) -> dict[str, Role]:
    """The checks of spec 7.2 steps 4 to 9 under the rules of major version ``major``; the tensors' roles."""
    if major < KQUANT_VERSION[0]:
        for where, ref in (x for lay in schema.layers for x in records(lay)):
            if kquant.is_kquant(ref.value_dtype):
                raise RmoeFormatError(f"{where}: value_dtype {ref.value_dtype} needs .rmoe version "
                                      f"{KQUANT_VERSION_STR} or later; this file is major version {major}")
    if major < FIELDS_VERSION[0] and schema.coded:
        raise RmoeFormatError(f"schema.coded: coded passthrough tensors need .rmoe version {FIELDS_VERSION_STR} or "
                              f"later; this file is major version {major}")
    if major < FIELDS_VERSION[0]:
        for lay in schema.layers:
            if uses_fields(lay):
                raise RmoeFormatError(f"layer {lay.index}: the fields encoding and the predictor base kind need "
                                      f".rmoe version {FIELDS_VERSION_STR} or later; this file is major version "
                                      f"{major}")
    if major < CROSS_FACTORS_VERSION[0]:
        for lay in schema.layers:
            if lay.base_channels is not None:
                raise RmoeFormatError(f"layer {lay.index}: a base with pruned channels needs .rmoe version "
                                      f"{CROSS_FACTORS_VERSION_STR} or later; this file is major version {major}")
            if cross_shared(lay):
                raise RmoeFormatError(f"layer {lay.index}: a low-rank factor shared by several experts needs .rmoe "
                                      f"version {CROSS_FACTORS_VERSION_STR} or later; this file is major version "
                                      f"{major}")
    if major < CE_VERSION[0]:
        for lay in schema.layers:
            if lay.ce is not None:
                raise RmoeFormatError(f"layer {lay.index}: compressed experts need .rmoe version {CE_VERSION_STR} or "
                                      f"later; this file is major version {major}")
    roles = tensor_roles(schema, allow_shared=major >= SHARED_FACTORS_VERSION[0],
                         allow_cross=major >= CROSS_FACTORS_VERSION[0])
    missing = [n for n in roles if n not in tensors]
    if missing:
        raise RmoeFormatError(f"schema references tensor {missing[0]} which the file does not hold")
    unlisted = [n for n in tensors if n not in roles]
    if unlisted:
        raise RmoeFormatError(f"tensor {unlisted[0]} has no role in the schema")
    ck = tensors[schema.checksum["tensor"]]
    if ck.dtype != "u32" or ck.shape != (len(tensors) - 1,):
        raise RmoeFormatError(f"tensor {ck.name}: checksums must be u32 [{len(tensors) - 1}], "
                              f"got {ck.dtype} {list(ck.shape)}")
    for f in schema.files:
        t = tensors[f["tensor"]]
        if t.dtype != "u8" or len(t.shape) != 1:
            raise RmoeFormatError(f"tensor {t.name}: an embedded file must be u8 1-D")
    for lay in schema.layers:
        _check_layer(lay, tensors, max_matrix_elements)
    for c in schema.coded:
        _check_coded(c, tensors, max_matrix_elements)
    return roles


def _check_coded(c: CodedTensor, tensors: dict[str, TensorEntry], max_elements: int) -> None:
    """A coded passthrough tensor (spec 4.2): within the element limit, its record's layout, no predictor."""
    rows, cols = c.shape2d
    if rows * cols > max_elements:
        raise RmoeFormatError(f"coded tensor {c.name}: {rows * cols} elements exceed the reader's limit of "
                              f"{max_elements} (max_matrix_elements)")
    if uses_predictor(c.record.params):
        raise RmoeFormatError(f"coded tensor {c.name}: a coded passthrough tensor has no predictor")
    codecs.check_layout(c.record.encoding, c.shape2d, c.record.value_dtype, c.record.quant, c.record.params,
                        _parts_info(c.record, tensors), c.record.tensors)


def _parts_info(ref: EncodedRef, tensors: dict[str, TensorEntry]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {p: (tensors[t].dtype, tensors[t].shape) for p, t in ref.tensors.items()}


def _check_layer(lay: LayerSpec, tensors: dict[str, TensorEntry], max_elements: int) -> None:
    check_predictors(lay)
    pdt = permutation_dtype(lay.num_neurons)
    kept = None
    if lay.base_channels is not None:
        t = tensors[lay.base_channels]
        if t.dtype != pdt or len(t.shape) != 1 or not 1 <= t.shape[0] <= lay.num_neurons:
            raise RmoeFormatError(f"tensor {t.name}: the base channels of {lay.num_neurons} neurons must be {pdt} "
                                  f"[c] with 1 <= c <= {lay.num_neurons}, got {t.dtype} {list(t.shape)}")
        kept = t.shape[0]
    for m in lay.matrices:
        rows, cols = m.shape2d
        if rows * cols > max_elements:
            raise RmoeFormatError(f"layer {lay.index} matrix {m.name}: {rows} x {cols} elements exceed the "
                                  f"reader's limit of {max_elements} (max_matrix_elements)")
        if m.name in lay.base:
            ref = lay.base[m.name]
            codecs.check_layout(ref.encoding, m.kept(kept).shape2d, ref.value_dtype, ref.quant, ref.params,
                                _parts_info(ref, tensors), ref.tensors)
        for ref in (r[m.name] for r in lay.residuals if r[m.name]):
            codecs.check_layout(ref.encoding, m.shape2d, ref.value_dtype, ref.quant, ref.params,
                                _parts_info(ref, tensors), ref.tensors)
    for p in lay.permutations or []:
        t = tensors[p]
        if t.dtype != pdt or t.shape != (lay.num_neurons,):
            raise RmoeFormatError(f"tensor {p}: a permutation of {lay.num_neurons} neurons must be "
                                  f"{pdt} [{lay.num_neurons}], got {t.dtype} {list(t.shape)}")
    if lay.ce is not None:
        t = tensors[lay.ce.vectors]
        want = ce_shape(lay)
        if want is None:
            raise RmoeFormatError(f"layer {lay.index}: compressed experts need a 2-D matrix with a neuron axis "
                                  f"(the hidden size)")
        if t.dtype not in CE_DTYPES or tuple(t.shape) != want:
            raise RmoeFormatError(f"tensor {t.name}: the compressed-expert vectors of layer {lay.index} must be "
                                  f"{'/'.join(CE_DTYPES)} {list(want)} (experts, 3, max(hidden, num_neurons)), got "
                                  f"{t.dtype} {list(t.shape)}")
    for s in lay.sources:
        shape = source_shape(lay, s)
        if tuple(s.shape) != shape:
            raise RmoeFormatError(f"layer {lay.index} source {s.name}: declared shape {list(s.shape)} but its "
                                  f"assembly gives {list(shape)}")


def ce_shape(lay: LayerSpec) -> tuple[int, int, int] | None:
    """The shape of a layer's compressed-expert vectors (spec 4.5): (E, 3, max(hidden, n)); None without a
    hidden size."""
    h = lay.hidden
    return None if h is None else (lay.num_experts, 3, max(h, lay.num_neurons))


def source_shape(lay: LayerSpec, s: SourceSpec) -> tuple[int, ...]:
    """The shape a source tensor's assembly rule produces (validates the rule)."""
    where = f"layer {lay.index} source {s.name}"
    if s.expert != "all" and s.expert >= lay.num_experts:
        raise RmoeFormatError(f"{where}: expert {s.expert} of {lay.num_experts}")
    mats = [lay.matrix(p) for p in s.parts]
    if any(m.dtype != s.dtype for m in mats):
        raise RmoeFormatError(f"{where}: dtype {s.dtype} differs from its matrices' dtype")
    shapes = [tuple(reversed(m.shape)) if s.transpose else tuple(m.shape) for m in mats]
    if len({len(x) for x in shapes}) != 1:
        raise RmoeFormatError(f"{where}: parts of different ranks")
    shape = list(shapes[0])
    if len(shapes) > 1:
        ax = s.join_axis
        if not 0 <= ax < len(shape):
            raise RmoeFormatError(f"{where}: join_axis {ax} out of range")
        others = {x[:ax] + x[ax + 1:] for x in shapes}
        if len(others) != 1 or (s.join == "interleave" and len(set(shapes)) != 1):
            raise RmoeFormatError(f"{where}: part shapes {shapes} cannot be joined ({s.join}) on axis {ax}")
        shape[ax] = sum(x[ax] for x in shapes)
    return ((lay.num_experts,) if s.expert == "all" else ()) + tuple(shape)


# ---------------------------------------------------------------------------------------
# Reader

class Reader:
    """A .rmoe file opened for reading (see :func:`open`)."""

    def __init__(self, path: str | os.PathLike, verify_checksums: bool = True,
                 max_matrix_elements: int = MAX_MATRIX_ELEMENTS):
        self.path = Path(path)
        self.verify_checksums = verify_checksums
        self.max_matrix_elements = max_matrix_elements
        self._verified: set[str] = set()
        try:
            self._f = self.path.open("rb")
        except OSError as e:
            raise RmoeFormatError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            self._init()
        except BaseException:
            self._f.close()
            raise

    @_guard
    def _init(self) -> None:
        self.file_size = os.fstat(self._f.fileno()).st_size
        self.header: Header = read_header(self._f, self.file_size)
        meta = self.header.metadata
        if meta.get(META_FORMAT) != FORMAT_NAME:
            raise RmoeFormatError(f"__metadata__.format is {meta.get(META_FORMAT)!r}, not 'rmoe': "
                                  "a safetensors file, but not a .rmoe file")
        self.version = parse_version(meta.get(META_VERSION))
        raw = meta.get(META_SCHEMA)
        if raw is None:
            raise RmoeFormatError("__metadata__.rmoe_schema is missing")
        want = meta.get(META_SCHEMA_CRC)
        if want is None or not want.isdigit() or int(want) != crc32(raw.encode("utf-8")):
            raise RmoeFormatError("__metadata__.rmoe_schema does not match rmoe_schema_crc32 (corrupt header)")
        self.schema = Schema.from_json(parse_json(raw, "rmoe_schema"))
        self.roles = check_schema_layout(self.schema, self.header.tensors, self.max_matrix_elements,
                                         major=self.version[0])
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        ck = self.schema.checksum["tensor"]
        if crc32(self._view(ck)) != self.schema.checksum["crc32"]:
            raise RmoeFormatError(f"tensor {ck}: checksum table is corrupt (crc32 mismatch)")
        self._crc = dict(zip((n for n in self.header.tensors if n != ck), self._view(ck).tolist()))
        self._layers = {lay.index: lay for lay in self.schema.layers}

    # --- raw tensors ---------------------------------------------------------------
    def _view(self, name: str) -> np.ndarray:
        t = self.header.tensors[name]
        dt = dtypes.by_name(t.dtype).np
        a = np.frombuffer(self._mm, dtype=dt, count=t.numel, offset=self.header.data_start + t.begin)
        return a.reshape(t.shape)

    @property
    def tensor_names(self) -> list[str]:
        return list(self.header.tensors)

    @_guard
    def tensor(self, name: str) -> np.ndarray:
        """A read-only zero-copy view of a tensor, checksum-verified on first access."""
        if name not in self.header.tensors:
            raise RmoeFormatError(f"no tensor named {name!r} in {self.path}")
        a = self._view(name)
        if self.verify_checksums and name not in self._verified and name != self.schema.checksum["tensor"]:
            if crc32(a) != self._crc[name]:
                raise RmoeFormatError(f"tensor {name}: crc32 mismatch (corrupt data)")
            self._verified.add(name)
        return a

    @_guard
    def verify(self, records: bool = True) -> None:
        """Read every tensor, check its checksum, and (``records``) decode every layer record.

        Pages are released as it goes, so resident memory stays near one layer.
        """
        saved = self.verify_checksums
        self.verify_checksums = True
        try:
            touched = 0
            for name, t in self.header.tensors.items():
                self.tensor(name)
                touched += t.nbytes
                if touched > 1 << 26:
                    self.release()
                    touched = 0
            self.release()
            for lay in self.schema.layers if records else ():
                for m in lay.matrices:
                    if m.name in lay.base:
                        self.base(lay.index, m.name)
                    for k in range(lay.num_experts):
                        self.residual(lay.index, k, m.name)
                for k in range(lay.num_experts if lay.permutations else 0):
                    self.permutation(lay.index, k)
                self.release()
            for c in self.schema.coded if records else ():
                self.coded(c)
        finally:
            self.verify_checksums = saved

    # --- schema-level access ------------------------------------------------------
    @property
    def layers(self) -> list[LayerSpec]:
        return self.schema.layers

    def layer(self, index: int) -> LayerSpec:
        try:
            return self._layers[index]
        except KeyError:
            raise RmoeFormatError(f"no compressed layer {index}; layers are {sorted(self._layers)}") from None

    @_guard
    def encoded(self, ref: EncodedRef, matrix: MatrixSpec) -> Encoded:
        parts = {p: self.tensor(t) for p, t in ref.tensors.items()}
        return Encoded(ref.encoding, matrix.shape2d, ref.value_dtype, parts, ref.params, ref.quant)

    @_guard
    def decode(self, layer: int, ref: EncodedRef, matrix: str) -> np.ndarray:
        """A record of layer ``layer`` decoded to float32 (2-D); a ``fields`` record coded against a
        predictor gets the layer's base matrix (spec 5.11)."""
        lay = self.layer(layer)
        pred = self._predictor(layer, matrix) if ref.encoding == "fields" and uses_predictor(ref.params) else None
        return codecs.decode(self.encoded(ref, lay.matrix(matrix)), ref.tensors, pred)

    @_guard
    def decode_exact(self, layer: int, ref: EncodedRef, matrix: str) -> np.ndarray:
        """A ``fields`` record decoded to its own value dtype (2-D, bit for bit), without the float32 detour."""
        spec = self.layer(layer).matrix(matrix)
        pred = self._predictor(layer, matrix) if uses_predictor(ref.params) else None
        bits = codecs.CODECS["fields"].decode_bits(self.encoded(ref, spec), ref.tensors, pred)
        return bits.view(dtypes.by_name(ref.value_dtype).np).reshape(spec.shape2d)

    def _predictor(self, layer: int, matrix: str) -> Predictor:
        """The base matrix of a predictor layer in its value dtype, decoded once per layer and matrix (the
        cache holds one layer's)."""
        cache = self.__dict__.setdefault("_predictors", {})
        if (layer, matrix) not in cache:
            if any(key[0] != layer for key in cache):
                cache.clear()
            base = self.base(layer, matrix)
            if base is None:
                raise RmoeFormatError(f"layer {layer} matrix {matrix}: a record coded against a predictor, and the "
                                      f"layer has no base for it")
            vd = self.layer(layer).base[matrix].value_dtype
            if vd not in ("bf16", "fp16", "fp32"):
                raise RmoeFormatError(f"layer {layer} base matrix {matrix}: a predictor is stored in bf16, fp16 or "
                                      f"fp32, not {vd}")
            cache[(layer, matrix)] = Predictor(base, vd)
        return cache[(layer, matrix)]

    @_guard
    def base(self, layer: int, matrix: str) -> np.ndarray | None:
        """The decoded float32 base matrix (2-D), or None when the layer has none for this matrix."""
        lay = self.layer(layer)
        if matrix not in lay.base:
            lay.matrix(matrix)  # an unknown matrix name is an error
            return None
        ref, spec = lay.base[matrix], lay.matrix(matrix)
        channels = self.base_channels(layer)
        if channels is None or spec.neuron_axis is None:
            return codecs.decode(self.encoded(ref, spec), ref.tensors)
        kept = codecs.decode(self.encoded(ref, spec.kept(channels.size)), ref.tensors)
        full = np.zeros(spec.shape, np.float32)
        index = [slice(None)] * len(spec.shape)
        index[spec.neuron_axis] = channels
        full[tuple(index)] = kept.reshape(spec.kept(channels.size).shape)
        return full.reshape(spec.shape2d)

    @_guard
    def base_channels(self, layer: int) -> np.ndarray | None:
        """The neuron indices the layer's base keeps (spec 4.7, checked: strictly increasing, below n), or
        None when it keeps all."""
        lay = self.layer(layer)
        if lay.base_channels is None:
            return None
        c = self.tensor(lay.base_channels).astype(np.int64)
        if c.size and (c[0] < 0 or c[-1] >= lay.num_neurons or np.any(np.diff(c) <= 0)):
            raise RmoeFormatError(f"tensor {lay.base_channels}: base channels must be strictly increasing neuron "
                                  f"indices below {lay.num_neurons}")
        return c

    def addend(self, layer: int, matrix: str) -> np.ndarray | None:
        """The base matrix restoration adds to the residuals (spec 6.1): None for base kinds none and predictor."""
        return self.base(layer, matrix) if self.layer(layer).adds_base else None

    @_guard
    def residual(self, layer: int, expert: int, matrix: str) -> np.ndarray | None:
        """The decoded float32 residual (2-D) of one expert's matrix, or None if absent."""
        lay = self.layer(layer)
        if not 0 <= expert < lay.num_experts:
            raise RmoeFormatError(f"layer {layer}: expert {expert} of {lay.num_experts}")
        ref = lay.residuals[expert][lay.matrix(matrix).name]
        if ref is None:
            return None
        return self.decode(layer, ref, matrix)

    @_guard
    def permutation(self, layer: int, expert: int) -> np.ndarray | None:
        """Expert ``expert``'s permutation p as int64 (aligned neuron i = original neuron p[i])."""
        lay = self.layer(layer)
        if lay.permutations is None:
            return None
        name = lay.permutations[expert]
        p = self.tensor(name).astype(np.int64)
        n = lay.num_neurons
        if p.size and (p.min() < 0 or p.max() >= n or (np.bincount(p, minlength=n) != 1).any()):
            raise RmoeFormatError(f"tensor {name}: not a permutation of 0..{n - 1}")
        return p

    @_guard
    def coded(self, c: CodedTensor) -> np.ndarray:
        """A coded passthrough tensor (spec 4.2) decoded to its dtype and shape."""
        enc = Encoded(c.record.encoding, c.shape2d, c.record.value_dtype,
                      {p: self.tensor(t) for p, t in c.record.tensors.items()}, c.record.params, None)
        bits = codecs.CODECS["fields"].decode_bits(enc, c.record.tensors)
        return bits.view(dtypes.by_name(c.dtype).np).reshape(c.shape)

    def passthrough_tensors(self):
        """(name, array) of every passthrough tensor: those stored as they are, then the coded ones."""
        for name in self.schema.passthrough:
            yield name, self.tensor(name)
        for c in self.schema.coded:
            yield c.name, self.coded(c)

    @property
    def files(self) -> dict[str, bytes]:
        """Embedded source files (config.json, tokenizer files) by relative path."""
        return {f["path"]: self.tensor(f["tensor"]).tobytes() for f in self.schema.files}

    @property
    def model(self) -> dict[str, Any]:
        return self.schema.model

    def config(self) -> dict | None:
        """The embedded config.json, parsed, or None."""
        for f in self.schema.files:
            if f["path"] == "config.json":
                try:
                    return json.loads(self.tensor(f["tensor"]).tobytes().decode("utf-8"))
                except (ValueError, RecursionError) as e:
                    raise RmoeFormatError(f"embedded config.json is not valid JSON: {e}") from None
        return None

    def release(self) -> None:
        """Drop the file pages this process has touched from its resident set.

        The mapping is read-only and file-backed, so pages come back from the file on the
        next access; views stay valid. Streaming consumers call this between layers.
        """
        mm = getattr(self, "_mm", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED") and len(mm):
            mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        mm = getattr(self, "_mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views still alive; the map closes when they go
        self._f.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open(path: str | os.PathLike, verify_checksums: bool = True,  # noqa: A001
         max_matrix_elements: int = MAX_MATRIX_ELEMENTS, shard_only: bool = False) -> "Reader":
    """Open a .rmoe file: validates the header and schema, mmaps the data.

    Tensor checksums are checked when a tensor is first read; pass
    ``verify_checksums=False`` to skip that (the layout checks always run).
    ``max_matrix_elements`` bounds the size of one decoded expert matrix.
    A sharded file (spec 11) opens whole from its index ``OUT.rmoe.index.json`` or from any of its
    shards (the index beside it is found and every shard checked) as a
    :class:`resmoe_format.shards.ShardedReader`; ``shard_only=True`` opens one shard as the plain file it is.
    """
    from .shards import open_path

    return open_path(path, verify_checksums, max_matrix_elements, shard_only)


# ---------------------------------------------------------------------------------------
# Writer

@dataclass
class MoELayer:
    """One compressed MoE layer as the writer takes it (arrays in memory)."""

    index: int
    num_neurons: int
    matrices: list[MatrixSpec]
    base_kind: str
    base: dict[str, Encoded]
    residuals: list[dict[str, Encoded | None]]
    permutations: list[np.ndarray] | None = None
    sources: list[SourceSpec] = field(default_factory=list)
    prefix: str = ""
    #: method-specific data; an entry's "tensors" maps names to arrays written with the layer
    extensions: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the neuron indices a pruned base keeps (spec 4.7, version 5.0), strictly increasing; None: all
    base_channels: np.ndarray | None = None


def _header_cost(c: CodedTensor) -> int:
    """About the header bytes a coded tensor adds beyond a plain passthrough one: its schema entry and the
    header entries and checksums of its parts, less the plain tensor's (the writer codes only when that pays)."""
    entry = 80  # '"NAME":{"dtype":"U8","shape":[N],"data_offsets":[B,E]},' besides the name, and a checksum
    return len(json.dumps(c.to_json())) + sum(len(t) + entry for t in c.record.tensors.values()) \
        - (2 * len(c.name) + entry + 4)


class Finishing:
    """``with`` for writers: ``close()`` when the block succeeds, ``abort()`` when it raises."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Writer(Finishing):
    """Streams a .rmoe file to disk layer by layer and publishes it atomically.

    Tensors go to temporary spill files beside the target as they are added; ``close()``
    writes header + data to a temporary file, fsyncs it and renames it over the target.
    If anything fails (or the block of a ``with`` raises) the target is left untouched.
    """

    def __init__(self, path: str | os.PathLike, model: dict[str, Any], method: dict[str, Any] | None = None):
        self.path = Path(path)
        self.model = dict(model)
        self.method = dict(method or {})
        self._out = StreamingWriter(self.path)
        self._put = self._out.put
        self._files: list[dict[str, str]] = []
        self._passthrough: list[str] = []
        self._coded: list[CodedTensor] = []
        self._layers: list[LayerSpec] = []
        self._paths: dict[str, str] = {}  # embedded file paths claimed so far (spec 4.4)
        self._outputs: dict[str, str] = {}  # restored tensor name -> what restores it (spec 4.9)
        #: the part arrays of the layers written so far, while the caller keeps them alive (add_layer)
        self._earlier: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

    def add_file(self, path: str, data: bytes) -> None:
        """Embed a source file (config.json, tokenizer.json, ...) under a portable relative path (spec 4.4)."""
        claim_file_path(self._paths, path, "embedded file")
        self._files.append({"path": path, "tensor": self._put(f"rmoe.files.{path}", np.frombuffer(data, np.uint8))})

    def add_passthrough(self, name: str, array: np.ndarray, coded: bool = False) -> None:
        """Store a source tensor unchanged under its own name; ``coded``: a bf16, fp16 or fp32 tensor as a
        ``fields`` record (spec 4.2 ``coded``, version 4.0) when that is smaller, else unchanged."""
        if name.startswith(RESERVED_PREFIX):
            raise RmoeFormatError(f"passthrough tensor {name}: names starting with {RESERVED_PREFIX!r} are reserved")
        dt = dtypes.of_array(np.asarray(array)).name
        if coded and dt in dtypes.SOURCE_DTYPES and np.size(array):
            spec = CodedTensor(name, dt, tuple(np.shape(array)), EncodedRef("fields", dt, {}))
            enc = codecs.encode(np.asarray(array).reshape(spec.shape2d), "fields", dt)
            names = {p: f"rmoe.passthrough.{name}.{p}" for p in enc.parts}
            coded_spec = CodedTensor(name, dt, spec.shape, EncodedRef("fields", dt, names, enc.params))
            if enc.nbytes + _header_cost(coded_spec) < np.asarray(array).nbytes:
                claim_output(self._outputs, name, "a coded passthrough tensor")
                for p, a in enc.parts.items():
                    self._put(names[p], a)
                self._coded.append(coded_spec)
                return
        claim_output(self._outputs, name, "a passthrough tensor")
        self._passthrough.append(self._put(name, array))

    def add_layer(self, layer: MoELayer) -> LayerSpec:
        """Validate and write one compressed MoE layer; its arrays may be freed afterwards.

        The whole record is checked (schema rules, part shapes, permutations) before any of
        its bytes are written, so a refused layer leaves the writer usable.

        **Shared low-rank factors** (spec 4.8). Sharing is asked for by object identity: when
        the ``u`` array of a ``lowrank`` residual record *is* (``is``, not equal) the ``u``
        array of other lowrank residual records of the same expert, it is stored once and
        every record references it; likewise ``u_scales`` (int8 and k-quant values) and
        ``u_group_scales`` (k-quant values), which must then be shared by exactly the same records.
        The tensor is named after the first record that uses it, in the order of ``layer.residuals[k]``
        (e.g. ``rmoe.layers.{i}.experts.{k}.gate.u``), and the file is written as version 2.0 (1.0
        when nothing is shared; 3.0 whenever a record has k-quant values, spec 5.10). The records must
        have the same value dtype and quantization, and the shared array must fit each of them
        (same m and rank). Any other part array of an encoded record that is the same object as
        another is refused, since the format cannot share it: across experts, across layers
        (while the arrays of an earlier layer are still alive), in base records, or any part
        but ``u``/``u_scales``; pass a copy to store an array twice. Equal but distinct arrays
        are never shared. Permutations and extension tensors are always stored as given.
        """
        return self._write_layer(layer, layer.residuals, streamed=False)

    def add_layer_stream(self, layer: MoELayer, experts: Iterable[dict[str, Encoded | None]],
                         nbytes: int | None = None) -> LayerSpec:
        """:meth:`add_layer` with the residual records given one expert at a time (``layer.residuals`` is
        ignored; ``layer.extensions`` must be empty), so that memory holds one expert's records. The base and
        permutations are checked and written first, then each expert's records as they come; the file is
        byte for byte what :meth:`add_layer` writes. A refused record leaves the writer unusable (aborted).
        ``nbytes`` (the layer's tensor bytes, if known) is for :class:`~resmoe_format.shards.ShardedWriter`."""
        if layer.extensions:
            raise RmoeFormatError(f"layer {layer.index}: extensions cannot be written with add_layer_stream")
        try:
            return self._write_layer(layer, experts, streamed=True)
        except BaseException:
            self.abort()
            raise

    def _write_layer(self, layer: MoELayer, experts: Iterable[dict[str, Encoded | None]], streamed: bool) -> LayerSpec:
        i = layer.index
        if any(lay.index == i for lay in self._layers):
            raise RmoeFormatError(f"layer {i} written twice")
        pre = f"rmoe.layers.{i}"
        arrays: dict[str, np.ndarray] = {}
        # id(part array) -> (expert or None for the base, matrix, part, encoding, tensor name) of its first use
        first: dict[int, tuple[int | None, str, str, str, str]] = {}
        used: list[Any] = []  # the part arrays of this layer, remembered (weakly) once it is written
        written: dict[str, TensorEntry] = {}  # streamed: what is already on disk, for the checks
        # streamed: the part arrays of earlier experts, held weakly (they may be freed, and their ids reused)
        gone: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

        def where(k: int | None, m: str, part: str) -> str:
            return f"layer {i} {'base' if k is None else f'expert {k}'} matrix {m} part {part}"

        def ref(prefix: str, enc: Encoded, k: int | None, m: str) -> EncodedRef:
            tensors = {}
            for part, arr in enc.parts.items():
                if gone.get(id(arr)) is arr:
                    raise RmoeFormatError(f"{where(k, m, part)}: the same array object was written with an earlier "
                                          f"expert; only the u, u_scales and u_group_scales of one expert can be "
                                          f"shared (spec 4.8), pass a copy")
                if self._earlier.get(id(arr)) is arr:
                    raise RmoeFormatError(f"{where(k, m, part)}: the same array object was written with an earlier "
                                          f"layer; tensors are never shared across layers (spec 4.8), pass a copy")
                if id(arr) in first:
                    k0, m0, p0, enc0, name0 = first[id(arr)]
                    across = k is not None and k0 is not None and k != k0 and m == m0 and part == p0
                    if not ((k is not None and k == k0 and part == p0 and part in SHAREABLE_PARTS or across)
                            and enc.encoding == enc0 == "lowrank"):
                        raise RmoeFormatError(
                            f"{where(k, m, part)} is the same array object as {where(k0, m0, p0)}: only the u, "
                            f"u_scales and u_group_scales of lowrank residual records of one expert, or a factor of "
                            f"one matrix's lowrank records in several experts, can be shared (spec 4.8); "
                            f"pass a copy to store it twice")
                    tensors[part] = name0
                    continue
                tensors[part] = f"{prefix}.{part}"
                first[id(arr)] = (k, m, part, enc.encoding, tensors[part])
                arrays[tensors[part]] = np.asarray(arr)
                used.append(arr)
            return EncodedRef(enc.encoding, enc.value_dtype, tensors, dict(enc.params), enc.quant)

        def spec_of(residuals, perms=None, extensions=None, whole: bool = False) -> LayerSpec:
            """The layer's spec, or (not ``whole``) a part of it to check: some records, no sources."""
            spec = LayerSpec(i, layer.prefix, len(residuals), layer.num_neurons, list(layer.matrices),
                             layer.base_kind, base, perms, residuals, list(layer.sources) if whole else [],
                             extensions or {}, channels)
            return LayerSpec.from_json(json.loads(json.dumps(spec.to_json())), f"layer {i}")

        def check(spec: LayerSpec) -> None:
            # the rules of spec 4.8 on this layer alone (value dtype, quant, u with u_scales), then every part's shape
            tensor_roles(Schema({}, {}, [], [], [spec], {"tensor": CHECKSUM_TENSOR}), allow_shared=True,
                         allow_cross=True)
            pseudo = {**written, **{n: TensorEntry(n, dtypes.of_array(a).name, a.shape, 0, 0)
                                    for n, a in arrays.items()}}
            _check_layer(spec, pseudo, 2**62)

        def remember(arrs: list[Any]) -> None:
            for arr in arrs:
                try:
                    self._earlier[id(arr)] = arr
                    if streamed:
                        gone[id(arr)] = arr
                except TypeError:  # not weakly referenceable (not an ndarray): cannot be tracked
                    pass

        def put_all() -> None:
            clash = [n for n in arrays if n in self._out.entries]
            if clash:
                raise RmoeFormatError(f"tensor {clash[0]} written twice")
            for name, arr in arrays.items():
                self._put(name, arr)
                written[name] = TensorEntry(name, dtypes.of_array(arr).name, arr.shape, 0, 0)
            arrays.clear()
            if streamed:  # the records of one expert are written: hold them weakly only
                remember(used)
                used.clear()
                first.clear()

        base = {m: ref(f"{pre}.base.{m}", e, None, m) for m, e in layer.base.items()}
        perms = None
        if layer.permutations is not None:
            pdt = dtypes.by_name(permutation_dtype(layer.num_neurons)).np
            perms = []
            for k, p in enumerate(layer.permutations):
                p = np.asarray(p)
                if p.shape != (layer.num_neurons,) or not np.array_equal(np.sort(p), np.arange(layer.num_neurons)):
                    raise RmoeFormatError(f"layer {i} expert {k}: permutation is not a permutation of "
                                          f"0..{layer.num_neurons - 1}")
                perms.append(f"{pre}.experts.{k}.permutation")
                arrays[perms[-1]] = p.astype(pdt)
        channels = None
        if layer.base_channels is not None:
            ch = np.asarray(layer.base_channels, dtype=np.int64)
            if ch.ndim != 1 or not ch.size or ch[0] < 0 or ch[-1] >= layer.num_neurons or np.any(np.diff(ch) <= 0):
                raise RmoeFormatError(f"layer {i}: base channels must be strictly increasing neuron indices below "
                                      f"{layer.num_neurons}")
            channels = f"{pre}.base.channels"
            arrays[channels] = ch.astype(dtypes.by_name(permutation_dtype(layer.num_neurons)).np)
        residuals = []
        if streamed:  # the base and permutations now, then each expert's records checked and written as they come
            if base:
                check(spec_of([{m.name: None for m in layer.matrices}]))  # the base alone
            put_all()
            for k, r in enumerate(experts):
                if perms is not None and k >= len(perms):
                    raise RmoeFormatError(f"layer {i}: more experts than permutations ({len(perms)})")
                residuals.append({m: (ref(f"{pre}.experts.{k}.{m}", e, k, m) if e is not None else None)
                                  for m, e in r.items()})
                check(spec_of([residuals[-1]]))
                put_all()
        else:
            residuals = [{m: (ref(f"{pre}.experts.{k}.{m}", e, k, m) if e is not None else None)
                          for m, e in r.items()} for k, r in enumerate(experts)]
        extensions = {}
        for key, val in layer.extensions.items():
            val = dict(val)
            if "tensors" in val:
                names = {}
                for part, arr in val["tensors"].items():
                    names[part] = f"{pre}.extensions.{key}.{part}"
                    arrays[names[part]] = np.asarray(arr)
                val["tensors"] = names
            extensions[key] = val
        spec = spec_of(residuals, perms, extensions, whole=True)
        outputs = dict(self._outputs)
        for s in spec.sources:
            claim_output(outputs, s.name, f"layer {i}")
        check(spec)
        put_all()
        self._layers.append(spec)
        self._outputs = outputs
        remember(used)
        return spec

    # --- finishing -------------------------------------------------------------------
    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data added so far (before the checksum table)."""
        return self._out.data_bytes

    def prepare(self, minor: int = 0) -> tuple[str, str]:
        """Add the checksum table and build the schema: (version, schema JSON text). The version is the lowest
        that expresses the file (spec 1.4) with minor ``minor`` (1: a shard of a sharded file, spec 11)."""
        if getattr(self, "_prepared", None) is None:
            # place the checksum tensor first, then fill it in final data order
            self._put(CHECKSUM_TENSOR, np.zeros(len(self._out.entries), dtype=np.uint32))
            crcs = np.array([self._out.crc(t.name) for t in self._out.layout() if t.name != CHECKSUM_TENSOR],
                            dtype=np.uint32)
            self._out.overwrite(CHECKSUM_TENSOR, crcs)
            schema = Schema(self.model, self.method, self._files, self._passthrough, self._layers,
                            {"algorithm": "crc32", "tensor": CHECKSUM_TENSOR, "crc32": crc32(crcs)},
                            coded=self._coded)
            version = lowest_version(schema)  # spec 1.4: 1.0 unless a tensor is shared or k-quant
            if minor:
                version = f"{parse_version(version)[0]}.{minor}"
            schema.version = version
            self._prepared = version, json.dumps(schema.to_json(), separators=(",", ":"), ensure_ascii=False)
        return self._prepared

    def commit(self, target: str | os.PathLike | None = None, extra: dict[str, str] | None = None, minor: int = 0,
               publish: bool = True) -> Path:
        """Finish the file at ``target`` (default: the writer's path) with ``extra`` ``__metadata__`` keys after
        the four of spec 3; ``publish=False`` leaves the fsynced hidden temporary and returns its path."""
        try:
            version, raw = self.prepare(minor)

            def metadata(entries: list[TensorEntry]) -> dict[str, str]:
                check_schema_layout(Schema.from_json(json.loads(raw)), {t.name: t for t in entries}, 2**62,
                                    major=parse_version(version)[0])
                return {META_FORMAT: FORMAT_NAME, META_VERSION: version, META_SCHEMA: raw,
                        META_SCHEMA_CRC: str(crc32(raw.encode("utf-8"))), **(extra or {})}

            return self._out.commit(metadata, target, publish)
        finally:
            self._out.abort()

    def close(self) -> None:
        """Finish the file and move it into place atomically."""
        if not self._out.closed:
            self.commit()

    def abort(self) -> None:
        """Discard everything written; the target path is not touched."""
        self._out.abort()


