"""Sharded .rmoe files (spec/FORMAT.md section 11): ordinary .rmoe files ``OUT-00001-of-0000N.rmoe`` ...
and a JSON index ``OUT.rmoe.index.json`` beside them.

:class:`ShardedWriter` takes what :class:`~resmoe_format.container.Writer` takes and starts a new shard
whenever the next item would push the current one past the size limit; nothing is published until
``close()``, which writes every shard and the index to hidden temporaries and renames them into place,
the index last. :class:`ShardedReader` opens the set through its index and reads it like one file;
every shard is checked against the index (present, its size, its set, its schema's CRC-32) first.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import publish
from .container import (CHECKSUM_TENSOR, MAX_MATRIX_ELEMENTS, META_SCHEMA, Finishing, MoELayer, Reader, Writer,
                        permutation_dtype)
from .dtypes import by_name
from .errors import RmoeFormatError
from .safetensors_header import parse_json
from .schema import EncodedRef, LayerSpec, MatrixSpec, Schema, claim_file_path, claim_output, parse_version
from .stream import crc32

INDEX_FORMAT = "rmoe-index"
#: The minor version of a shard (spec 11): the lowest major that expresses its content, then ``.1``.
SHARD_MINOR = 1
#: ``__metadata__`` keys of a shard (spec 11.3), all decimal or plain strings.
META_SHARD, META_SHARD_COUNT, META_SHARD_SET, META_SHARD_INDEX = ("rmoe_shard", "rmoe_shard_count", "rmoe_shard_set",
                                                                  "rmoe_shard_index")
#: Largest index file a reader accepts (a 671B model's index is a few MB).
MAX_INDEX_BYTES = 256 << 20
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """``50GB``, ``500MB``, ``1.5GiB``, ``4096`` (bytes) as a number of bytes; KB/MB/GB/TB are powers of
    1000, KiB/MiB/GiB/TiB powers of 1024 (case-insensitive). A ValueError says what is accepted."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = _SIZE.match(str(text))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise ValueError(f"{text!r} is not a size: give a number with an optional unit, such as 50GB, 500MB, "
                             f"1.5GiB or 4096 (bytes)")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1:
        raise ValueError(f"{text!r}: a shard size must be at least 1 byte")
    return n


def index_path(out: str | os.PathLike) -> Path:
    """The index of a sharded output ``OUT.rmoe``: ``OUT.rmoe.index.json`` beside it."""
    out = Path(out)
    return out.parent / f"{out.name}.index.json"


def _stem(out: Path) -> str:
    return out.name[:-len(".rmoe")] if out.name.endswith(".rmoe") and len(out.name) > 5 else out.name


def shard_path(out: str | os.PathLike, i: int, n: int) -> Path:
    """Shard ``i`` (from 1) of ``n`` of the output ``OUT.rmoe``: ``OUT-0000i-of-0000n.rmoe`` beside it."""
    out = Path(out)
    return out.parent / f"{_stem(out)}-{i:05d}-of-{n:05d}.rmoe"


def is_shard_of(out: str | os.PathLike, name: str) -> bool:
    """Whether a file name is one a sharded ``out`` may write (any shard number and count)."""
    return re.fullmatch(re.escape(_stem(Path(out))) + r"-\d{5,}-of-\d{5,}\.rmoe", name) is not None


def layer_nbytes(layer: MoELayer) -> int:
    """The tensor data bytes :meth:`Writer.add_layer` writes for ``layer`` (shared arrays once)."""
    seen: set[int] = set()
    n = 0
    records = [*layer.base.values(), *(e for r in layer.residuals for e in r.values() if e is not None)]
    for enc in records:
        for a in enc.parts.values():
            if id(a) not in seen:
                seen.add(id(a))
                n += np.asarray(a).nbytes
    if layer.permutations is not None:
        n += len(layer.permutations) * layer.num_neurons * by_name(permutation_dtype(layer.num_neurons)).itemsize
    for ext in layer.extensions.values():
        n += sum(np.asarray(a).nbytes for a in ext.get("tensors", {}).values())
    return n


def set_id(schemas: list[str]) -> str:
    """The identifier of a set of shards (spec 11.3): SHA-256 of their ``rmoe_schema`` texts, each as UTF-8
    followed by one zero byte, in shard order; lower-case hex."""
    h = hashlib.sha256()
    for raw in schemas:
        h.update(raw.encode("utf-8") + b"\0")
    return h.hexdigest()


def _human(n: int) -> str:
    """A byte count in the largest decimal unit that keeps it at 1 or more (``60.0 KB``, ``1.5 GB``)."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


class ShardedWriter(Finishing):
    """:class:`Writer`'s interface, writing a sharded file (spec 11) whose shards hold at most
    ``max_shard_size`` bytes of tensor data each.

    Embedded files go to the first shard; passthrough tensors (counted at their uncoded size) and
    layers go, in the order added, to the current shard while they fit and start the next one
    otherwise. An item larger than the limit gets a shard of its own (one warning at ``close()``
    lists them). When everything fits in one shard the output is the plain unsharded file ``path``,
    byte for byte what :class:`Writer` writes. Nothing appears at any output path before ``close()``.
    """

    def __init__(self, path: str | os.PathLike, model: dict[str, Any], method: dict[str, Any] | None,
                 max_shard_size: int):
        self.path = Path(path)
        self.model, self.method = dict(model), dict(method or {})
        self.max_shard_size = parse_size(max_shard_size)
        self._writers: list[Writer] = [Writer(self.path, self.model, self.method)]
        self._outputs: dict[str, str] = {}
        self._files: dict[str, str] = {}
        self._layers: set[int] = set()
        self._oversized: list[tuple[str, int, int]] = []  # (what, bytes, shard number)
        #: the published paths, shards in order then the index (or the one plain file), after close()
        self.outputs: list[Path] = []

    def _room(self, nbytes: int, what: str) -> Writer:
        w = self._writers[-1]
        if w.data_bytes and w.data_bytes + nbytes > self.max_shard_size:
            w = Writer(self.path, self.model, self.method)
            self._writers.append(w)
        if nbytes > self.max_shard_size:
            self._oversized.append((what, nbytes, len(self._writers)))
        return w

    def add_file(self, path: str, data: bytes) -> None:
        """Embed a source file: always in the first shard."""
        claim_file_path(self._files, path, "embedded file")
        self._writers[0].add_file(path, data)

    def add_passthrough(self, name: str, array: np.ndarray, coded: bool = False) -> None:
        claim_output(self._outputs, name, "a passthrough tensor")
        self._room(np.asarray(array).nbytes, f"tensor {name}").add_passthrough(name, array, coded)

    def add_layer(self, layer: MoELayer) -> LayerSpec:
        if layer.index in self._layers:
            raise RmoeFormatError(f"layer {layer.index} written twice")
        outputs = dict(self._outputs)
        for s in layer.sources:
            claim_output(outputs, s.name, f"layer {layer.index}")
        spec = self._room(layer_nbytes(layer), f"layer {layer.index}").add_layer(layer)
        self._layers.add(layer.index)
        self._outputs = outputs
        return spec

    def add_layer_stream(self, layer: MoELayer, experts, nbytes: int | None = None) -> LayerSpec:
        """:meth:`Writer.add_layer_stream` into the current shard or a new one. ``nbytes``, the layer's tensor
        bytes, places it as :meth:`add_layer` would; without it the size of the previous layer written this way
        is taken (layers of one model are alike), and the first such layer starts a new shard unless the
        current one is empty, so a shard can exceed the limit by the difference between two layers' sizes."""
        if layer.index in self._layers:
            raise RmoeFormatError(f"layer {layer.index} written twice")
        outputs = dict(self._outputs)
        for s in layer.sources:
            claim_output(outputs, s.name, f"layer {layer.index}")
        guess = nbytes if nbytes is not None else getattr(self, "_streamed", self.max_shard_size + 1)
        w = self._room(guess, f"layer {layer.index}")
        before = w.data_bytes
        spec = w.add_layer_stream(layer, experts)
        if nbytes is None:  # the guess is replaced by what was written
            self._streamed = w.data_bytes - before
            what = f"layer {layer.index}"
            self._oversized = [x for x in self._oversized if x[0] != what]
            if self._streamed > self.max_shard_size:
                self._oversized.append((what, self._streamed, len(self._writers)))
        self._layers.add(layer.index)
        self._outputs = outputs
        return spec

    def close(self) -> None:
        """Write every shard and the index, each atomically, the index last (or the one plain file)."""
        if self.outputs or not self._writers:
            return
        ws = self._writers
        if len(ws) == 1:
            ws[0].close()
            self.outputs = [self.path]
            return
        n = len(ws)
        names = [shard_path(self.path, i + 1, n) for i in range(n)]
        index = index_path(self.path)
        temps: list[Path] = []
        done: list[Path] = []
        try:
            raws = [w.prepare(SHARD_MINOR) for w in ws]
            sid = set_id([raw for _, raw in raws])
            shards, weight_map = [], {}
            for i, (w, (version, raw), name) in enumerate(zip(ws, raws, names)):
                extra = {META_SHARD: str(i + 1), META_SHARD_COUNT: str(n), META_SHARD_SET: sid,
                         META_SHARD_INDEX: index.name}
                temps.append(w.commit(name, extra, SHARD_MINOR, publish=False))
                shards.append({"file": name.name, "size": temps[-1].stat().st_size, "rmoe_version": version,
                               "schema_crc32": crc32(raw.encode("utf-8")),
                               "layers": [lay.index for lay in w._layers]})
                for out in restored_names(Schema.from_json(json.loads(raw))):
                    weight_map[out] = name.name
            versions = [parse_version(s["rmoe_version"]) for s in shards]
            doc = {"metadata": {"format": INDEX_FORMAT, "rmoe_version": "%d.%d" % max(versions),
                                "total_size": sum(s["size"] for s in shards), "shard_count": n, "shard_set": sid,
                                "max_shard_size": self.max_shard_size},
                   "shards": shards, "weight_map": weight_map}
            temps.append(publish.create_temp(index))
            temps[-1].write_bytes((json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
            for tmp, target in zip(temps, [*names, index]):
                publish.publish(tmp, target)
                done.append(target)
        except BaseException:
            for p in temps + done:
                p.unlink(missing_ok=True)
            raise
        finally:
            for w in ws:
                w.abort()
        self.outputs = [*names, index]
        if self._oversized:
            items = ", ".join(f"{what} ({_human(b)}, shard {s})" for what, b, s in self._oversized[:5])
            more = f" and {len(self._oversized) - 5} more" if len(self._oversized) > 5 else ""
            warnings.warn(f"--max-shard-size {_human(self.max_shard_size)}: {len(self._oversized)} item(s) are larger "
                          f"than a shard and were written alone in a shard of their own: {items}{more}",
                          stacklevel=2)

    def abort(self) -> None:
        """Discard everything; no output path is touched."""
        for w in self._writers:
            w.abort()


def restored_names(schema: Schema) -> list[str]:
    """The source tensors a file restores (spec 4.9): passthrough, coded, then every layer's sources."""
    return [*schema.passthrough, *(c.name for c in schema.coded),
            *(s.name for lay in schema.layers for s in lay.sources)]


def open_writer(path: str | os.PathLike, model: dict[str, Any], method: dict[str, Any] | None = None,
                max_shard_size: int | str | None = None) -> Writer | ShardedWriter:
    """A :class:`Writer`, or a :class:`ShardedWriter` when ``max_shard_size`` is given."""
    if max_shard_size is None:
        return Writer(path, model, method)
    return ShardedWriter(path, model, method, parse_size(max_shard_size))


# ---------------------------------------------------------------------------------------
# reading

def _plain_name(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v or v in (".", "..") or "/" in v or "\\" in v or "\0" in v:
        raise RmoeFormatError(f"{where}: {v!r} is not a plain file name (no directory part)")
    return v


def _int(d: dict, key: str, where: str, low: int = 0) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise RmoeFormatError(f"{where}.{key}: must be an int >= {low}, got {v!r}")
    return v


def find_index(shard: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """The index a shard names in ``__metadata__.rmoe_shard_index``, beside it; a missing one is an error."""
    shard = Path(shard)
    name = _plain_name(metadata.get(META_SHARD_INDEX), f"{shard}: __metadata__.{META_SHARD_INDEX}")
    index = shard.parent / name
    if not index.is_file():
        raise RmoeFormatError(f"{shard} is shard {metadata.get(META_SHARD)} of {metadata.get(META_SHARD_COUNT)} of a "
                              f"sharded .rmoe file, and its index {index} is missing (resmoe_format.open(path, "
                              f"shard_only=True) or resmoe-inspect --shard-only read this shard alone)")
    return index


class ShardedReader:
    """A sharded .rmoe file opened through its index; the reading interface of :class:`Reader`.

    ``file_size`` is the whole set's size, the index included; ``shards`` are the open shards
    (each a :class:`Reader`), ``index_size`` the index file's bytes.
    """

    def __init__(self, index: str | os.PathLike, verify_checksums: bool = True,
                 max_matrix_elements: int = MAX_MATRIX_ELEMENTS):
        self.path = Path(index)
        self.verify_checksums = verify_checksums
        self.shards: list[Reader] = []
        try:
            self._open(max_matrix_elements)
        except BaseException:
            self.close()
            raise

    def _read_index(self) -> dict[str, Any]:
        try:
            with self.path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_INDEX_BYTES:
                    raise RmoeFormatError(f"{self.path}: index of {size} bytes exceeds the limit of {MAX_INDEX_BYTES}")
                raw = f.read(size + 1)
        except OSError as e:
            raise RmoeFormatError(f"cannot open {self.path}: {e.strerror}") from None
        self.index_size = len(raw)
        try:
            doc = parse_json(raw.decode("utf-8"), f"{self.path}")
        except UnicodeDecodeError:
            raise RmoeFormatError(f"{self.path}: not UTF-8 text") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict):
            raise RmoeFormatError(f"{self.path}: not a .rmoe index (no metadata object)")
        return doc

    def _open(self, max_matrix_elements: int) -> None:
        doc = self._read_index()
        where = str(self.path)
        meta = doc["metadata"]
        if meta.get("format") != INDEX_FORMAT:
            raise RmoeFormatError(f"{where}: metadata.format is {meta.get('format')!r}, not {INDEX_FORMAT!r}")
        parse_version(meta.get("rmoe_version"))
        n = _int(meta, "shard_count", f"{where}: metadata", 1)
        sid = meta.get("shard_set")
        if not isinstance(sid, str) or not re.fullmatch(r"[0-9a-f]{64}", sid):
            raise RmoeFormatError(f"{where}: metadata.shard_set must be 64 lower-case hex digits")
        shards, wmap = doc.get("shards"), doc.get("weight_map")
        if not isinstance(shards, list) or len(shards) != n:
            raise RmoeFormatError(f"{where}: shards must be a list of shard_count = {n} entries")
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise RmoeFormatError(f"{where}: weight_map must be an object of file names")
        entries = []
        for i, s in enumerate(shards):
            w = f"{where}: shards[{i}]"
            if not isinstance(s, dict):
                raise RmoeFormatError(f"{w}: must be an object")
            entries.append((_plain_name(s.get("file"), f"{w}.file"), _int(s, "size", w),
                            _int(s, "schema_crc32", w)))
        files = [e[0] for e in entries]
        if len(set(files)) != n:
            raise RmoeFormatError(f"{where}: a shard file is named twice")
        if _int(meta, "total_size", f"{where}: metadata") != sum(e[1] for e in entries):
            raise RmoeFormatError(f"{where}: metadata.total_size is not the sum of the shards' sizes")
        raws = []
        for i, (name, size, schema_crc) in enumerate(entries):
            p = self.path.parent / name
            what = f"shard {i + 1} of {n}, {p}"
            try:
                actual = p.stat().st_size
            except OSError:
                raise RmoeFormatError(f"{what}, is missing (named by {self.path})") from None
            if actual != size:
                raise RmoeFormatError(f"{what}: {actual} bytes, the index says {size} (truncated, or another file)")
            try:
                r = Reader(p, self.verify_checksums, max_matrix_elements)
            except RmoeFormatError as e:
                raise RmoeFormatError(f"{what}: {e}") from None
            self.shards.append(r)
            m = r.header.metadata
            got = (m.get(META_SHARD), m.get(META_SHARD_COUNT), m.get(META_SHARD_SET))
            if got != (str(i + 1), str(n), sid):
                raise RmoeFormatError(f"{what}: is not shard {i + 1} of {n} of this set (its __metadata__ says shard "
                                      f"{got[0]} of {got[1]}, set {str(got[2])[:12]}...; the index's set is "
                                      f"{sid[:12]}...): a file from another conversion")
            raw = m[META_SCHEMA]
            if crc32(raw.encode("utf-8")) != schema_crc:
                raise RmoeFormatError(f"{what}: its schema's CRC-32 differs from the index's (a file from another "
                                      f"conversion)")
            raws.append(raw)
        if set_id(raws) != sid:
            raise RmoeFormatError(f"{where}: the shards' schemas do not hash to metadata.shard_set (mixed sets)")
        self._merge(files, wmap)

    def _merge(self, files: list[str], wmap: dict[str, str]) -> None:
        """The set as one schema, with the shard of every layer and tensor (spec 11.4 checks)."""
        self._by_layer: dict[int, Reader] = {}
        self._by_tensor: dict[str, Reader] = {}
        outputs: dict[str, str] = {}
        paths: dict[str, str] = {}
        first = self.shards[0].schema
        merged = Schema(first.model, first.method, [], [], [], first.checksum, first.version, [])
        for name, r in zip(files, self.shards):
            sc = r.schema
            for f in sc.files:
                claim_file_path(paths, f["path"], f"{name}: embedded file")
            for out in restored_names(sc):
                claim_output(outputs, out, name)
                if wmap.get(out) != name:
                    raise RmoeFormatError(f"{self.path}: weight_map gives {out!r} to {wmap.get(out)!r}, but "
                                          f"{name} holds it")
            for lay in sc.layers:
                if lay.index in self._by_layer:
                    raise RmoeFormatError(f"{name}: layer {lay.index} is in two shards")
                self._by_layer[lay.index] = r
            for t in r.header.tensors:
                if t != sc.checksum["tensor"]:
                    self._by_tensor[t] = r
            merged.files += sc.files
            merged.passthrough += sc.passthrough
            merged.coded += sc.coded
            merged.layers += sc.layers
        if len(wmap) != len(outputs):
            extra = sorted(set(wmap) - set(outputs))[:1]
            raise RmoeFormatError(f"{self.path}: weight_map names {extra[0]!r}, which no shard holds")
        self.schema = merged
        self.version = max(r.version for r in self.shards)
        self.file_size = sum(r.file_size for r in self.shards) + self.index_size

    # --- the Reader interface, by the shard that holds the layer or tensor -----------
    def _layer_reader(self, index: int) -> Reader:
        try:
            return self._by_layer[index]
        except KeyError:
            raise RmoeFormatError(f"no compressed layer {index}; layers are {sorted(self._by_layer)}") from None

    def _tensor_reader(self, name: str) -> Reader:
        try:
            return self._by_tensor[name]
        except KeyError:
            raise RmoeFormatError(f"no tensor named {name!r} in {self.path} (each shard has its own "
                                  f"{CHECKSUM_TENSOR})") from None

    @property
    def tensor_names(self) -> list[str]:
        return list(self._by_tensor)

    def tensor(self, name: str) -> np.ndarray:
        return self._tensor_reader(name).tensor(name)

    @property
    def layers(self) -> list[LayerSpec]:
        return self.schema.layers

    def layer(self, index: int) -> LayerSpec:
        return self._layer_reader(index).layer(index)

    def encoded(self, ref: EncodedRef, matrix: MatrixSpec):
        return self._tensor_reader(next(iter(ref.tensors.values()))).encoded(ref, matrix)

    def decode(self, layer: int, ref: EncodedRef, matrix: str) -> np.ndarray:
        return self._layer_reader(layer).decode(layer, ref, matrix)

    def decode_exact(self, layer: int, ref: EncodedRef, matrix: str) -> np.ndarray:
        return self._layer_reader(layer).decode_exact(layer, ref, matrix)

    def base(self, layer: int, matrix: str) -> np.ndarray | None:
        return self._layer_reader(layer).base(layer, matrix)

    def addend(self, layer: int, matrix: str) -> np.ndarray | None:
        return self._layer_reader(layer).addend(layer, matrix)

    def base_channels(self, layer: int) -> np.ndarray | None:
        return self._layer_reader(layer).base_channels(layer)

    def residual(self, layer: int, expert: int, matrix: str) -> np.ndarray | None:
        return self._layer_reader(layer).residual(layer, expert, matrix)

    def permutation(self, layer: int, expert: int) -> np.ndarray | None:
        return self._layer_reader(layer).permutation(layer, expert)

    def coded(self, c) -> np.ndarray:
        return self._tensor_reader(next(iter(c.record.tensors.values()))).coded(c)

    def passthrough_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) of every passthrough tensor, shard by shard."""
        for r in self.shards:
            yield from r.passthrough_tensors()
            r.release()

    @property
    def files(self) -> dict[str, bytes]:
        return {k: v for r in self.shards for k, v in r.files.items()}

    @property
    def model(self) -> dict[str, Any]:
        return self.schema.model

    def config(self) -> dict | None:
        for r in self.shards:
            cfg = r.config()
            if cfg is not None:
                return cfg
        return None

    def verify(self, records: bool = True) -> None:
        """:meth:`Reader.verify` on every shard."""
        for r in self.shards:
            r.verify(records)

    def release(self) -> None:
        for r in self.shards:
            r.release()

    def close(self) -> None:
        for r in self.shards:
            r.close()

    def __enter__(self) -> "ShardedReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_path(path: str | os.PathLike, verify_checksums: bool = True, max_matrix_elements: int = MAX_MATRIX_ELEMENTS,
              shard_only: bool = False) -> Reader | ShardedReader:
    """:func:`resmoe_format.open`: an index, or a shard (through the index beside it), opens the whole set."""
    path = Path(path)
    if path.name.endswith(".json"):
        if shard_only:
            raise RmoeFormatError(f"{path} is an index; shard_only=True opens one shard file")
        return ShardedReader(path, verify_checksums, max_matrix_elements)
    r = Reader(path, verify_checksums, max_matrix_elements)
    meta = r.header.metadata
    if shard_only or META_SHARD_COUNT not in meta:
        return r
    r.close()
    index = find_index(path, meta)
    s = ShardedReader(index, verify_checksums, max_matrix_elements)
    if not any(os.path.samefile(path, x.path) for x in s.shards):
        s.close()
        raise RmoeFormatError(f"{path} is not one of the shards {index} names")
    return s


def input_paths(path: str | os.PathLike) -> list[Path]:
    """Every file reading ``path`` touches: the file, or an index and all its shards (for path checks).
    Unreadable or invalid inputs give just ``path``; opening them reports the problem."""
    path = Path(path)
    try:
        with open_path(path, verify_checksums=False) as r:
            if isinstance(r, ShardedReader):
                return [path, r.path, *(s.path for s in r.shards)]
    except (RmoeFormatError, OSError):
        pass
    return [path]


__all__ = ["ShardedWriter", "ShardedReader", "open_writer", "open_path", "parse_size", "index_path", "shard_path",
           "is_shard_of", "find_index", "input_paths", "restored_names", "SHARD_MINOR"]
