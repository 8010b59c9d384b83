"""k-quant values (spec 5.10): bit packing, exact dequantization, every codec, sizes, validation, hostile bytes."""
import numpy as np
import pytest

import resmoe_format
from resmoe_format import MatrixSpec, MoELayer, RmoeFormatError, SourceSpec, Writer, codecs
from resmoe_format.codecs import Encoded, KqLayout, Quant, kquant
from resmoe_format.codecs.base import parse_quant
from resmoe_format.dtypes import KQUANT_DTYPES, VALUE_DTYPES

from filecraft import rewrite

SMALL = KqLayout(4, 2, 6)
LAYOUTS = (KqLayout(4, 2, 6), KqLayout(5, 3, 4), KqLayout(16, 1, 8))
SPARSE = ("csr16", "bitmap", "bsr", "rice")


def ref_pack(codes, value_dtype: str) -> bytes:
    """The byte stream of spec 5.10 written the plain way: one big integer, or base-3 digits."""
    if value_dtype == "ternary":
        padded = list(codes) + [0] * (-len(codes) % 5)
        return bytes(sum(int(c) * 3 ** j for j, c in enumerate(padded[i:i + 5])) for i in range(0, len(padded), 5))
    bits = kquant.KQ_BITS[value_dtype]
    acc = sum(int(c) << (i * bits) for i, c in enumerate(codes))
    return acc.to_bytes(-(-len(codes) * bits // 8), "little")


def ref_dequant(codes, sc, mc, supers, layout: KqLayout) -> np.ndarray:
    """v = RNE32(RNE32(q * a_g) - b_g) with a_g = d_s * sc_g, b_g = m_s * mc_g, one value at a time."""
    out = np.empty(len(codes), np.float32)
    for i, q in enumerate(codes):
        g = i // layout.group
        s = g // layout.super
        a = np.float32(supers[s, 0]) * np.float32(sc[g])
        b = np.float32(supers[s, 1]) * np.float32(mc[g])
        out[i] = np.float32(np.float32(q) * a) - b
    return out


def test_dtype_lists_agree():
    assert KQUANT_DTYPES == kquant.KQ_DTYPES
    assert set(KQUANT_DTYPES) < set(VALUE_DTYPES)


@pytest.mark.parametrize("vd", kquant.KQ_DTYPES)
@pytest.mark.parametrize("n", [0, 1, 4, 5, 7, 13, 64, 101])
def test_codes_pack_lsb_first_and_unpack(vd, n):
    rng = np.random.default_rng(n)
    codes = rng.integers(0, kquant.levels(vd), n).astype(np.uint8)
    stream = kquant.pack_codes(codes, vd)
    assert stream.dtype == np.uint8 and stream.size == kquant.codes_nbytes(n, vd)
    assert stream.tobytes() == ref_pack(codes, vd)
    np.testing.assert_array_equal(kquant.unpack_codes(stream, vd, n), codes)
    if vd == "ternary":
        assert stream.size == 0 or stream.max() <= 242


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [0, 3, 10, 41])
def test_group_scales_pack_as_pairs(layout, n):
    rng = np.random.default_rng(n)
    g, top = layout.n_groups(n), 1 << layout.scale_bits
    grid = kquant.KqGrid(rng.integers(0, top, g).astype(np.uint8), rng.integers(0, top, g).astype(np.uint8),
                         rng.standard_normal((layout.n_super(n), 2)).astype(np.float16))
    stream, supers = kquant.pack_grid(grid, layout)
    pairs = np.stack([grid.sc, grid.mc], axis=1).reshape(-1)
    acc = sum(int(c) << (i * layout.scale_bits) for i, c in enumerate(pairs))
    assert stream.tobytes() == acc.to_bytes(kquant.group_scales_nbytes(n, layout), "little")
    back = kquant.unpack_grid(stream, supers, n, layout)
    np.testing.assert_array_equal(back.sc, grid.sc)
    np.testing.assert_array_equal(back.mc, grid.mc)


@pytest.mark.parametrize("vd", ["ternary", "q3", "q8"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dequantization_is_the_plain_float32_formula(vd, layout):
    """Any codes, any scale codes and finite fp16 super scales (negative, subnormal included)."""
    rng = np.random.default_rng(7)
    n = 23
    codes = rng.integers(0, kquant.levels(vd), n).astype(np.uint8)
    g, top = layout.n_groups(n), 1 << layout.scale_bits
    supers = np.concatenate([rng.standard_normal(2 * layout.n_super(n) - 2) * 10, [6e-8, -3e-5]])
    grid = kquant.KqGrid(rng.integers(0, top, g).astype(np.uint8), rng.integers(0, top, g).astype(np.uint8),
                         supers.astype(np.float16).reshape(-1, 2))
    parts = kquant.parts_of(codes, grid, vd, layout)
    got = kquant.values_of(parts, n, vd, layout)
    want = ref_dequant(codes, grid.sc, grid.mc, grid.supers, layout)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def _expected(x, vd, layout, mask=None):
    """What a record must decode to: the reference quantizer's round trip of the stored values."""
    if mask is None:
        return kquant.roundtrip(x.reshape(-1), vd, layout).reshape(x.shape)
    out = np.zeros_like(x)
    out[mask] = kquant.roundtrip(x[mask], vd, layout)
    return out


def _expected_bsr(x, vd, layout, r, c):
    """bsr stores whole tiles (zeros included), block row by block row: their round trip, put back."""
    m, n = x.shape
    mb, nb = -(-m // r), -(-n // c)
    pad = np.zeros((mb * r, nb * c), np.float32)
    pad[:m, :n] = x
    tiles = pad.reshape(mb, r, nb, c).transpose(0, 2, 1, 3).copy()
    occ = tiles.reshape(mb, nb, -1).any(axis=2)
    tiles[occ] = kquant.roundtrip(tiles[occ].reshape(-1), vd, layout).reshape(-1, r, c)
    tiles[~occ] = 0
    return tiles.transpose(0, 2, 1, 3).reshape(mb * r, nb * c)[:m, :n]


def _check(enc):
    """The record passes the layout checks and predict_nbytes is its size."""
    infos = {p: (resmoe_format.dtypes.of_array(a).name, a.shape) for p, a in enc.parts.items()}
    codecs.check_layout(enc.encoding, enc.shape, enc.value_dtype, enc.quant, enc.params, infos, {})
    return infos


@pytest.mark.parametrize("vd", kquant.KQ_DTYPES)
@pytest.mark.parametrize("layout", [SMALL, KqLayout(64, 4, 6)])
def test_every_codec_round_trips(vd, layout):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 13)).astype(np.float32)
    x[rng.random(x.shape) < 0.6] = 0
    mask = codecs.keep_mask(x)
    enc = codecs.encode(x, "dense", vd, layout)
    assert enc.quant == layout and _check(enc)["values"] == ("u8", (kquant.codes_nbytes(x.size, vd),))
    np.testing.assert_array_equal(codecs.decode(enc), _expected(x, vd, layout))
    assert enc.nbytes == codecs.CODECS["dense"].predict_nbytes(x.shape, vd, layout)
    sizes = codecs.predict_sizes(x, vd, layout, block_shapes=[(4, 4)])
    for e in SPARSE:
        enc = codecs.encode(x, e, vd, layout, block_shape=(4, 4))
        _check(enc)
        want = _expected_bsr(x, vd, layout, 4, 4) if e == "bsr" else _expected(x, vd, layout, mask)
        np.testing.assert_array_equal(codecs.decode(enc), want)
        assert enc.nbytes == sizes["bsr4x4" if e == "bsr" else e][0], e
    u, v = rng.standard_normal((9, 3)).astype(np.float32), rng.standard_normal((3, 13)).astype(np.float32)
    enc = codecs.encode(None, "lowrank", vd, layout, u=u, v=v)
    _check(enc)
    uq, vq = _expected(u, vd, layout), _expected(v, vd, layout)
    want = (uq.astype(np.float64) @ vq.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(codecs.decode(enc), want)
    assert enc.nbytes == codecs.CODECS["lowrank"].predict_nbytes(x.shape, vd, layout, rank=3)


def test_bsr_decodes_its_tiles():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 7)).astype(np.float32)
    x[:3] = 0
    enc = codecs.encode(x, "bsr", "q8", SMALL, block_shape=(3, 7))
    assert enc.parts["indices"].tolist() == [0]
    np.testing.assert_array_equal(codecs.decode(enc)[3:], _expected(x[3:], "q8", SMALL))
    assert (codecs.decode(enc)[:3] == 0).all()


def test_sparse_counts_come_from_indices_or_params():
    x = np.zeros((5, 8), np.float32)
    x[1, 2], x[4, 7], x[0, 0] = 1.5, -2.0, 0.25
    assert codecs.encode(x, "bitmap", "q4").params == {"nnz": 3}
    assert codecs.encode(x, "rice", "q4").params["nnz"] == 3
    assert "nnz" not in codecs.encode(x, "csr16", "q4").params
    assert codecs.encode(x, "bitmap", "bf16").params == {}  # float records are written as before


def test_default_layout_and_auto():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 70)).astype(np.float32)
    assert codecs.encode(x, "dense", "q4").quant == KqLayout(64, 4, 6)
    x[rng.random(x.shape) < 0.9] = 0
    enc = codecs.encode(x, "auto", "q3", SMALL)
    assert enc.nbytes == min(s for s, _ in codecs.predict_sizes(x, "q3", SMALL).values())
    u, v = rng.standard_normal((64, 2)), rng.standard_normal((2, 64))
    assert codecs.encode(None, "auto", "q4", u=u, v=v).encoding == "lowrank"


def test_error_falls_with_bits_and_q8_is_within_one_percent():
    x = np.random.default_rng(4).standard_normal(1 << 14).astype(np.float32)
    err = {vd: np.linalg.norm(kquant.roundtrip(x, vd, KqLayout()) - x) / np.linalg.norm(x) for vd in kquant.KQ_DTYPES}
    assert err["q8"] < 0.01 and err["q4"] < 0.12 and err["ternary"] < 0.6
    assert [err[vd] for vd in kquant.KQ_DTYPES] == sorted(err.values(), reverse=True)
    assert kquant.bits_per_value("q4", KqLayout()) == pytest.approx(4 + 0.1875 + 0.125, abs=1e-3)


def test_wrong_quant_objects_are_refused_by_the_encoder():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="KqLayout"):
        codecs.encode(x, "dense", "q4", Quant())
    with pytest.raises(ValueError, match="Quant"):
        codecs.encode(x, "dense", "int8", KqLayout())
    with pytest.raises(ValueError, match="scale_bits"):
        codecs.encode(x, "dense", "q4", KqLayout(4, 2, 5))


@pytest.mark.parametrize("record, vd, msg", [
    ({"scheme": "kquant", "group": 0, "super": 4, "scale_bits": 6}, "q4", "group"),
    ({"scheme": "kquant", "group": True, "super": 4, "scale_bits": 6}, "q4", "group"),
    ({"scheme": "kquant", "group": 64, "super": 70000, "scale_bits": 6}, "q4", "super"),
    ({"scheme": "kquant", "group": 64, "super": 4, "scale_bits": 5}, "q4", "scale_bits"),
    ({"scheme": "kquant", "group": 64, "super": 4, "scale_bits": 6.0}, "q4", "scale_bits"),
    ({"scheme": "kquant", "group": 64, "scale_bits": 6}, "q4", "needs super"),
    ({"scheme": "kquant", "group": 64, "super": 4, "scale_bits": 6}, "bf16", "only for the k-quant"),
    ({"scheme": "kquant", "group": 64, "super": 4, "scale_bits": 6}, "int8", "only for the k-quant"),
    ({"scheme": "per_row"}, "q4", "needs quant scheme kquant"),
    (None, "ternary", "needs a quant record"),
])
def test_quant_records_are_validated(record, vd, msg):
    with pytest.raises(RmoeFormatError, match=msg):
        parse_quant(record, "r.quant", vd)


def test_quant_record_round_trips_and_ignores_unknown_members():
    layout = KqLayout(32, 8, 4)
    assert parse_quant(dict(layout.to_json(), future=1), "q", "q2") == layout
    assert parse_quant(None, "q", "fp16") is None


def _infos(enc):
    return {p: (resmoe_format.dtypes.of_array(a).name, a.shape) for p, a in enc.parts.items()}


@pytest.mark.parametrize("edit, msg", [
    (lambda i, p: i.update(values=("u8", (99,))), "shape"),
    (lambda i, p: i.update(values=("i8", i["values"][1])), "dtype"),
    (lambda i, p: i.update(group_scales=("u8", (1,))), "shape"),
    (lambda i, p: i.update(scales=("fp32", i["scales"][1])), "dtype"),
    (lambda i, p: i.update(scales=("fp16", (i["scales"][1][0], 1))), "shape"),
    (lambda i, p: i.pop("group_scales"), "missing"),
    (lambda i, p: i.update(extra=("u8", (1,))), "unexpected"),
])
def test_layout_checks_every_part(edit, msg):
    enc = codecs.encode(np.ones((5, 7), np.float32), "dense", "q3", SMALL)
    infos = _infos(enc)
    edit(infos, enc.params)
    with pytest.raises(RmoeFormatError, match=msg):
        codecs.check_layout("dense", (5, 7), "q3", SMALL, {}, infos, {})


@pytest.mark.parametrize("encoding", ["bitmap", "rice"])
@pytest.mark.parametrize("nnz", [None, -1, 36, True, 2.0])
def test_bitmap_and_rice_need_a_valid_params_nnz(encoding, nnz):
    x = np.eye(5, 7, dtype=np.float32)
    enc = codecs.encode(x, encoding, "q2", SMALL)
    params = dict(enc.params, nnz=nnz) if nnz is not None else {k: v for k, v in enc.params.items() if k != "nnz"}
    with pytest.raises(RmoeFormatError, match="params.nnz"):
        codecs.check_layout(encoding, (5, 7), "q2", SMALL, params, _infos(enc), {})


def test_a_wrong_nnz_is_caught_by_the_layout_or_the_decoder():
    x = np.eye(5, 7, dtype=np.float32)
    enc = codecs.encode(x, "bitmap", "q8", SMALL)
    with pytest.raises(RmoeFormatError, match="shape"):  # 4 values do not fit 5 values' codes
        codecs.check_layout("bitmap", (5, 7), "q8", SMALL, {"nnz": 4}, _infos(enc), {})
    enc2 = codecs.encode(x, "bitmap", "q2", KqLayout(8, 1, 4))  # 5 and 6 codes fill two bytes alike
    enc2.params["nnz"] = 6
    codecs.check_layout("bitmap", (5, 7), "q2", enc2.quant, enc2.params, _infos(enc2), {})
    with pytest.raises(RmoeFormatError, match="bits set"):
        codecs.decode(enc2)


# ---- hostile bytes -------------------------------------------------------------------------

def _hostile(vd, n, layout, stream=None, group=None, supers=None):
    codes = np.zeros(n, np.uint8)
    grid = kquant.KqGrid(np.ones(layout.n_groups(n), np.uint8), np.zeros(layout.n_groups(n), np.uint8),
                         np.ones((layout.n_super(n), 2), np.float16))
    parts = kquant.parts_of(codes, grid, vd, layout)
    for key, val in (("values", stream), ("group_scales", group), ("scales", supers)):
        if val is not None:
            parts[key] = np.asarray(val, dtype=parts[key].dtype).reshape(parts[key].shape)
    return Encoded("dense", (1, n), vd, parts, {}, layout)


NAMES = {"values": "T.values", "group_scales": "T.group_scales", "scales": "T.scales"}


@pytest.mark.parametrize("vd, n, edit, msg", [
    ("ternary", 10, {"stream": [0, 243]}, "T.values: byte above 242"),
    ("ternary", 7, {"stream": [0, 9]}, "T.values: padding codes"),
    ("q3", 10, {"stream": [0, 0, 0, 0x40]}, "T.values: unused bits"),
    ("q3", 10, {"group": [1, 0, 1, 0, 0x10]}, "T.group_scales: unused bits"),
    ("q4", 9, {"supers": [1, 1, np.inf, 1]}, "T.scales: super-block scales must be finite"),
    ("q4", 9, {"supers": [1, np.nan, 1, 1]}, "T.scales: super-block scales must be finite"),
])
def test_hostile_streams_name_their_tensor(vd, n, edit, msg):
    codecs.decode(_hostile(vd, n, SMALL), NAMES)  # the same record untouched decodes
    with pytest.raises(RmoeFormatError, match=msg):
        codecs.decode(_hostile(vd, n, SMALL, **edit), NAMES)


# ---- files ---------------------------------------------------------------------------------

def kquant_layer(rng, index=0, m=6, n=10, vds=("q2", "q3", "ternary", "q8"), shared_u=False) -> MoELayer:
    """One layer: a q4 dense base, residuals in every encoding and several k-quant dtypes."""
    encs = ("dense", "csr16", "bitmap", "bsr", "rice", "lowrank")
    res = []
    for k, e in enumerate(encs):
        x = (rng.standard_normal((m, n)) * 0.1).astype(np.float32)
        x[rng.random(x.shape) < 0.5] = 0
        vd = vds[k % len(vds)]
        if e == "lowrank":
            rec = {w: codecs.encode(x, "lowrank", vd, SMALL, rank=2) for w in ("a", "b")}
            if shared_u:
                u = {p: rec["a"].parts[p] for p in ("u", "u_group_scales", "u_scales")}
                rec["b"].parts.update(u)
        else:
            rec = {w: codecs.encode(x, e, vd, SMALL, block_shape=(2, 4)) for w in ("a", "b")}
        res.append(rec)
    base = rng.standard_normal((m, n)).astype(np.float32)
    return MoELayer(index, m, [MatrixSpec(w, (m, n), "bf16", 0) for w in ("a", "b")], "barycenter",
                    {w: codecs.encode(base, "dense", "q4", SMALL) for w in ("a", "b")}, res,
                    [rng.permutation(m) for _ in encs],
                    [SourceSpec(f"l{index}.e{k}.{w}", "bf16", (m, n), k, [w]) for k in range(len(encs))
                     for w in ("a", "b")])


def write_kquant_file(path, shared_u=False):
    rng = np.random.default_rng(5)
    layer = kquant_layer(rng, shared_u=shared_u)
    with Writer(path, {"architecture": "t"}) as w:
        w.add_layer(layer)
    return path, layer


def test_file_round_trip_writes_3_0(tmp_path):
    path, layer = write_kquant_file(tmp_path / "k.rmoe", shared_u=True)
    with resmoe_format.open(path) as r:
        assert r.version == (3, 0)
        r.verify()
        for k, rec in enumerate(layer.residuals):
            for w, enc in rec.items():
                np.testing.assert_array_equal(r.residual(0, k, w), codecs.decode(enc))
        np.testing.assert_array_equal(r.base(0, "a"), codecs.decode(layer.base["a"]))
        lowrank = r.layer(0).residuals[5]
        assert lowrank["a"].tensors["u_group_scales"] == lowrank["b"].tensors["u_group_scales"]
        assert lowrank["a"].quant == SMALL


@pytest.mark.parametrize("version", ["1.0", "2.3"])
def test_k_quant_records_are_refused_in_a_1_x_or_2_x_file(tmp_path, version):
    path, _ = write_kquant_file(tmp_path / "k.rmoe")
    p = rewrite(path, tmp_path / "v.rmoe", edit_meta=lambda m: m.update(rmoe_version=version))
    with pytest.raises(RmoeFormatError, match=r"value_dtype q4 needs \.rmoe version 3\.0 or later"):
        resmoe_format.open(p)


def test_shared_u_must_share_every_part_and_the_layout(tmp_path):
    path, _ = write_kquant_file(tmp_path / "k.rmoe", shared_u=True)

    def share_u_but_not_its_group_scales(s):
        lowrank = s["layers"][0]["residuals"][5]
        lowrank["b"]["tensors"].update({p: lowrank["a"]["tensors"][p] for p in ("u", "u_scales")})

    p = rewrite(write_kquant_file(tmp_path / "n.rmoe")[0], tmp_path / "u.rmoe",
                edit_schema=share_u_but_not_its_group_scales)
    with pytest.raises(RmoeFormatError, match="must share u_scales too"):
        resmoe_format.open(p)

    def other_layout(s):
        s["layers"][0]["residuals"][5]["b"]["quant"]["scale_bits"] = 8

    p = rewrite(path, tmp_path / "q.rmoe", edit_schema=other_layout)
    with pytest.raises(RmoeFormatError, match="differ in part, value dtype or quantization"):
        resmoe_format.open(p)


def test_writer_refuses_u_shared_without_its_group_scales(tmp_path):
    layer = kquant_layer(np.random.default_rng(6), shared_u=True)
    rec = layer.residuals[5]
    rec["b"].parts["u_group_scales"] = rec["b"].parts["u_group_scales"].copy()
    with Writer(tmp_path / "w.rmoe", {"architecture": "t"}) as w:
        with pytest.raises(RmoeFormatError, match="must share u_scales too"):
            w.add_layer(layer)


def test_hostile_bytes_in_a_file_are_format_errors_naming_the_tensor(tmp_path):
    path, _ = write_kquant_file(tmp_path / "k.rmoe")
    with resmoe_format.open(path) as r:
        t = r.header.tensors["rmoe.layers.0.experts.2.a.values"]  # bitmap, ternary codes
        s = r.header.tensors["rmoe.layers.0.experts.0.a.scales"]
        start = r.header.data_start

    def poke(at, value):
        def edit(data):
            data[at - start: at - start + len(value)] = value
            return data
        return edit

    p = rewrite(path, tmp_path / "t.rmoe", edit_data=poke(start + t.begin, b"\xf3"))
    with resmoe_format.open(p, verify_checksums=False) as r:
        with pytest.raises(RmoeFormatError, match="rmoe.layers.0.experts.2.a.values: byte above 242"):
            r.residual(0, 2, "a")
    p = rewrite(path, tmp_path / "s.rmoe", edit_data=poke(start + s.begin, np.float16(np.inf).tobytes()))
    with resmoe_format.open(p, verify_checksums=False) as r:
        with pytest.raises(RmoeFormatError, match="rmoe.layers.0.experts.0.a.scales: super-block scales"):
            r.residual(0, 0, "a")


def test_a_shared_k_quant_u_needs_equal_rows_and_rank(tmp_path):
    """Codes of 6 x 2 and 4 x 3 values have the same shapes: the reader compares m and rank itself."""
    rng = np.random.default_rng(8)
    a = codecs.encode(None, "lowrank", "q3", SMALL, u=rng.standard_normal((6, 2)), v=rng.standard_normal((2, 5)))
    b = codecs.encode(None, "lowrank", "q3", SMALL, u=rng.standard_normal((4, 3)), v=rng.standard_normal((3, 6)))
    b.parts.update({p: a.parts[p] for p in ("u", "u_group_scales", "u_scales")})
    layer = MoELayer(0, 6, [MatrixSpec("a", (6, 5), "bf16", 0), MatrixSpec("b", (4, 6), "bf16", None)], "none", {},
                     [{"a": a, "b": b}], None, [SourceSpec("a", "bf16", (6, 5), 0, ["a"])])
    with Writer(tmp_path / "s.rmoe", {"architecture": "t"}) as w:
        with pytest.raises(RmoeFormatError, match=r"whose U differ in shape \(m, rank\): \(6, 2\), \(4, 3\)"):
            w.add_layer(layer)


def test_parts_of_refuses_what_the_parts_cannot_hold():
    grid = kquant.KqGrid(np.zeros(3, np.uint8), np.zeros(3, np.uint8), np.zeros((2, 2), np.float16))
    kquant.parts_of(np.full(10, 7, np.uint8), grid, "q3", SMALL)
    with pytest.raises(ValueError, match="codes must be below 8"):
        kquant.parts_of(np.full(10, 8, np.uint8), grid, "q3", SMALL)
    with pytest.raises(ValueError, match="group scale and offset codes"):
        kquant.parts_of(np.zeros(13, np.uint8), grid, "q3", SMALL)
    with pytest.raises(ValueError, match="below 64"):
        kquant.parts_of(np.zeros(10, np.uint8), kquant.KqGrid(np.full(3, 64, np.uint8), grid.mc, grid.supers),
                        "q3", SMALL)
    with pytest.raises(ValueError, match="finite super-block"):
        kquant.parts_of(np.zeros(10, np.uint8), kquant.KqGrid(grid.sc, grid.mc, np.full((2, 2), np.inf, np.float16)),
                        "q3", SMALL)
