"""The ``fields`` encoding (spec 5.11) and the ``--lossless`` files that use it: bit for bit, smaller than
the source, refused cleanly when damaged."""
import copy

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import resmoe_format
from resmoe_format import RmoeFormatError, codecs, restore
from resmoe_format.accounting import account
from resmoe_format.codecs.fields import pack_fields, unpack_fields
from resmoe_format.container import records

from fields_files import NP, upcycled, write_fields_file
from filecraft import join, rewrite, split

UINT = {"bf16": np.uint16, "fp16": np.uint16, "fp32": np.uint32}


def bits(a: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(a).astype(NP[dtype]).view(UINT[dtype])


def no_nan(raw: np.ndarray, dtype: str) -> np.ndarray:
    a = raw.astype(UINT[dtype]).view(NP[dtype])
    return np.where(np.isnan(a.astype(np.float32)), a.dtype.type(0), a)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@settings(max_examples=40, deadline=None)
@given(data=st.data(), m=st.integers(1, 5), n=st.integers(1, 40), predicted=st.booleans())
def test_any_bits_round_trip(dtype, data, m, n, predicted):
    """Every non-NaN bit pattern (subnormals, infinities, signed zeros) comes back, raw or against a predictor."""
    x = no_nan(data.draw(hnp.arrays(UINT[dtype], (m, n))), dtype)
    p = no_nan(data.draw(hnp.arrays(UINT[dtype], (m, n))), dtype) if predicted else None
    h = data.draw(st.sampled_from([None, 0, 1, 3]))
    enc = codecs.encode(x, "fields", dtype, predictor=p, head_bits=h)
    np.testing.assert_array_equal(bits(codecs.decode(enc, predictor=p), dtype), x.view(UINT[dtype]))


@pytest.mark.parametrize("width", [1, 3, 4, 7, 8, 13, 16, 20, 23])
def test_bit_fields_pack_and_unpack(width):
    v = np.random.default_rng(width).integers(0, 1 << width, 77, dtype=np.uint64)
    np.testing.assert_array_equal(unpack_fields(pack_fields(v, width), width, v.size), v)


def test_predictor_makes_upcycled_experts_smaller():
    base, xs = upcycled(np.random.default_rng(0), 2, (64, 256), "bf16", noise=0.1)
    raw = codecs.encode(xs[0], "fields", "bf16")
    pred = codecs.encode(xs[0], "fields", "bf16", predictor=base)
    assert pred.params["head"] != "raw" and pred.nbytes < 0.9 * raw.nbytes < 0.9 * 0.7 * xs[0].nbytes


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_fields_file_restores_bit_for_bit_and_accounts_the_streams(tmp_path, dtype):
    path, want = write_fields_file(tmp_path / "f.rmoe", dtype)
    with resmoe_format.open(path) as r:
        assert r.version == (4, 0) and r.layer(0).base_kind == "predictor"
        r.verify()
        got = dict(restore.restore_all(r, original_order=True))
        acc = account(r)
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k].view(UINT[dtype]), v.view(UINT[dtype]), k)
    assert acc.bytes["coded_heads"] and acc.bytes["coded_signs"] and acc.bytes["coded_tails"]
    assert sum(acc.bytes.values()) == path.stat().st_size and acc.bytes["barycenters"] == 0


def _edit_record(path, tmp_path, fn):
    head, schema, data, meta = split(path)
    s = copy.deepcopy(schema)
    fn(s["layers"][0])
    out = tmp_path / "e.rmoe"
    out.write_bytes(join(head, s, data, meta))
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda lay: lay.update(base=dict(lay["base"], kind="barycenter")), "needs exactly the matrices"),
    (lambda lay: lay["residuals"][1]["a"]["params"].update(head_bits=9), "head_bits must be"),
    (lambda lay: lay["residuals"][1]["a"]["params"].update(offset=-1), "offset must be"),
    (lambda lay: lay["residuals"][1]["a"]["params"].update(zstd=["head", "head"]), "distinct stream names"),
    (lambda lay: lay["residuals"][1]["a"]["params"].update(head="add"), "head mode must be"),
    (lambda lay: lay["residuals"][1]["a"]["params"].update(zstd=[]), "shape"),
    (lambda lay: lay["residuals"][1]["b"].update(value_dtype="fp16"), "offset|predictor|shape|dtype"),
    (lambda lay: lay["base"]["matrices"]["a"].update(value_dtype="fp32"), "predictor|shape|dtype"),
    (lambda lay: lay["residuals"][0].update(b=None), "every matrix needs a residual"),
])
def test_bad_records_are_refused_before_reading_data(tmp_path, edit, message):
    path, _ = write_fields_file(tmp_path / "f.rmoe")
    with pytest.raises(RmoeFormatError, match=message):
        resmoe_format.open(_edit_record(path, tmp_path, edit))


def test_a_predicted_record_needs_a_predictor_layer(tmp_path):
    path, _ = write_fields_file(tmp_path / "f.rmoe")

    def additive(lay):
        lay["base"]["kind"] = "barycenter"
        lay["base"]["matrices"]["b"] = copy.deepcopy(lay["base"]["matrices"]["a"])  # shapes differ: refused anyway
    with pytest.raises(RmoeFormatError):
        resmoe_format.open(_edit_record(path, tmp_path, additive))


@pytest.mark.parametrize("version", ["1.0", "3.0"])
def test_fields_records_are_refused_in_files_before_4_0(tmp_path, version):
    path, _ = write_fields_file(tmp_path / "f.rmoe")
    p = rewrite(path, tmp_path / "v.rmoe", edit_meta=lambda m: m.update(rmoe_version=version))
    with pytest.raises(RmoeFormatError, match=r"need \.rmoe version 4\.0 or later"):
        resmoe_format.open(p)


def _stream_damage(path, tmp_path, name, new: bytes):
    """Replace tensor ``name``'s bytes (same length or not) and fix the header; checksums skipped on read."""
    head, schema, data, meta = split(path)
    order = sorted((t["data_offsets"][0], k) for k, t in head.items())
    chunks = {k: data[head[k]["data_offsets"][0]:head[k]["data_offsets"][1]] for _, k in order}
    chunks[name] = new
    off, out = 0, b""
    for _, k in order:
        head[k]["data_offsets"] = [off, off + len(chunks[k])]
        head[k]["shape"] = [len(chunks[k]) // {"U16": 2, "U32": 4}.get(head[k]["dtype"], 1)]
        off += len(chunks[k])
        out += chunks[k]
    p = tmp_path / "d.rmoe"
    p.write_bytes(join(head, schema, out, meta))
    return p


def _restore_all(p):
    with resmoe_format.open(p, verify_checksums=False) as r:
        for _ in restore.restore_all(r, original_order=True):
            pass


def test_hostile_streams_raise_format_errors_without_large_allocations(tmp_path):
    path, _ = write_fields_file(tmp_path / "f.rmoe")
    with resmoe_format.open(path) as r:
        ref = r.layer(0).residuals[1]["a"]
        head_t, esc_t = ref.tensors["head"], ref.tensors["escapes"]
        raw_head = r.tensor(head_t).tobytes()
    assert "head" in ref.params["zstd"]
    huge = zstandard.ZstdCompressor(level=1).compress(b"\0" * (1 << 20))  # declares 1 MiB for 240 bytes
    cases = [huge[:200], raw_head[:-3], raw_head + b"\0", b"\x28\xb5\x2f\xfd" + bytes(30), raw_head[:4] + bytes(40)]
    for new in cases:
        with pytest.raises(RmoeFormatError):
            _restore_all(_stream_damage(path, tmp_path, head_t, new))
    with pytest.raises(RmoeFormatError, match="escape"):
        _restore_all(_stream_damage(path, tmp_path, esc_t, b"\x01\x00" * 3))


def test_convert_lossless_uses_fields_and_restores_bit_for_bit(tmp_path):
    from hf_models import build_checkpoint
    from safetensors.numpy import load_file

    from converters.cli.restore import main as restore_main
    from converters.convert import ConvertOptions, convert

    src = build_checkpoint("mixtral", tmp_path / "src", dtype="fp16", num_layers=1)
    report = convert(src, tmp_path / "m.rmoe", ConvertOptions(lossless=True), progress=False)
    assert report["method"]["delta_format"] == "fields" and report["summary"]["rel_error_max"] == 0
    with resmoe_format.open(tmp_path / "m.rmoe") as r:
        assert r.version == (4, 0)
        assert {ref.encoding for lay in r.schema.layers for _, ref in records(lay)} == {"fields"}
    assert restore_main([str(tmp_path / "m.rmoe"), str(tmp_path / "out"), "--original-order"]) == 0
    want, got = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(want) == set(got)
    for k in want:
        np.testing.assert_array_equal(got[k].view(np.uint8), want[k].view(np.uint8), k)


def test_compress_passthrough_needs_lossless(tmp_path):
    from converters.convert import ConvertOptions, Plan
    from converters.errors import ConversionError
    from hf_models import build_checkpoint

    src = build_checkpoint("mixtral", tmp_path / "src", dtype="bf16", num_layers=1)
    for opts in (ConvertOptions(compress_passthrough=True),
                 ConvertOptions(lossless=True, delta_format="csr16", compress_passthrough=True)):
        with pytest.raises(ConversionError, match="--compress-passthrough"):
            Plan(src, tmp_path / "m.rmoe", opts)


def test_coded_passthrough_tensors_restore_and_are_checked(tmp_path):
    import ml_dtypes

    from resmoe_format import Writer

    rng = np.random.default_rng(0)
    emb = (rng.standard_normal((256, 64)) * 0.02).astype(ml_dtypes.bfloat16)
    norm = np.ones(4096, np.float32)
    small = np.ones(8, np.float32)
    with Writer(tmp_path / "p.rmoe", {"architecture": "t"}) as w:
        w.add_passthrough("emb", emb, coded=True)
        w.add_passthrough("norm", norm, coded=True)  # all ones: codes smaller too
        w.add_passthrough("ids", np.arange(5, dtype=np.int64), coded=True)  # not a float: stays as it is
        w.add_passthrough("small", small, coded=True)  # its header entries would cost more than coding saves
    with resmoe_format.open(tmp_path / "p.rmoe") as r:
        assert r.version == (4, 0) and [c.name for c in r.schema.coded] == ["emb", "norm"]
        r.verify()
        got = dict(r.passthrough_tensors())
        assert account(r).bytes["passthrough"] < 0.8 * emb.nbytes + 100 + small.nbytes + 40
    np.testing.assert_array_equal(got["emb"].view(np.uint16), emb.view(np.uint16))
    np.testing.assert_array_equal(got["norm"], norm)
    np.testing.assert_array_equal(got["ids"], np.arange(5))
    np.testing.assert_array_equal(got["small"], small)
    p = rewrite(tmp_path / "p.rmoe", tmp_path / "v.rmoe", edit_meta=lambda m: m.update(rmoe_version="3.0"))
    with pytest.raises(RmoeFormatError, match="coded passthrough tensors need"):
        resmoe_format.open(p)
