"""Hostile files: for any bytes, reading raises RmoeFormatError and nothing else, quickly.

Three kinds of damage: raw byte flips and truncations (mostly caught by framing and
checksums), and schema/header edits with recomputed CRCs (which reach the deep checks:
index ranges, pointers, permutations, encodings, assembly rules). Each runs on the demo
file (float and int8 values), on a 3.0 file of k-quant records (spec 5.10) and on a 4.0 file of
``fields`` records coded raw and against a predictor (spec 5.11).
"""
import copy
import random
import zlib
import time

import numpy as np
import pytest

import resmoe_format
from resmoe_format import RmoeFormatError, restore
from resmoe_format.accounting import account
from resmoe_format.demo import build

from filecraft import join, split
from fields_files import write_fields_file
from test_kquant import write_kquant_file


@pytest.fixture(scope="module", params=["demo", "kquant", "fields"])
def small(tmp_path_factory, request):
    if request.param == "fields":
        return write_fields_file(tmp_path_factory.mktemp("fzf") / "f.rmoe")[0]
    if request.param == "kquant":
        return write_kquant_file(tmp_path_factory.mktemp("fzk") / "k.rmoe", shared_u=True)[0]
    return build(tmp_path_factory.mktemp("fz") / "f.rmoe", layers=1, experts=8, hidden=16, inter=24)


def read_everything(path, verify=True) -> None:
    with resmoe_format.open(path, verify_checksums=verify) as r:
        account(r)
        r.verify()
        for _ in restore.restore_all(r, original_order=True):
            pass
        assert isinstance(r.files, dict)


def must_only_raise_format_errors(path, verify=True) -> bool:
    try:
        read_everything(path, verify)
    except RmoeFormatError:
        return False
    return True


def test_raw_byte_damage_and_truncation(small, tmp_path):
    raw = small.read_bytes()
    rng = random.Random(0)
    t0 = time.perf_counter()
    survived = 0
    for i in range(200):
        b = bytearray(raw)
        kind = i % 4
        if kind == 0:
            b = b[: rng.randrange(len(b))]
        elif kind == 1:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == 2:  # damage inside the header
            n = int.from_bytes(b[:8], "little")
            for _ in range(rng.randint(1, 4)):
                b[8 + rng.randrange(n)] = rng.randrange(256)
        else:  # length field
            b[rng.randrange(8)] = rng.randrange(256)
        p = tmp_path / f"r{i}.rmoe"
        p.write_bytes(bytes(b))
        survived += must_only_raise_format_errors(p)
    assert time.perf_counter() - t0 < 60
    assert survived < 40  # most damage must be detected (header padding flips may be harmless)


def _paths(obj, prefix=()):
    """Every (path, value) leaf of a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))
    yield prefix, obj


def _set(doc, path, value):
    for k in path[:-1]:
        doc = doc[k]
    doc[path[-1]] = value


def _hostile_values(v, rng):
    return rng.choice([None, -1, 0, 1, 2**31, 2**64, 3.5, "x", "", [], {}, [1, 2], True, float("nan"), float("-inf"),
                       "..", "a\\b", "C:x", "nul.json", "model.safetensors",
                       (v + 1) if isinstance(v, int) and not isinstance(v, bool) else "bsr",
                       (v - 1) if isinstance(v, int) and not isinstance(v, bool) else [[]]])


def test_schema_edits_with_valid_crc(small, tmp_path):
    head, schema, data, meta = split(small)
    leaves = [p for p, _ in _paths(schema) if p]
    rng = random.Random(1)
    for i in range(250):
        s = copy.deepcopy(schema)
        for _ in range(rng.randint(1, 2)):
            path = rng.choice(leaves)
            try:
                _set(s, path, _hostile_values(None, rng))
            except (KeyError, IndexError, TypeError):
                pass
        p = tmp_path / f"s{i}.rmoe"
        p.write_bytes(join(head, s, data, meta))
        must_only_raise_format_errors(p, verify=False)


def test_header_edits(small, tmp_path):
    head, schema, data, meta = split(small)
    names = list(head)
    rng = random.Random(2)
    for i in range(150):
        h = copy.deepcopy(head)
        name = rng.choice(names)
        field = rng.choice(["dtype", "shape", "data_offsets"])
        h[name][field] = rng.choice([None, "F64", "Q4", [], [0], [1, 2, 3], [2**63, 2**63], [-1, 4],
                                     [0, len(data)], "BF16", [len(data), len(data)], [3.0, 4.0],
                                     float("nan"), [float("inf"), 4]])
        if rng.random() < 0.3:
            del h[rng.choice(names)]
        p = tmp_path / f"h{i}.rmoe"
        p.write_bytes(join(h, None, data, meta))
        must_only_raise_format_errors(p)


INDEX_PARTS = (".indptr", ".indices", ".mask", ".permutation", ".quotients", ".remainders")
KQUANT_PARTS = ("values", ".u", ".v", "group_scales", "scales")  # codes and scales of k-quant records
FIELDS_PARTS = (".sign", ".head", ".tail", ".escapes")  # the streams of fields records


def test_consistent_layout_but_hostile_index_data(small, tmp_path):
    """Index tensors (and k-quant codes and scales) with valid shapes but wrong contents, checksums
    skipped: decode checks them."""
    with resmoe_format.open(small) as r:
        kq = r.version[0] == 3
        parts = INDEX_PARTS + (KQUANT_PARTS if kq else ()) + (FIELDS_PARTS if r.version[0] >= 4 else ())
        targets = [(n, t) for n, t in r.header.tensors.items() if t.nbytes and n.endswith(parts)]
        start = r.header.data_start
    raw = small.read_bytes()
    rng = np.random.default_rng(3)
    caught = 0
    for i, (name, t) in enumerate(targets * 3):
        b = bytearray(raw)
        seg = np.frombuffer(b, np.uint8, t.nbytes, start + t.begin).copy()
        seg[rng.integers(0, max(1, seg.size), size=3)] = rng.integers(0, 256, size=3, dtype=np.uint8)
        b[start + t.begin: start + t.end] = seg.tobytes()
        p = tmp_path / f"d{i}.rmoe"
        p.write_bytes(bytes(b))
        caught += not must_only_raise_format_errors(p, verify=False)
    assert caught > len(targets)  # most index damage is detected by the content checks alone


def test_json_bombs(small, tmp_path):
    head, schema, data, meta = split(small)
    for i, s in enumerate(["[" * 100000 + "]" * 100000, '{"a":' * 50000 + "1" + "}" * 50000, "null", "[]", '"x"']):
        m = dict(meta, rmoe_schema=s)
        m["rmoe_schema_crc32"] = str(zlib.crc32(s.encode()) & 0xFFFFFFFF)
        p = tmp_path / f"j{i}.rmoe"
        p.write_bytes(join(head, None, data, m))
        with pytest.raises(RmoeFormatError):
            read_everything(p)
