"""Compressed GGUF (spec/GGUF_RMOE.md): .rmoe -> GGUF -> .rmoe is byte-identical, the GGUF is
readable by gguf.GGUFReader with the schema and name table in its metadata, and damaged or foreign
files fail with GgufRmoeError, leaving nothing at the output path."""
from __future__ import annotations

import importlib.util
import random
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import gguf
import numpy as np
import pytest

import resmoe_format
from converters.convert import ConvertOptions, convert
from resmoe_format.errors import GgufRmoeError
from resmoe_format.gguf_rmoe import (GGML_TYPE, K_HEADER, K_META_KEYS, gguf_names, gguf_shape, gguf_to_rmoe,
                                    rmoe_to_gguf)
from filecraft import rewrite
from hf_models import build_checkpoint
from resmoe_format import dtypes
from resmoe_format.safetensors_header import encode_header

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = {"mixtral": "bf16", "qwen2_moe": "fp32", "gpt_oss": "bf16", "switch": "fp32"}
CASES = {
    "mixtral-default": ("mixtral", {}),
    "mixtral-residual25": ("mixtral", {"residual_keep": 0.25}),
    "mixtral-svd-shared-u": ("mixtral", {"residual": "svd", "residual_keep": 0.3}),
    "mixtral-bsr": ("mixtral", {"delta_format": "bsr"}),
    "qwen2-lossless": ("qwen2_moe", {"lossless": True}),
    "qwen2-int8": ("qwen2_moe", {"value_dtype": "int8", "residual_keep": 0.25}),
    "qwen2-rice": ("qwen2_moe", {"delta_format": "rice"}),
    "gpt_oss-csr16": ("gpt_oss", {"delta_format": "csr16"}),
    "gpt_oss-merge": ("gpt_oss", {"method": "merge"}),
    "switch-bitmap": ("switch", {"delta_format": "bitmap"}),
    "switch-svd-int8": ("switch", {"residual": "svd", "residual_keep": 0.3, "value_dtype": "int8"}),
}
_cache: dict[str, Path] = {}


pytestmark = pytest.mark.usefixtures("quiet_warnings")


def checkpoint(tmp_path_factory, arch: str) -> Path:
    if arch not in _cache:
        _cache[arch] = build_checkpoint(arch, tmp_path_factory.mktemp(arch), CHECKPOINTS[arch], seed=3)
    return _cache[arch]


def rmoe_case(tmp_path_factory, case: str) -> Path:
    if case not in _cache:
        arch, opts = CASES[case]
        out = tmp_path_factory.mktemp("rmoe") / f"{case}.rmoe"
        convert(checkpoint(tmp_path_factory, arch), out, ConvertOptions(device="cpu", **opts), progress=False)
        _cache[case] = out
    return _cache[case]


def demo_file(tmp_path_factory) -> Path:
    if "demo" not in _cache:
        from resmoe_format import demo

        _cache["demo"] = demo.build(tmp_path_factory.mktemp("demo") / "demo.rmoe", layers=1, experts=8, hidden=32,
                                    inter=64)
    return _cache["demo"]


def edge_file(path: Path) -> Path:
    """Passthrough tensors of every dtype, a scalar, an empty and a 5-D tensor, names over 63 bytes."""
    rng = np.random.default_rng(7)
    with resmoe_format.Writer(path, {"architecture": "Edge", "source_dtype": "fp32"}) as w:
        for d in dtypes.BY_NAME.values():
            raw = rng.integers(0, 256, size=12 * d.itemsize, dtype=np.uint8)
            w.add_passthrough(f"p.{d.name}", (raw % 2).astype(bool).reshape(3, 4) if d.name == "bool"
                              else raw.view(d.np).reshape(3, 4))
        w.add_passthrough("scalar", np.array(3.5, np.float32))
        w.add_passthrough("empty", np.zeros((0, 3), np.float32))
        w.add_passthrough("five.dims", np.arange(32, dtype=np.int16).reshape(2, 2, 2, 2, 2))
        w.add_passthrough("long." + "x" * 70, np.arange(4, dtype=np.float32))
        w.add_passthrough("ñ" * 40, np.arange(4, dtype=np.uint16))
        w.add_file("tokenizer/" + "a" * 80 + ".json", b'{"x": 1}')
    return path


def roundtrip(src: Path, d: Path) -> tuple[Path, Path]:
    g = rmoe_to_gguf(src, d / f"{src.stem}.gguf")
    back = gguf_to_rmoe(g, d / f"{src.stem}.back.rmoe")
    return g, back


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------
# round trips

@pytest.mark.parametrize("case", [*CASES, "demo"])
def test_roundtrip_is_byte_identical(tmp_path_factory, tmp_path, case):
    src = demo_file(tmp_path_factory) if case == "demo" else rmoe_case(tmp_path_factory, case)
    g, back = roundtrip(src, tmp_path)
    assert back.read_bytes() == src.read_bytes()
    with resmoe_format.open(back) as r:
        r.verify()
    assert leftovers(tmp_path) == []
    if case == "mixtral-svd-shared-u":
        with resmoe_format.open(src) as r:
            assert r.header.metadata["rmoe_version"] == "2.0"


def test_edge_dtypes_shapes_and_long_names(tmp_path):
    src = edge_file(tmp_path / "edge.rmoe")
    g, back = roundtrip(src, tmp_path)
    assert back.read_bytes() == src.read_bytes()
    r = gguf.GGUFReader(g)
    names = r.fields["resmoe.tensors.names"].contents()
    by_name = dict(zip(names, r.tensors))
    assert {t.tensor_type.name for t in r.tensors} >= {"I8", "I16", "I32", "I64", "F16", "BF16", "F32", "F64"}
    assert all(len(t.name.encode()) <= 63 for t in r.tensors)
    assert by_name["long." + "x" * 70].name.startswith("rmoe.t.")
    assert by_name["ñ" * 40].name.startswith("rmoe.t.")  # 80 UTF-8 bytes
    assert list(by_name["scalar"].shape) == [1] and list(by_name["empty"].shape) == [0]
    assert list(by_name["five.dims"].shape) == [32]
    assert list(by_name["p.u64"].shape) == [4, 3]  # GGUF dimensions are innermost first


def test_gguf_holds_schema_table_and_exact_tensor_bytes(tmp_path_factory, tmp_path):
    src = rmoe_case(tmp_path_factory, "qwen2-int8")
    g = rmoe_to_gguf(src, tmp_path / "q.gguf")
    r = gguf.GGUFReader(g)
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "resmoe" and f["general.alignment"] == 32
    assert f["resmoe.format_version"] == "1.0"
    with resmoe_format.open(src) as rm:
        meta = rm.header.metadata
        assert f["resmoe.rmoe_schema"] == meta["rmoe_schema"]
        assert f["resmoe.rmoe_schema_crc32"] == meta["rmoe_schema_crc32"]
        assert f["resmoe.rmoe_version"] == meta["rmoe_version"]
        assert f["resmoe.tensors.names"] == rm.tensor_names  # .rmoe data order
        assert f["resmoe.rmoe_size"] == src.stat().st_size
        assert f["resmoe.rmoe_crc32"] == zlib.crc32(src.read_bytes())
        assert K_HEADER not in f and K_META_KEYS not in f  # a reference-layout file needs neither
        dims = iter(f["resmoe.tensors.dims"])
        for t, name, dt, nd in zip(r.tensors, f["resmoe.tensors.names"], f["resmoe.tensors.dtypes"],
                                   f["resmoe.tensors.n_dims"]):
            shape = tuple(next(dims) for _ in range(nd))
            a = rm.tensor(name)
            assert (dt, shape) == (dtypes.of_array(a).name, a.shape)
            assert t.tensor_type.name == GGML_TYPE[dt]
            assert [int(x) for x in t.shape] == list(reversed(gguf_shape(shape)))
            assert bytes(r.data[t.data_offset:t.data_offset + t.n_bytes]) == a.tobytes()
            assert t.data_offset % 32 == 0
        # a runtime can check tensors in place: the checksum table lists the others in table order
        ck = f["resmoe.tensors.names"].index("rmoe.checksums")
        crcs = bytes(r.data[r.tensors[ck].data_offset:r.tensors[ck].data_offset + r.tensors[ck].n_bytes])
        others = [zlib.crc32(bytes(r.data[t.data_offset:t.data_offset + t.n_bytes]))
                  for i, t in enumerate(r.tensors) if i != ck]
        assert list(np.frombuffer(crcs, "<u4")) == others


def test_foreign_header_layout_and_extra_metadata_round_trip(tmp_path_factory, tmp_path):
    src = rmoe_case(tmp_path_factory, "mixtral-default")
    # another writer's header: spaces, \u escapes, extra metadata keys (one empty)
    foreign = rewrite(src, tmp_path / "foreign.rmoe", edit_meta=lambda m: m.update(note="ü", empty=""))
    resmoe_format.open(foreign).close()
    g, back = roundtrip(foreign, tmp_path)
    assert back.read_bytes() == foreign.read_bytes()
    f = gguf.GGUFReader(g).fields
    assert K_HEADER in f and f[K_META_KEYS].contents() == ["note", "empty"]
    # extra keys in the reference layout: kept as keys, no verbatim header needed
    with resmoe_format.open(src) as r:
        meta = {**r.header.metadata, "note": "x"}
        entries = list(r.header.tensors.values())
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    extra = tmp_path / "extra.rmoe"
    extra.write_bytes(encode_header(meta, entries) + raw[8 + n:])
    g, back = roundtrip(extra, tmp_path)
    assert back.read_bytes() == extra.read_bytes()
    f = gguf.GGUFReader(g).fields
    assert K_HEADER not in f and f["resmoe.metadata.values"].contents() == ["x"]


def test_gguf_names_are_unique_and_short():
    long = "x" * 64
    assert gguf_names(["a", long, "rmoe.t.1"]) == ["a", "rmoe.t.1.1", "rmoe.t.1"]
    assert gguf_names(["é" * 31, "é" * 32]) == ["é" * 31, "rmoe.t.1"]


def test_llama_cpp_parses_the_file_and_refuses_the_architecture(tmp_path_factory, tmp_path):
    """llama.cpp's own GGUF parser accepts the framing (edge shapes included); its loader then stops
    at the unknown architecture, as spec/GGUF_RMOE.md 1.1 says."""
    pytest.importorskip("llama_cpp")
    files = [rmoe_case(tmp_path_factory, "mixtral-default"), edge_file(tmp_path / "edge.rmoe")]
    for i, src in enumerate(files):
        g = rmoe_to_gguf(src, tmp_path / f"{i}.gguf")
        code = f"import llama_cpp\ntry:\n    llama_cpp.Llama({str(g)!r}, verbose=True)\nexcept ValueError:\n    pass"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert "unknown model architecture: 'resmoe'" in res.stderr, res.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# damaged and foreign input

@pytest.fixture
def small_gguf(tmp_path_factory, tmp_path) -> tuple[Path, Path]:
    src = rmoe_case(tmp_path_factory, "mixtral-residual25")
    return src, rmoe_to_gguf(src, tmp_path / "s.gguf")


def refused(src: Path, out: Path, match: str = "") -> str:
    with pytest.raises(GgufRmoeError, match=match) as e:
        gguf_to_rmoe(src, out)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(src))
    assert not out.exists() and leftovers(out.parent) == []
    return msg


@pytest.mark.parametrize("keep", [0, 3, 20, 100, 1000, 0.3, 0.6, 0.9, -1])
def test_truncated_gguf_is_refused(small_gguf, tmp_path, keep):
    _, g = small_gguf
    raw = g.read_bytes()
    cut = keep if isinstance(keep, int) and keep >= 0 else len(raw) - 1 if keep == -1 else int(len(raw) * keep)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(raw[:cut])
    refused(bad, tmp_path / "out.rmoe")


def _patch(raw: bytes, old: bytes, new: bytes) -> bytes:
    assert raw.count(old) >= 1 and len(old) == len(new)
    return raw.replace(old, new, 1)


_STR3 = b"\x08\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00"  # a STRING value of 3 bytes
_STR4 = b"\x04\x00\x00\x00\x00\x00\x00\x00"  # a 4-byte string in an array
TAMPER = {
    "schema text": (lambda raw: _patch(raw, b'"layers":[', b'"layerz":['), "corrupt metadata"),
    "format version": (lambda raw: _patch(raw, b"resmoe.format_version" + _STR3 + b"1.0",
                                          b"resmoe.format_version" + _STR3 + b"2.0"), "version 2.0"),
    "dtype entry": (lambda raw: _patch(raw, _STR4 + b"bf16", _STR4 + b"bf17"), "unknown .rmoe dtype"),
    "array length": (lambda raw: _grow_dims(raw), "truncated"),
    "missing key": (lambda raw: _patch(raw, b"resmoe.rmoe_crc32", b"resmoe.rmoe_crc99"),
                    "resmoe.rmoe_crc32 is missing"),
    "tensor data": (lambda raw: raw[:-40] + bytes([raw[-40] ^ 0xFF]) + raw[-39:], "CRC-32"),
}


def _grow_dims(raw: bytes) -> bytes:
    """Set the element count of resmoe.tensors.dims to 2**60."""
    key = b"resmoe.tensors.dims\x09\x00\x00\x00\x0a\x00\x00\x00"
    i = raw.index(key) + len(key)
    return raw[:i] + struct.pack("<Q", 2**60) + raw[i + 8:]


@pytest.mark.parametrize("what", TAMPER)
def test_tampered_gguf_is_refused(small_gguf, tmp_path, what):
    _, g = small_gguf
    edit, match = TAMPER[what]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(edit(g.read_bytes()))
    refused(bad, tmp_path / "out.rmoe", match)


def test_random_byte_flips_give_an_error_or_the_exact_file(small_gguf, tmp_path):
    src, g = small_gguf
    raw, want = g.read_bytes(), src.read_bytes()
    data_start = gguf.GGUFReader(g).data_offset
    rng = random.Random(11)
    spots = [rng.randrange(data_start) for _ in range(150)] + [rng.randrange(len(raw)) for _ in range(50)]
    errors = 0
    for i, pos in enumerate(spots):
        bad, out = tmp_path / f"f{i}.gguf", tmp_path / f"f{i}.rmoe"
        bad.write_bytes(raw[:pos] + bytes([raw[pos] ^ (1 << rng.randrange(8))]) + raw[pos + 1:])
        try:
            gguf_to_rmoe(bad, out)
        except GgufRmoeError as e:
            assert "\n" not in str(e) and not out.exists()
            errors += 1
        else:
            assert out.read_bytes() == want, f"flip at byte {pos} gave a different file"
        bad.unlink()
    assert errors > 150 and leftovers(tmp_path) == []


def test_non_resmoe_gguf_and_non_gguf_files_are_refused(tmp_path_factory, tmp_path):
    plain = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(plain), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out.rmoe"
    assert "not a resmoe compressed GGUF" in refused(plain, out, "'llama'")
    src = rmoe_case(tmp_path_factory, "mixtral-default")
    refused(src, out, "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    refused(empty, out, "too short")
    refused(tmp_path / "missing.gguf", out, "No such file")


def test_corrupt_rmoe_is_refused_and_nothing_is_written(tmp_path_factory, tmp_path):
    src = rmoe_case(tmp_path_factory, "mixtral-default")
    raw = bytearray(src.read_bytes())
    raw[-100] ^= 0x01  # tensor data: its CRC-32 no longer matches
    bad = tmp_path / "bad.rmoe"
    bad.write_bytes(bytes(raw))
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous")
    with pytest.raises(GgufRmoeError, match="crc32 mismatch"):
        rmoe_to_gguf(bad, out)
    assert out.read_bytes() == b"previous" and leftovers(tmp_path) == []
    with pytest.raises(GgufRmoeError, match="not 'rmoe'|safetensors|header"):
        rmoe_to_gguf(rmoe_to_gguf(src, tmp_path / "g.gguf"), tmp_path / "again.gguf")


def test_missing_output_directory(tmp_path_factory, tmp_path):
    src = rmoe_case(tmp_path_factory, "mixtral-default")
    g = rmoe_to_gguf(src, tmp_path / "ok.gguf")
    for fn, arg in ((rmoe_to_gguf, src), (gguf_to_rmoe, g)):
        with pytest.raises(GgufRmoeError, match="output directory .* does not exist"):
            fn(arg, tmp_path / "nope" / "x.out")
    assert not (tmp_path / "nope").exists()


# ---------------------------------------------------------------------------------------
# the spec's worked example

def describe(path: Path) -> str:
    """The listing of spec/GGUF_RMOE.md section 8, for a compressed GGUF."""
    r = gguf.GGUFReader(path)
    f = r.fields
    raw = path.read_bytes()[:24]
    n_t, n_kv = struct.unpack("<QQ", raw[8:24])
    lines = [f"file size: {path.stat().st_size} bytes; tensor data from byte {r.data_offset}",
             f"bytes 0..3:   {raw[:4].hex(' ')}  magic 'GGUF'",
             f"bytes 4..7:   {raw[4:8].hex(' ')}  version {f['GGUF.version'].contents()}",
             f"bytes 8..15:  {raw[8:16].hex(' ')}  {n_t} tensors",
             f"bytes 16..23: {raw[16:24].hex(' ')}  {n_kv} metadata keys", "", "metadata:"]
    for k, v in f.items():
        if k.startswith("GGUF."):
            continue
        val = v.contents()
        head = f"  {k} ({'/'.join(x.name for x in v.types)}) ="
        if k == "resmoe.rmoe_schema":
            lines.append(f"{head} <{len(val.encode())} bytes: the schema of FORMAT.md 9.2, verbatim>")
        elif isinstance(val, list):
            lines.append(head)
            lines += textwrap.wrap(", ".join(repr(x) if isinstance(x, str) else str(x) for x in val), 96,
                                   initial_indent="      [", subsequent_indent="       ", break_on_hyphens=False)
            lines[-1] += "]"
        else:
            lines.append(f"{head} {val!r}")
    lines += ["", "tensors (GGUF order = .rmoe data order):",
              f"  {'GGUF name':<36} {'type':<5} {'ne':<6} {'offset':>6} {'bytes':>5}  .rmoe dtype, shape"]
    names, dts, nds = (f[k].contents() for k in ("resmoe.tensors.names", "resmoe.tensors.dtypes",
                                                  "resmoe.tensors.n_dims"))
    dims = iter(f["resmoe.tensors.dims"].contents())
    for t, name, dt, nd in zip(r.tensors, names, dts, nds):
        assert name == t.name
        shape = [next(dims) for _ in range(nd)]
        ne = "[" + ",".join(str(int(x)) for x in t.shape) + "]"
        lines.append(f"  {t.name:<36} {t.tensor_type.name:<5} {ne:<6} {t.data_offset:>6} {t.n_bytes:>5}  {dt}, {shape}")
    return "\n".join(lines) + "\n"


def test_spec_worked_example_matches(tmp_path):
    spec = importlib.util.spec_from_file_location("worked_example", ROOT / "spec" / "worked_example.py")
    we = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(we)
    we.build(str(tmp_path / "example.rmoe"))
    g = rmoe_to_gguf(tmp_path / "example.rmoe", tmp_path / "example.gguf")
    text = (ROOT / "spec" / "GGUF_RMOE.md").read_text()
    block = re.search(r"```\n(file size: .*?)```", text, re.S)
    assert block is not None, "spec/GGUF_RMOE.md has no worked-example listing"
    assert block.group(1) == describe(g), describe(g)
    assert gguf_to_rmoe(g, tmp_path / "back.rmoe").read_bytes() == (tmp_path / "example.rmoe").read_bytes()


def test_cli_round_trip(tmp_path):
    from converters.cli.export import main
    from resmoe_format.demo import build

    src = tmp_path / "demo.rmoe"
    build(src)
    assert main([str(src), "--to", "gguf-rmoe", str(tmp_path / "d.gguf")]) == 0
    assert main([str(tmp_path / "d.gguf"), "--to", "rmoe", str(tmp_path / "back.rmoe")]) == 0
    assert (tmp_path / "back.rmoe").read_bytes() == src.read_bytes()
