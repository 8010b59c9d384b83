"""Version 2.0: one low-rank U shared by the matrices of one expert (spec 1.4, 4.8, 7.2, 8)."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from filecraft import rewrite, split

import resmoe_format
from resmoe_format import MatrixSpec, MoELayer, Quant, RmoeFormatError, SourceSpec, Writer, codecs, restore
from resmoe_format.accounting import account
from resmoe_format.demo import build

N, H, R = 12, 8, 3
MATS = ("gate", "up", "down")  # all (N, H): the neuron axis first, as in the design matrix [gate | up | down]
PER_BLOCK = Quant("per_block", 5, "bf16")


def encode_expert(rng, value_dtype="bf16", quant=None, share=True, rank=R):
    """One expert's lowrank records; with ``share`` the same U arrays (u, u_scales) serve every matrix."""
    u = rng.standard_normal((N, rank)).astype(np.float32)
    recs = {}
    for m in MATS:
        e = codecs.encode(None, "lowrank", value_dtype, quant, u=u, v=rng.standard_normal((rank, H)).astype(np.float32))
        if share and recs:
            for p in ("u", "u_scales"):
                if p in e.parts:
                    e.parts[p] = recs["gate"].parts[p]
        recs[m] = e
    return recs


def layer(rng, value_dtype="bf16", quant=None, share=True, experts=2, index=0, dtype="fp32", base=False):
    mats = [MatrixSpec(m, (N, H), dtype, 0) for m in MATS]
    residuals = [encode_expert(rng, value_dtype, quant, share) for _ in range(experts)]
    sources = [SourceSpec(f"l{index}.e{k}.{m}", dtype, (N, H), k, [m]) for k in range(experts) for m in MATS]
    if base:
        b = {m: codecs.encode(None, "lowrank", "bf16", u=rng.standard_normal((N, R)), v=rng.standard_normal((R, H)))
             for m in MATS}
        return MoELayer(index, N, mats, "barycenter", b, residuals, [rng.permutation(N) for _ in range(experts)],
                        sources)
    return MoELayer(index, N, mats, "none", {}, residuals, None, sources)


def write(path, *layers):
    with Writer(path, {"architecture": "t", "source_dtype": "fp32"}) as w:
        for lay in layers:
            w.add_layer(lay)
    return path


def stored_factor(enc, part):
    """Factor ``part`` ("u" or "v") as the file stores it, decoded to fp32 by hand (spec 5.1, 5.8)."""
    x = enc.parts[part].astype(np.float32)
    if enc.value_dtype != "int8":
        return x
    s = enc.parts[f"{part}_scales"].astype(np.float32)
    if enc.quant.scheme == "per_row":
        return x * s[:, None]
    return x * np.repeat(s, enc.quant.block)[:x.size].reshape(x.shape)



# --- writing and reading ------------------------------------------------------------------

@pytest.mark.parametrize("vd,quant", [("bf16", None), ("fp16", None), ("fp32", None), ("int8", None),
                                      ("int8", PER_BLOCK)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_shared_u_round_trips_as_u_times_v(tmp_path, vd, quant, dtype):
    lay = layer(np.random.default_rng(0), vd, quant, dtype=dtype)
    p = write(tmp_path / "s.rmoe", lay)
    with resmoe_format.open(p) as r:
        assert r.version == (2, 0)
        assert r.header.metadata["rmoe_version"] == "2.0" and r.schema.version == "2.0"
        r.verify()
        restored = dict(restore.restore_all(r))
        for k in range(2):
            u = stored_factor(lay.residuals[k]["gate"], "u").astype(np.float64)
            for m in MATS:
                v = stored_factor(lay.residuals[k][m], "v")
                # spec 6.2: fp32 factors, products summed in binary64, rounded once to binary32; 6.1: then to T
                want = (u @ v.astype(np.float64)).astype(np.float32)
                if dtype == "bf16":
                    want = want.astype(ml_dtypes.bfloat16)
                np.testing.assert_array_equal(r.residual(0, k, m), (u @ v).astype(np.float32))
                got = restore.restore_matrix(r, 0, k, m)
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
                np.testing.assert_array_equal(restored[f"l0.e{k}.{m}"].view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("vd,quant", [("bf16", None), ("int8", None), ("int8", PER_BLOCK)])
def test_shared_tensor_is_stored_once_under_the_first_records_name(tmp_path, vd, quant):
    p = write(tmp_path / "s.rmoe", layer(np.random.default_rng(1), vd, quant))
    parts = ("u", "u_scales") if vd == "int8" else ("u",)
    with resmoe_format.open(p) as r:
        for k in range(2):
            refs = r.schema.layers[0].residuals[k]
            for part in parts:
                assert {refs[m].tensors[part] for m in MATS} == {f"rmoe.layers.0.experts.{k}.gate.{part}"}
            assert len({refs[m].tensors["v"] for m in MATS}) == 3
        names = r.tensor_names
        assert not any(n.endswith((".up.u", ".down.u", ".up.u_scales", ".down.u_scales")) for n in names)
        assert sum(n.endswith(".u") for n in names) == 2


@pytest.mark.parametrize("vd,quant", [("bf16", None), ("fp32", None), ("int8", None), ("int8", PER_BLOCK)])
def test_accounting_counts_the_shared_tensor_once(tmp_path, vd, quant):
    shared = layer(np.random.default_rng(2), vd, quant)
    p = write(tmp_path / "s.rmoe", shared)
    q = write(tmp_path / "n.rmoe", layer(np.random.default_rng(2), vd, quant, share=False))
    with resmoe_format.open(p) as r, resmoe_format.open(q) as r2:
        a, a2 = account(r), account(r2)
    assert sum(a.bytes.values()) == a.file_size == p.stat().st_size
    assert sum(a.layers[0]["bytes"].values()) == a.layers[0]["expert_bytes"] == a.expert_bytes
    e = shared.residuals
    u_bytes = sum(e[k]["gate"].parts["u"].nbytes for k in range(2))
    v_bytes = sum(e[k][m].parts["v"].nbytes for k in range(2) for m in MATS)
    assert a.bytes["residual_values"] == u_bytes + v_bytes  # each expert's U once, 3 V's
    scale_bytes = 0
    if vd == "int8":
        scale_bytes = sum(e[k]["gate"].parts["u_scales"].nbytes for k in range(2))
        scale_bytes += sum(e[k][m].parts["v_scales"].nbytes for k in range(2) for m in MATS)
    assert a.bytes["scales"] == scale_bytes
    # the unshared file stores every U three times: the difference is exactly two more U's per expert
    assert a2.bytes["residual_values"] - a.bytes["residual_values"] == 2 * u_bytes
    assert a.layers[0]["encodings"] == {f"lowrank/{vd}": 6}


def test_shared_tensor_checksum_is_checked_lazily_once(tmp_path):
    p = write(tmp_path / "s.rmoe", layer(np.random.default_rng(3)))
    with resmoe_format.open(p) as r:
        name = r.schema.layers[0].residuals[1]["gate"].tensors["u"]
        begin = r.header.data_start + r.header.tensors[name].begin
    raw = bytearray(p.read_bytes())
    raw[begin] ^= 0x40
    bad = tmp_path / "b.rmoe"
    bad.write_bytes(bytes(raw))
    with resmoe_format.open(bad) as r:
        r.residual(0, 0, "up")  # expert 0 does not touch the damaged tensor
        for m in MATS:  # every record that shares it sees the damage
            with pytest.raises(RmoeFormatError, match="crc32 mismatch"):
                r.residual(0, 1, m)
        with pytest.raises(RmoeFormatError, match="crc32 mismatch"):
            r.verify()
    with resmoe_format.open(p) as r:
        r.residual(0, 1, "gate")
        assert name in r._verified
        r.residual(0, 1, "down")  # read again, already verified


def test_several_layers_with_base_and_permutations(tmp_path):
    rng = np.random.default_rng(4)
    lays = [layer(rng, "bf16", index=i, base=True) for i in range(3)]
    p = write(tmp_path / "s.rmoe", *lays)
    with resmoe_format.open(p) as r:
        assert r.version == (2, 0)
        r.verify()
        assert sum(account(r).bytes.values()) == p.stat().st_size
        for i, lay in enumerate(lays):
            for k in range(2):
                for m in MATS:
                    want = restore.combine(codecs.decode(lay.base[m]), codecs.decode(lay.residuals[k][m]), "fp32")
                    np.testing.assert_array_equal(restore.restore_matrix(r, i, k, m), want)


def test_files_without_sharing_are_written_as_1_0(tmp_path):
    """Equal but distinct U arrays are not shared: the file stays 1.0, byte for byte what 1.0 writers make."""
    rng = np.random.default_rng(5)
    lay = layer(rng, share=False)
    p = write(tmp_path / "n.rmoe", lay)
    with resmoe_format.open(p) as r:
        assert r.version == (1, 0) and r.schema.version == "1.0"
        r.verify()
    # copies of one U: equal values, different objects -> stored three times, still 1.0
    for recs in lay.residuals:
        for m in ("up", "down"):
            recs[m].parts["u"] = recs["gate"].parts["u"].copy()
    p2 = write(tmp_path / "c.rmoe", lay)
    with resmoe_format.open(p2) as r:
        assert r.version == (1, 0)
        assert len({r.schema.layers[0].residuals[0][m].tensors["u"] for m in MATS}) == 3


def test_demo_file_is_still_1_0(tmp_path):
    p = build(tmp_path / "demo.rmoe", layers=1, experts=4, hidden=16, inter=24)
    _, schema, _, meta = split(p)
    assert meta["rmoe_version"] == "1.0" and schema["version"] == "1.0"


def test_higher_minor_of_2_is_accepted(tmp_path):
    p = write(tmp_path / "s.rmoe", layer(np.random.default_rng(6)))
    q = rewrite(p, tmp_path / "m.rmoe", edit_meta=lambda m: m.update(rmoe_version="2.9"))
    with resmoe_format.open(q) as r:
        assert r.version == (2, 9)
        r.verify()


@pytest.mark.parametrize("vd,quant", [("bf16", None), ("int8", None), ("int8", PER_BLOCK)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("share,base", [(True, False), (False, False), (True, True)])
def test_fused_runtime_pairs_each_v_with_its_u(tmp_path, vd, quant, dtype, share, base):
    """The fused runtime holds a shared U once and multiplies by every record's own U V (+ B): spec 6.7's
    unrounded weights A, within half an ulp of the source dtype of the restored ones."""
    from types import SimpleNamespace

    torch = pytest.importorskip("torch")
    from resmoe_format.torch import FusedExperts
    from resmoe_format.torch.kinds import kind_for

    p = write(tmp_path / "f.rmoe", layer(np.random.default_rng(30), vd, quant, share=share, dtype=dtype, base=base))
    kind = kind_for(SimpleNamespace(model_type="mixtral", hidden_act="silu"))  # gate, up -> down, as MATS
    half_ulp = 2.0 ** -8 if dtype == "bf16" else 0.0
    with resmoe_format.open(p) as r:
        fused = FusedExperts(kind, r, r.layer(0), torch.float32, torch.device("cpu"))
        for k in range(2):
            us = {id(op.u) for _, _, op in fused.in_ops[k]} | {id(fused.out_ops[k].u)}
            assert len(us) == (1 if share else 3)
            got = fused.weights(k)
            for m in MATS:
                f = got[m].numpy()
                a = restore.combine(r.base(0, m), r.residual(0, k, m), "fp32")  # 6.1 step 3, not rounded
                slack = 2.0 ** -16 * np.abs(a).max()  # binary32 products
                np.testing.assert_allclose(f, a, rtol=0, atol=slack)
                w = restore.restore_matrix(r, 0, k, m).astype(np.float32)
                assert (np.abs(f - w) <= half_ulp * np.abs(w) + slack).all()


# --- the reader's rules (hand-crafted headers) --------------------------------------------

@pytest.mark.parametrize("version", ["1.0", "1.3"])
def test_shared_tensor_in_a_1_x_file_is_rejected(tmp_path, version):
    p = write(tmp_path / "s.rmoe", layer(np.random.default_rng(7)))
    bad = rewrite(p, tmp_path / "b.rmoe", edit_meta=lambda m: m.update(rmoe_version=version))
    with pytest.raises(RmoeFormatError,
                       match="tensor rmoe.layers.0.experts.0.gate.u is referenced twice by the schema"):
        resmoe_format.open(bad)


def _res(s, layer_i=0):
    return s["layers"][layer_i]["residuals"]


def _point(s, dst, src, part="u", dst_part=None):
    """Make record ``dst`` = (layer, expert, matrix) name the tensor of ``src``'s ``part``."""
    (dl, dk, dm), (sl, sk, sm) = dst, src
    _res(s, dl)[dk][dm]["tensors"][dst_part or part] = _res(s, sl)[sk][sm]["tensors"][part]


def _adopt(s, name, layer_i=0):
    """Give a tensor that an edit orphans a role (a layer extension), so the file stays otherwise valid."""
    ext = s["layers"][layer_i].setdefault("extensions", {}).setdefault("orphans", {"tensors": {}})
    ext["tensors"][str(len(ext["tensors"]))] = name


REJECTED = {
    # (edit of the schema, expected message)
    # a 2.0 file: cross-expert factors need 5.0 (and expert 0's u is shared by its matrices, which 5.0 forbids too)
    "across experts": (lambda s: _point(s, (0, 1, "gate"), (0, 0, "gate")), "needs .rmoe version 5.0"),
    "across layers": (lambda s: _point(s, (1, 0, "gate"), (0, 0, "gate")), "referenced twice"),
    "a v part": (lambda s: _point(s, (0, 0, "up"), (0, 0, "gate"), "v"), "referenced twice"),
    "u as another record's v": (lambda s: _point(s, (0, 0, "up"), (0, 0, "gate"), "u", "v"), "referenced twice"),
    "different value dtypes": (lambda s: _res(s)[0]["up"].update(value_dtype="fp16"), "differ in part, value dtype"),
    "a base record": (lambda s: s["layers"][0]["base"]["matrices"]["up"]["tensors"].update(
        u=s["layers"][0]["base"]["matrices"]["gate"]["tensors"]["u"]), "referenced twice"),
    "a base record and a residual": (lambda s: s["layers"][0]["base"]["matrices"]["gate"]["tensors"].update(
        u=_res(s)[0]["gate"]["tensors"]["u"]), "referenced twice"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_forbidden_sharing_is_rejected_by_the_reader(tmp_path, case):
    edit, msg = REJECTED[case]
    rng = np.random.default_rng(8)
    p = write(tmp_path / "s.rmoe", layer(rng, index=0, base=True), layer(rng, index=1, base=True))
    bad = rewrite(p, tmp_path / "b.rmoe", edit_schema=edit)
    with pytest.raises(RmoeFormatError, match=msg):
        resmoe_format.open(bad)


@pytest.mark.parametrize("case", ["u shared, u_scales not", "u_scales shared, u not"])
def test_int8_u_and_u_scales_are_shared_together(tmp_path, case):
    p = write(tmp_path / "s.rmoe", layer(np.random.default_rng(10), "int8"))
    other = tmp_path / "o.rmoe"
    write(other, layer(np.random.default_rng(10), "int8", share=False))

    # take the unshared file and make one pair of records share one part only
    part = "u" if case.startswith("u shared") else "u_scales"
    def edit(s):
        _adopt(s, _res(s)[0]["up"]["tensors"][part])
        _point(s, (0, 0, "up"), (0, 0, "gate"), part)

    bad = rewrite(other, tmp_path / "b.rmoe", edit_meta=lambda m: m.update(rmoe_version="2.0"), edit_schema=edit)
    with pytest.raises(RmoeFormatError, match="must share u_scales too"):
        resmoe_format.open(bad)
    with resmoe_format.open(p) as r:
        r.verify()


def test_shared_int8_u_with_different_quant_is_rejected(tmp_path):
    p = write(tmp_path / "s.rmoe", layer(np.random.default_rng(11), "int8"))
    bad = rewrite(p, tmp_path / "b.rmoe",
                  edit_schema=lambda s: _res(s)[0]["down"]["quant"].update(scale_dtype="bf16"))
    with pytest.raises(RmoeFormatError, match="differ in part, value dtype or quantization"):
        resmoe_format.open(bad)


def test_sharing_by_other_encodings_is_rejected_in_2_0(tmp_path):
    p = build(tmp_path / "demo.rmoe", layers=1, experts=4, hidden=16, inter=24)
    _, schema, _, _ = split(p)
    dense = [(k, m) for k, r in enumerate(_res(schema)) for m, rec in r.items() if rec and rec["encoding"] != "lowrank"]
    (k, m), (k2, m2) = dense[0], dense[1]

    def edit(s):
        _res(s)[k2][m2]["tensors"]["values"] = _res(s)[k][m]["tensors"]["values"]

    bad = rewrite(p, tmp_path / "b.rmoe", edit_meta=lambda m: m.update(rmoe_version="2.0"), edit_schema=edit)
    with pytest.raises(RmoeFormatError, match="referenced twice"):
        resmoe_format.open(bad)


def test_shared_u_must_fit_every_record(tmp_path):
    """Crafted: 'up' (rank R - 1) names gate's rank-R U; its own U is kept referenced by an extension,
    so only the shape check can catch it."""
    rng = np.random.default_rng(12)
    lay = layer(rng, share=False)
    lay.residuals[0]["up"] = codecs.encode(None, "lowrank", "bf16", u=rng.standard_normal((N, R - 1)),
                                           v=rng.standard_normal((R - 1, H)))
    p = write(tmp_path / "n.rmoe", lay)

    def edit(s):
        _adopt(s, _res(s)[0]["up"]["tensors"]["u"])
        _point(s, (0, 0, "up"), (0, 0, "gate"))

    bad = rewrite(p, tmp_path / "b.rmoe", edit_meta=lambda m: m.update(rmoe_version="2.0"), edit_schema=edit)
    with pytest.raises(RmoeFormatError, match=r"rmoe.layers.0.experts.0.gate.u: shape \[12, 3\] but the schema "
                                              r"implies \[12, 2\]"):
        resmoe_format.open(bad)


# --- the writer's rules --------------------------------------------------------------------

def test_writer_rejects_a_u_shared_across_experts_and_matrices(tmp_path):
    """Expert 0's u serves its three matrices (2.0): another expert may not share it too (5.0 shares one
    matrix's factor across experts, never a factor that is also another matrix's)."""
    lay = layer(np.random.default_rng(20))
    lay.residuals[1]["gate"].parts["u"] = lay.residuals[0]["gate"].parts["u"]
    with Writer(tmp_path / "w.rmoe", {"architecture": "t"}) as w:
        with pytest.raises(RmoeFormatError, match="cannot also be the u of another matrix's record"):
            w.add_layer(lay)
        w.add_layer(layer(np.random.default_rng(21)))  # the writer is still usable
    with resmoe_format.open(tmp_path / "w.rmoe") as r:
        r.verify()


def test_one_matrix_factor_shared_across_experts_is_a_5_0_file(tmp_path):
    lay = layer(np.random.default_rng(23), share=False)
    for recs in lay.residuals[1:]:
        recs["gate"].parts["v"] = lay.residuals[0]["gate"].parts["v"]
    p = write(tmp_path / "x.rmoe", lay)
    with resmoe_format.open(p) as r:
        assert r.version == (5, 0)
        r.verify()
        names = {res["gate"].tensors["v"] for res in r.layers[0].residuals}
        assert names == {"rmoe.layers.0.experts.0.gate.v"}


def test_writer_rejects_a_u_shared_across_layers(tmp_path):
    rng = np.random.default_rng(22)
    first, second = layer(rng, index=0), layer(rng, index=1)
    second.residuals[0]["up"].parts["u"] = first.residuals[0]["gate"].parts["u"]
    with Writer(tmp_path / "w.rmoe", {"architecture": "t"}) as w:
        w.add_layer(first)
        with pytest.raises(RmoeFormatError, match="earlier layer"):
            w.add_layer(second)
        w.add_layer(layer(rng, index=1))
    with resmoe_format.open(tmp_path / "w.rmoe") as r:
        assert r.version == (2, 0)
        r.verify()


def test_writer_forgets_arrays_of_earlier_layers_once_freed(tmp_path):
    rng = np.random.default_rng(23)
    with Writer(tmp_path / "w.rmoe", {"architecture": "t"}) as w:
        for i in range(4):
            w.add_layer(layer(rng, index=i))  # each layer's arrays are dropped after the call
        assert len(w._earlier) == 0


@pytest.mark.parametrize("case", ["v part", "u as v", "base and residual", "two base records"])
def test_writer_rejects_other_same_object_parts(tmp_path, case):
    rng = np.random.default_rng(24)
    if case == "v part":
        lay = layer(rng)
        lay.residuals[0]["up"].parts["v"] = lay.residuals[0]["gate"].parts["v"]
        msg = "expert 0 matrix up part v is the same array object"
    elif case == "u as v":  # square factors (rank N) make the shapes fit
        mats = [MatrixSpec(m, (N, N), "fp32", 0) for m in MATS]
        recs = {m: codecs.encode(None, "lowrank", "fp32", u=rng.standard_normal((N, N)),
                                 v=rng.standard_normal((N, N))) for m in MATS}
        recs["gate"].parts["v"] = recs["gate"].parts["u"]
        lay = MoELayer(0, N, mats, "none", {}, [recs], None, [SourceSpec("x", "fp32", (N, N), 0, ["gate"])])
        msg = "expert 0 matrix gate part v is the same array object as layer 0 expert 0 matrix gate part u"
    elif case == "base and residual":
        lay = layer(rng, base=True)
        lay.base["gate"].parts["u"] = lay.residuals[0]["gate"].parts["u"]
        msg = "the same array object"
    else:
        lay = layer(rng, base=True)
        lay.base["up"].parts["u"] = lay.base["gate"].parts["u"]
        msg = "base matrix up part u is the same array object as layer 0 base matrix gate part u"
    with Writer(tmp_path / "w.rmoe", {"architecture": "t"}) as w:
        with pytest.raises(RmoeFormatError, match=msg):
            w.add_layer(lay)


def test_writer_rejects_a_shared_u_of_records_with_different_quant(tmp_path):
    rng = np.random.default_rng(25)
    lay = layer(rng, "int8")
    gate = lay.residuals[0]["gate"]
    up = codecs.encode(None, "lowrank", "int8", Quant(scale_dtype="bf16"), u=rng.standard_normal((N, R)),
                       v=rng.standard_normal((R, H)))
    up.parts["u"], up.parts["u_scales"] = gate.parts["u"], gate.parts["u_scales"]
    lay.residuals[0]["up"] = up
    with Writer(tmp_path / "w.rmoe", {"architecture": "t"}) as w:
        with pytest.raises(RmoeFormatError, match="differ in part, value dtype or quantization"):
            w.add_layer(lay)


def test_writer_rejects_a_shared_u_of_records_with_different_value_dtypes(tmp_path):
    rng = np.random.default_rng(26)
    lay = layer(rng, "bf16")
    up = codecs.encode(None, "lowrank", "fp16", u=rng.standard_normal((N, R)), v=rng.standard_normal((R, H)))
    up.parts["u"] = lay.residuals[0]["gate"].parts["u"]
    lay.residuals[0]["up"] = up
    with Writer(tmp_path / "w.rmoe", {"architecture": "t"}) as w:
        with pytest.raises(RmoeFormatError, match="differ in part, value dtype or quantization"):
            w.add_layer(lay)


def test_writer_rejects_a_shared_u_that_does_not_fit_a_record(tmp_path):
    rng = np.random.default_rng(27)
    lay = layer(rng)
    up = codecs.encode(None, "lowrank", "bf16", u=rng.standard_normal((N, R - 1)), v=rng.standard_normal((R - 1, H)))
    up.parts["u"] = lay.residuals[0]["gate"].parts["u"]  # rank R U in a rank R-1 record
    lay.residuals[0]["up"] = up
    with Writer(tmp_path / "w.rmoe", {"architecture": "t"}) as w:
        with pytest.raises(RmoeFormatError, match=r"rmoe.layers.0.experts.0.gate.u: shape \[12, 3\] but the schema "
                                                  r"implies \[12, 2\]"):
            w.add_layer(lay)


@pytest.mark.parametrize("part", ["u", "u_scales"])
def test_writer_rejects_sharing_only_one_of_u_and_u_scales(tmp_path, part):
    lay = layer(np.random.default_rng(28), "int8", share=False)
    lay.residuals[1]["down"].parts[part] = lay.residuals[1]["gate"].parts[part]
    with Writer(tmp_path / "w.rmoe", {"architecture": "t"}) as w:
        with pytest.raises(RmoeFormatError, match="must share u_scales too"):
            w.add_layer(lay)


def test_partial_sharing_within_an_expert(tmp_path):
    """gate and up share one U, down has its own: still one valid 2.0 file."""
    rng = np.random.default_rng(29)
    lay = layer(rng, share=False)
    for recs in lay.residuals:
        recs["up"].parts["u"] = recs["gate"].parts["u"]
    p = write(tmp_path / "p.rmoe", lay)
    with resmoe_format.open(p) as r:
        assert r.version == (2, 0)
        r.verify()
        refs = r.schema.layers[0].residuals[0]
        assert refs["gate"].tensors["u"] == refs["up"].tensors["u"] != refs["down"].tensors["u"]
        for k in range(2):
            for m in MATS:
                np.testing.assert_array_equal(r.residual(0, k, m), codecs.decode(lay.residuals[k][m]))
    _, schema, _, _ = split(p)
    assert json.dumps(schema).count('"rmoe.layers.0.experts.0.gate.u"') == 2
