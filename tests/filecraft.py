"""Take a .rmoe file apart and put it back together with edits, for hostile-input tests."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path


def split(path: Path) -> tuple[dict, dict, bytes]:
    """(tensor header without __metadata__, schema document, data buffer)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8:8 + n])
    meta = head.pop("__metadata__")
    return head, json.loads(meta["rmoe_schema"]), raw[8 + n:], meta


def join(head: dict, schema: dict | None, data: bytes, meta: dict, fix_crc: bool = True) -> bytes:
    meta = dict(meta)
    if schema is not None:
        meta["rmoe_schema"] = json.dumps(schema)
        if fix_crc:
            meta["rmoe_schema_crc32"] = str(zlib.crc32(meta["rmoe_schema"].encode()) & 0xFFFFFFFF)
    doc = {"__metadata__": meta, **head}
    h = json.dumps(doc).encode()
    h += b" " * (-(8 + len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def rewrite(src: Path, dst: Path, edit_head=None, edit_schema=None, edit_meta=None, edit_data=None,
            fix_crc: bool = True) -> Path:
    """Apply edits (each a function mutating its argument in place, or returning a new value)."""
    head, schema, data, meta = split(src)
    for obj, fn in ((head, edit_head), (schema, edit_schema), (meta, edit_meta)):
        if fn is not None:
            fn(obj)
    if edit_data is not None:
        data = edit_data(bytearray(data))
    Path(dst).write_bytes(join(head, schema, bytes(data), meta, fix_crc))
    return Path(dst)
