"""A safetensors writer that streams tensors to disk and publishes the file atomically.

Tensors are appended to temporary spill files (one per element size, so that every
tensor ends up naturally aligned) beside the target. ``commit`` writes the header and
copies the spills into a file published atomically (:mod:`resmoe_format.publish`); a
failure at any point leaves the target path untouched.
"""
from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from . import dtypes
from .errors import RmoeFormatError
from .publish import atomic_open, create_temp, fsync_path
from .safetensors_header import TensorEntry, encode_header

_CLASSES = (8, 4, 2, 1)


def crc32(a: np.ndarray | bytes | memoryview) -> int:
    """CRC-32 (zlib polynomial) of an array's raw little-endian bytes."""
    if isinstance(a, np.ndarray):
        a = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return zlib.crc32(a) & 0xFFFFFFFF


class StreamingWriter:
    """Write tensors one at a time; nothing appears at ``path`` until :meth:`commit`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._dir = self.path.parent
        if not self._dir.is_dir():
            raise FileNotFoundError(f"output directory {self._dir} does not exist")
        self._spills = {c: tempfile.TemporaryFile(dir=self._dir, prefix=f".{self.path.name}.spill-")
                        for c in _CLASSES}
        self._pos = {c: 0 for c in _CLASSES}
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int, int]] = {}  # dtype, shape, class, off, crc
        self.closed = False

    def put(self, name: str, a: np.ndarray) -> str:
        """Append one tensor; returns its name."""
        if self.closed:
            raise RuntimeError("writer is closed")
        if name in self.entries:
            raise RmoeFormatError(f"tensor {name} written twice")
        a = np.asarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        a = np.ascontiguousarray(a)
        dt = dtypes.of_array(a)
        c = dt.itemsize
        buf = memoryview(a.reshape(-1).view(np.uint8))
        self._spills[c].write(buf)
        self.entries[name] = (dt.name, tuple(a.shape), c, self._pos[c], crc32(buf))
        self._pos[c] += buf.nbytes
        return name

    def overwrite(self, name: str, a: np.ndarray) -> None:
        """Replace a tensor's bytes with an array of the same dtype and shape."""
        dt, shape, c, off, _ = self.entries[name]
        a = np.ascontiguousarray(a)
        if dtypes.of_array(a).name != dt or tuple(a.shape) != shape:
            raise ValueError(f"overwrite of {name} must keep dtype {dt} and shape {list(shape)}")
        buf = memoryview(a.reshape(-1).view(np.uint8))
        sp = self._spills[c]
        sp.seek(off)
        sp.write(buf)
        sp.seek(0, os.SEEK_END)
        self.entries[name] = (dt, shape, c, off, crc32(buf))

    def crc(self, name: str) -> int:
        return self.entries[name][4]

    def layout(self) -> list[TensorEntry]:
        """Tensor entries with their final data offsets, in data order."""
        starts, acc = {}, 0
        for c in _CLASSES:
            starts[c] = acc
            acc += self._pos[c]
        out = []
        for n, (dt, shp, c, off, _) in self.entries.items():
            size = dtypes.by_name(dt).itemsize * int(np.prod(shp, dtype=object))
            out.append(TensorEntry(n, dt, shp, starts[c] + off, starts[c] + off + size))
        out.sort(key=lambda t: (t.begin, t.end))
        return out

    def commit(self, metadata: dict[str, str] | Callable[[list[TensorEntry]], dict[str, str]],
               target: str | os.PathLike | None = None, publish: bool = True) -> Path:
        """Write header + data to a temporary file beside ``target`` (default: the writer's path) and
        rename it over the target; with ``publish=False`` the fsynced temporary is left for the caller
        to publish (or remove) and its path returned."""
        if self.closed:
            raise RuntimeError("writer is closed")
        target = self.path if target is None else Path(target)
        try:
            entries = self.layout()
            meta = metadata(entries) if callable(metadata) else metadata
            head = encode_header(meta, entries)
            if publish:
                with atomic_open(target) as out:
                    self._write(out, head)
                return target
            tmp = create_temp(target)
            try:
                with open(tmp, "wb") as out:
                    self._write(out, head)
                fsync_path(tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return tmp
        finally:
            self.abort()

    def _write(self, out, head: bytes) -> None:
        out.write(head)
        for c in _CLASSES:
            sp = self._spills[c]
            sp.flush()
            sp.seek(0)
            _copy(sp, out, self._pos[c])

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data put so far."""
        return sum(self._pos.values())

    def abort(self) -> None:
        """Drop everything written so far; the target is not touched."""
        self.closed = True
        for sp in self._spills.values():
            sp.close()


def _copy(src, dst, n: int, chunk: int = 1 << 24) -> None:
    while n > 0:
        b = src.read(min(chunk, n))
        if not b:
            raise OSError("spill file shorter than expected")
        dst.write(b)
        n -= len(b)

