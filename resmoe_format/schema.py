"""The schema document: what every tensor of a .rmoe file is (spec/FORMAT.md, section 4).

Classes here mirror the JSON one to one. ``from_json`` validates structure and types
and raises :class:`RmoeFormatError` for anything else; cross-checks against the tensor
table happen in :mod:`resmoe_format.container`.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any

from . import dtypes
from .codecs import ENCODINGS, AnyQuant
from .codecs.base import parse_quant
from .errors import RmoeFormatError

FORMAT_NAME = "rmoe"
#: The newest version this library reads and writes (spec 1.4). The writer writes the lowest
#: version that expresses a file: ``BASE_VERSION`` unless it shares a low-rank factor (spec 4.8),
#: which needs ``SHARED_FACTORS_VERSION``, or stores k-quant values (spec 5.10), which need ``KQUANT_VERSION``,
#: or has a ``fields`` record or a ``predictor`` base (spec 5.11), which need ``FIELDS_VERSION``, or shares a
#: low-rank factor across the experts of a layer (spec 4.8), which needs ``CROSS_FACTORS_VERSION``.
VERSION = (6, 0)
VERSION_STR = f"{VERSION[0]}.{VERSION[1]}"
#: The version of every file that uses no feature added after 1.0.
BASE_VERSION = (1, 0)
BASE_VERSION_STR = f"{BASE_VERSION[0]}.{BASE_VERSION[1]}"
#: The first version in which a lowrank ``u``/``u_scales`` may be shared by the records of one expert.
SHARED_FACTORS_VERSION = (2, 0)
SHARED_FACTORS_VERSION_STR = f"{SHARED_FACTORS_VERSION[0]}.{SHARED_FACTORS_VERSION[1]}"
#: The first version with the k-quant value dtypes ``q2`` … ``q8``, ``ternary`` (spec 5.10).
KQUANT_VERSION = (3, 0)
KQUANT_VERSION_STR = f"{KQUANT_VERSION[0]}.{KQUANT_VERSION[1]}"
#: The first version with the ``fields`` encoding and the ``predictor`` base kind (spec 5.11, 4.7).
FIELDS_VERSION = (4, 0)
FIELDS_VERSION_STR = f"{FIELDS_VERSION[0]}.{FIELDS_VERSION[1]}"
#: The first version in which the records of one matrix in several experts may share a low-rank factor (spec 4.8).
CROSS_FACTORS_VERSION = (5, 0)
CROSS_FACTORS_VERSION_STR = f"{CROSS_FACTORS_VERSION[0]}.{CROSS_FACTORS_VERSION[1]}"
#: The first version with compressed experts (spec 4.5 ``compressed_experts``): a file that changes what the
#: model computes, so a reader that does not know them must refuse it (a major version).
CE_VERSION = (6, 0)
CE_VERSION_STR = f"{CE_VERSION[0]}.{CE_VERSION[1]}"
#: dtypes a layer's compressed-expert vectors may have (the reference writer writes fp32)
CE_DTYPES = ("bf16", "fp16", "fp32")
#: Major versions this reader understands (any minor version of each).
READ_MAJORS = (1, 2, 3, 4, 5, 6)
BASE_KINDS = ("barycenter", "mean", "weighted", "none", "predictor")
#: Base kinds whose matrices are not added to the residuals (spec 6.1): none, and predictor (5.11).
UNADDED_BASE_KINDS = ("none", "predictor")
JOINS = ("concat", "interleave")
PERMUTATION_DTYPES = ("u16", "i32")
MAX_NDIM = 8


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _obj(d: Any, where: str) -> dict:
    if not isinstance(d, dict):
        raise RmoeFormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
    return d


def _req(d: dict, key: str, where: str, kind: type | tuple, optional: bool = False, default: Any = None) -> Any:
    if key not in d:
        if optional:
            return default
        raise RmoeFormatError(f"{where}: required field {key!r} is missing")
    v = d[key]
    ok = _is_int(v) if kind is int else isinstance(v, kind)
    if not ok:
        raise RmoeFormatError(f"{where}.{key}: wrong type {type(v).__name__}")
    return v


def _shape(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_NDIM or not all(_is_int(s) and 0 <= s < 2**48 for s in v):
        raise RmoeFormatError(f"{where}: shape must be a list of at most {MAX_NDIM} non-negative integers")
    return tuple(v)


def _name(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise RmoeFormatError(f"{where}: tensor name must be a non-empty string")
    return v


@dataclass
class MatrixSpec:
    """One matrix of every expert of a layer, in canonical orientation."""

    name: str
    shape: tuple[int, ...]  # 1-D (vector) or 2-D
    dtype: str  # source dtype: the restored matrix is cast to it
    neuron_axis: int | None  # axis indexed by hidden neuron (permuted), or None

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "neuron_axis": self.neuron_axis}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "MatrixSpec":
        d = _obj(d, where)
        shape = _shape(_req(d, "shape", where, list), where + ".shape")
        if len(shape) not in (1, 2):
            raise RmoeFormatError(f"{where}.shape: an expert matrix is 1-D or 2-D")
        dt = _req(d, "dtype", where, str)
        if dt not in dtypes.SOURCE_DTYPES:
            raise RmoeFormatError(f"{where}.dtype: {dt!r} is not one of {dtypes.SOURCE_DTYPES}")
        ax = d.get("neuron_axis")
        if ax is not None and not (_is_int(ax) and 0 <= ax < len(shape)):
            raise RmoeFormatError(f"{where}.neuron_axis: {ax!r} is not an axis of shape {list(shape)}")
        return cls(_req(d, "name", where, str), shape, dt, ax)

    @property
    def shape2d(self) -> tuple[int, int]:
        return (1, self.shape[0]) if len(self.shape) == 1 else (self.shape[0], self.shape[1])

    def kept(self, channels: int | None) -> "MatrixSpec":
        """This matrix as a base with pruned channels stores it (spec 4.7): ``channels`` entries along the
        neuron axis (itself when ``channels`` is None or the matrix has no neuron axis)."""
        if channels is None or self.neuron_axis is None:
            return self
        shape = list(self.shape)
        shape[self.neuron_axis] = channels
        return MatrixSpec(self.name, tuple(shape), self.dtype, self.neuron_axis)


@dataclass
class EncodedRef:
    """Where an encoded matrix lives: its encoding, value dtype, params and part tensors."""

    encoding: str
    value_dtype: str
    tensors: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)
    quant: AnyQuant | None = None

    def to_json(self) -> dict:
        d: dict[str, Any] = {"encoding": self.encoding, "value_dtype": self.value_dtype, "tensors": self.tensors}
        if self.params:
            d["params"] = self.params
        if self.quant is not None:
            d["quant"] = self.quant.to_json()
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> "EncodedRef":
        d = _obj(d, where)
        enc = _req(d, "encoding", where, str)
        if enc not in ENCODINGS:
            raise RmoeFormatError(f"{where}.encoding: unknown encoding {enc!r} (known: {', '.join(ENCODINGS)})")
        vd = _req(d, "value_dtype", where, str)
        if vd not in dtypes.VALUE_DTYPES:
            raise RmoeFormatError(f"{where}.value_dtype: {vd!r} is not one of {dtypes.VALUE_DTYPES}")
        tensors = _obj(_req(d, "tensors", where, dict), where + ".tensors")
        for k, v in tensors.items():
            _name(v, f"{where}.tensors.{k}")
        params = _obj(d.get("params", {}), where + ".params")
        quant = parse_quant(d.get("quant"), where + ".quant", vd)
        return cls(enc, vd, dict(tensors), dict(params), quant)


@dataclass
class SourceSpec:
    """How one tensor of the source checkpoint is assembled from restored expert matrices.

    Per expert: each part (a matrix name) is transposed if ``transpose``; several parts are
    joined (``concat`` or ``interleave``) along ``join_axis``. ``expert`` is an expert index,
    or ``"all"`` to stack every expert's result along a new leading axis.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    expert: int | str
    parts: list[str]
    transpose: bool = False
    join: str | None = None
    join_axis: int = 0

    def to_json(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "expert": self.expert,
             "parts": list(self.parts), "transpose": self.transpose}
        if self.join is not None:
            d["join"] = self.join
            d["join_axis"] = self.join_axis
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> "SourceSpec":
        d = _obj(d, where)
        ex = d.get("expert")
        if not (ex == "all" or (_is_int(ex) and ex >= 0)):
            raise RmoeFormatError(f"{where}.expert: must be an expert index or \"all\", got {ex!r}")
        parts = _req(d, "parts", where, list)
        if not parts or not all(isinstance(p, str) for p in parts):
            raise RmoeFormatError(f"{where}.parts: a non-empty list of matrix names")
        join = d.get("join")
        if len(parts) > 1 and join not in JOINS:
            raise RmoeFormatError(f"{where}.join: several parts need join in {JOINS}, got {join!r}")
        if join is not None and join not in JOINS:
            raise RmoeFormatError(f"{where}.join: {join!r} is not one of {JOINS}")
        dt = _req(d, "dtype", where, str)
        if dt not in dtypes.SOURCE_DTYPES:
            raise RmoeFormatError(f"{where}.dtype: {dt!r} is not one of {dtypes.SOURCE_DTYPES}")
        return cls(_name(d.get("name"), where + ".name"), dt, _shape(_req(d, "shape", where, list), where),
                   ex, list(parts), bool(_req(d, "transpose", where, bool, True, False)), join,
                   _req(d, "join_axis", where, int, True, 0))


@dataclass
class CompressedExpertsSpec:
    """A layer's compressed experts (spec 4.5 ``compressed_experts``, version 6.0): the tensor of the per-expert
    vectors (E, 3, max(hidden, n)) and n_ce, how many of a token's top-k experts they stand in for."""

    vectors: str
    n_ce: int

    def to_json(self) -> dict:
        return {"vectors": self.vectors, "n_ce": self.n_ce}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "CompressedExpertsSpec":
        d = _obj(d, where)
        n_ce = _req(d, "n_ce", where, int)
        if not 1 <= n_ce < 2**16:
            raise RmoeFormatError(f"{where}.n_ce: {n_ce} is not between 1 and 65535")
        return cls(_name(d.get("vectors"), where + ".vectors"), n_ce)


@dataclass
class LayerSpec:
    """One compressed MoE layer: base, permutations, per-expert residuals, source mapping."""

    index: int
    prefix: str
    num_experts: int
    num_neurons: int
    matrices: list[MatrixSpec]
    base_kind: str
    base: dict[str, EncodedRef]
    permutations: list[str] | None
    residuals: list[dict[str, EncodedRef | None]]
    sources: list[SourceSpec]
    extensions: dict[str, Any] = field(default_factory=dict)
    #: the tensor of the neuron indices the base keeps (spec 4.7 ``channels``, version 5.0); None: all of them
    base_channels: str | None = None
    #: the layer's compressed experts (spec 4.5, version 6.0); None: none
    ce: CompressedExpertsSpec | None = None

    @property
    def hidden(self) -> int | None:
        """The hidden size: the other axis of the first 2-D matrix with a neuron axis, or None."""
        for m in self.matrices:
            if len(m.shape) == 2 and m.neuron_axis is not None:
                return m.shape[1 - m.neuron_axis]
        return None

    @property
    def adds_base(self) -> bool:
        """Whether restoration adds the base to the residuals (spec 6.1): not for kinds none and predictor."""
        return self.base_kind not in UNADDED_BASE_KINDS

    def matrix(self, name: str) -> MatrixSpec:
        for m in self.matrices:
            if m.name == name:
                return m
        raise RmoeFormatError(f"layer {self.index}: no matrix named {name!r}")

    def to_json(self) -> dict:
        d = {
            "index": self.index, "prefix": self.prefix, "num_experts": self.num_experts,
            "num_neurons": self.num_neurons, "matrices": [m.to_json() for m in self.matrices],
            "base": {"kind": self.base_kind, "matrices": {k: v.to_json() for k, v in self.base.items()},
                     **({"channels": self.base_channels} if self.base_channels is not None else {})},
            "permutations": self.permutations,
            "residuals": [{k: (v.to_json() if v else None) for k, v in r.items()} for r in self.residuals],
            "sources": [s.to_json() for s in self.sources],
        }
        if self.extensions:
            d["extensions"] = self.extensions
        if self.ce is not None:
            d["compressed_experts"] = self.ce.to_json()
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> "LayerSpec":
        d = _obj(d, where)
        index = _req(d, "index", where, int)
        where = f"layer {index}"
        E = _req(d, "num_experts", where, int)
        n = _req(d, "num_neurons", where, int)
        if not (1 <= E <= 2**20) or not (0 <= n < 2**31):
            raise RmoeFormatError(f"{where}: num_experts {E} or num_neurons {n} out of range")
        mats = [MatrixSpec.from_json(m, f"{where}.matrices[{i}]")
                for i, m in enumerate(_req(d, "matrices", where, list))]
        names = [m.name for m in mats]
        if len(set(names)) != len(names) or not names:
            raise RmoeFormatError(f"{where}.matrices: names must be unique and at least one")
        for m in mats:
            if m.neuron_axis is not None and m.shape[m.neuron_axis] != n:
                raise RmoeFormatError(f"{where}.matrices.{m.name}: neuron axis has {m.shape[m.neuron_axis]} "
                                      f"entries, num_neurons is {n}")
        b = _obj(_req(d, "base", where, dict), where + ".base")
        kind = _req(b, "kind", where + ".base", str)
        if kind not in BASE_KINDS:
            raise RmoeFormatError(f"{where}.base.kind: {kind!r} is not one of {BASE_KINDS}")
        base = {k: EncodedRef.from_json(v, f"{where}.base.{k}")
                for k, v in _obj(b.get("matrices", {}), where + ".base.matrices").items()}
        if kind == "none" and base:
            raise RmoeFormatError(f"{where}.base: kind none carries no matrices")
        if kind == "predictor" and set(base) - set(names):
            raise RmoeFormatError(f"{where}.base: unknown matrices {sorted(set(base) - set(names))}")
        if kind not in UNADDED_BASE_KINDS and set(base) != set(names):
            raise RmoeFormatError(f"{where}.base: needs exactly the matrices {names}, has {sorted(base)}")
        channels = b.get("channels")
        if channels is not None:
            channels = _name(channels, f"{where}.base.channels")
            if kind in UNADDED_BASE_KINDS:
                raise RmoeFormatError(f"{where}.base.channels: a base of kind {kind} has no channels to keep")
        perms = d.get("permutations")
        if perms is not None:
            if not isinstance(perms, list) or len(perms) != E:
                raise RmoeFormatError(f"{where}.permutations: a list of {E} tensor names or null")
            perms = [_name(p, f"{where}.permutations[{i}]") for i, p in enumerate(perms)]
        res_raw = _req(d, "residuals", where, list)
        if len(res_raw) != E:
            raise RmoeFormatError(f"{where}.residuals: {len(res_raw)} entries for {E} experts")
        residuals = []
        for k, r in enumerate(res_raw):
            r = _obj(r, f"{where}.residuals[{k}]")
            if set(r) - set(names):
                raise RmoeFormatError(f"{where}.residuals[{k}]: unknown matrices {sorted(set(r) - set(names))}")
            residuals.append({m: (EncodedRef.from_json(r[m], f"{where}.residuals[{k}].{m}")
                                  if r.get(m) is not None else None) for m in names})
            if kind in UNADDED_BASE_KINDS and any(v is None for v in residuals[-1].values()):
                raise RmoeFormatError(f"{where}.residuals[{k}]: with base kind {kind} every matrix needs a residual")
        sources = [SourceSpec.from_json(s, f"{where}.sources[{i}]")
                   for i, s in enumerate(_req(d, "sources", where, list))]
        ext = _obj(d.get("extensions", {}), where + ".extensions")
        for key, val in ext.items():
            val = _obj(val, f"{where}.extensions.{key}")
            for part, t in _obj(val.get("tensors", {}), f"{where}.extensions.{key}.tensors").items():
                _name(t, f"{where}.extensions.{key}.tensors.{part}")
        ce = d.get("compressed_experts")
        if ce is not None:
            ce = CompressedExpertsSpec.from_json(ce, where + ".compressed_experts")
        return cls(index, _req(d, "prefix", where, str, True, ""), E, n, mats, kind, base, perms,
                   residuals, sources, ext, channels, ce)


@dataclass
class CodedTensor:
    """A passthrough tensor stored by an encoded record (spec 4.2 ``coded``, version 4.0): ``fields`` of its
    own dtype, in the 2-D view (shape[0], product of the rest), or (1, L) for a 1-D tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    record: EncodedRef

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "record": self.record.to_json()}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "CodedTensor":
        d = _obj(d, where)
        dt = _req(d, "dtype", where, str)
        if dt not in dtypes.SOURCE_DTYPES:
            raise RmoeFormatError(f"{where}.dtype: {dt!r} is not one of {dtypes.SOURCE_DTYPES}")
        rec = EncodedRef.from_json(d.get("record"), where + ".record")
        if rec.encoding != "fields" or rec.value_dtype != dt:
            raise RmoeFormatError(f"{where}.record: a coded tensor is a fields record of its own dtype {dt}, got "
                                  f"{rec.encoding}/{rec.value_dtype}")
        return cls(_name(d.get("name"), where + ".name"), dt, _shape(_req(d, "shape", where, list), where + ".shape"),
                   rec)

    @property
    def shape2d(self) -> tuple[int, int]:
        rest = 1
        for s in self.shape[1:]:
            rest *= s
        return (self.shape[0], rest) if len(self.shape) >= 2 else (1, self.shape[0] if self.shape else 1)


@dataclass
class Schema:
    """The whole schema document."""

    model: dict[str, Any]
    method: dict[str, Any]
    files: list[dict[str, str]]
    passthrough: list[str]
    layers: list[LayerSpec]
    checksum: dict[str, Any]
    version: str = VERSION_STR
    coded: list[CodedTensor] = field(default_factory=list)  # version 4.0; written only when not empty

    def to_json(self) -> dict:
        d = {"format": FORMAT_NAME, "version": self.version, "model": self.model, "method": self.method,
             "checksum": self.checksum, "files": self.files, "passthrough": self.passthrough,
             "layers": [lay.to_json() for lay in self.layers]}
        if self.coded:
            d["coded"] = [c.to_json() for c in self.coded]
        return d

    @classmethod
    def from_json(cls, d: Any) -> "Schema":
        d = _obj(d, "schema")
        model = _obj(_req(d, "model", "schema", dict), "schema.model")
        method = _obj(d.get("method", {}), "schema.method")
        cks = _obj(_req(d, "checksum", "schema", dict), "schema.checksum")
        if _req(cks, "algorithm", "schema.checksum", str) != "crc32":
            raise RmoeFormatError(f"schema.checksum.algorithm: only crc32 is defined, got {cks['algorithm']!r}")
        _name(cks.get("tensor"), "schema.checksum.tensor")
        _req(cks, "crc32", "schema.checksum", int)
        files = _req(d, "files", "schema", list, True, [])
        paths: dict[str, str] = {}
        for i, f in enumerate(files):
            f = _obj(f, f"schema.files[{i}]")
            claim_file_path(paths, f.get("path"), f"schema.files[{i}].path")
            _name(f.get("tensor"), f"schema.files[{i}].tensor")
        passthrough = _req(d, "passthrough", "schema", list, True, [])
        for i, p in enumerate(passthrough):
            _name(p, f"schema.passthrough[{i}]")
        layers = [LayerSpec.from_json(x, f"schema.layers[{i}]")
                  for i, x in enumerate(_req(d, "layers", "schema", list))]
        idx = [lay.index for lay in layers]
        if len(set(idx)) != len(idx):
            raise RmoeFormatError("schema.layers: layer indices must be unique")
        coded = [CodedTensor.from_json(c, f"schema.coded[{i}]")
                 for i, c in enumerate(_req(d, "coded", "schema", list, True, []))]
        outputs = {p: "a passthrough tensor" for p in passthrough}  # repeats there are caught as tensor roles
        for c in coded:
            claim_output(outputs, c.name, "a coded passthrough tensor")
        for lay in layers:
            for s in lay.sources:
                claim_output(outputs, s.name, f"layer {lay.index}")
        return cls(model, method, [dict(f) for f in files], list(passthrough), layers, dict(cks),
                   d.get("version", VERSION_STR), coded)


def claim_output(claimed: dict[str, str], name: str, by: str) -> None:
    """Record that ``by`` restores the tensor ``name``; a name restored twice is an error (spec 4.9)."""
    if name in claimed:
        raise RmoeFormatError(f"{by} restores tensor {name!r}, which {claimed[name]} restores too: "
                              f"every restored tensor name must be unique")
    claimed[name] = by


#: Device names Windows reserves in every directory, with any extension ("NUL.txt").
_WINDOWS_DEVICES = frozenset({"con", "prn", "aux", "nul", "conin$", "conout$"}
                             | {f"{p}{d}" for p in ("com", "lpt") for d in "0123456789\u00b9\u00b2\u00b3"})
#: Characters no path component may hold: the separators and drive colon of other systems, the
#: characters Windows forbids, and control characters (NUL included).
_PATH_FORBIDDEN = frozenset('\\:*?"<>|') | frozenset(map(chr, range(32)))
#: The restored checkpoint's weights (6.6): an embedded file may not take their place.
RESERVED_FILE_PATHS = ("model.safetensors", "model.safetensors.index.json")


def _path_problem(p: str) -> str | None:
    bad = sorted(set(p) & _PATH_FORBIDDEN)
    if bad:
        return f"it contains {bad[0]!r}"
    for c in p.split("/"):
        if c in ("", ".", ".."):
            return "it is empty, absolute, or has an empty, '.' or '..' component"
        if c[-1] in ". ":
            return f"component {c!r} ends with a dot or a space"
        if c.partition(".")[0].rstrip(" ").casefold() in _WINDOWS_DEVICES:
            return f"component {c!r} is a device name on Windows"
    if p.casefold() in RESERVED_FILE_PATHS:
        return "the restored checkpoint's weights take that name"
    return None


def claim_file_path(claimed: dict[str, str], path: Any, where: str) -> None:
    """Check an embedded file's path (spec 4.4) and that it clashes with none claimed so far; record it.

    ``claimed`` maps the case-folded paths of files, and of the directories they lie in, to
    ``"file"`` or ``"dir"``.
    """
    why = _path_problem(path) if isinstance(path, str) else "it is not a string"
    if why:
        raise RmoeFormatError(f"{where}: {path!r} is not a portable relative file path: {why}")
    key = unicodedata.normalize("NFC", path).casefold()
    parts = key.split("/")
    dirs = ["/".join(parts[:i]) for i in range(1, len(parts))]
    if key in claimed or any(claimed.get(x) == "file" for x in dirs):
        raise RmoeFormatError(f"{where}: {path!r} clashes with another embedded file: paths must differ in more "
                              f"than case, and no file may be the directory of another")
    claimed[key] = "file"
    claimed.update((x, "dir") for x in dirs)


def parse_version(s: Any) -> tuple[int, int]:
    """Parse "major.minor"; reject an unknown major version with a clear message."""
    if not isinstance(s, str):
        raise RmoeFormatError(f"rmoe_version must be a string, got {type(s).__name__}")
    try:
        major_s, minor_s = s.split(".")
        major, minor = int(major_s), int(minor_s)
        if major < 0 or minor < 0:
            raise ValueError
    except ValueError:
        raise RmoeFormatError(f"rmoe_version {s!r} is not of the form major.minor") from None
    if major not in READ_MAJORS:
        *first, last = map(str, READ_MAJORS)
        majors = f"{', '.join(first)} and {last}" if first else last
        raise RmoeFormatError(f"this file is .rmoe version {s}; this reader understands major versions "
                              f"{majors} only (upgrade resmoe to read it)")
    return major, minor
