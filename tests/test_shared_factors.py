"""Version 2.0: one low-rank U shared by several matrices of one expert (spec 4.8)."""
from __future__ import annotations

import numpy as np
import pytest
from filecraft import rewrite

import resmoe_format
from resmoe_format import MatrixSpec, MoELayer, RmoeFormatError, SourceSpec, Writer, codecs, restore
from resmoe_format.accounting import account

N, H, R = 12, 8, 3


def layer(rng, value_dtype="bf16", share=True, share_across_experts=False, experts=2):
    mats = [MatrixSpec(m, (N, H), "fp32", 0) for m in ("gate", "up", "down")]
    residuals, first_u = [], None
    for k in range(experts):
        u = rng.standard_normal((N, R)).astype(np.float32)
        recs = {}
        for m in ("gate", "up", "down"):
            v = rng.standard_normal((R, H)).astype(np.float32)
            e = codecs.encode(None, "lowrank", value_dtype, u=u, v=v)
            if share and "gate" in recs:
                for p in ("u", "u_scales"):
                    if p in e.parts:
                        e.parts[p] = recs["gate"].parts[p]
            recs[m] = e
        if share_across_experts:
            first_u = recs["gate"].parts["u"] if first_u is None else first_u
            recs["gate"].parts["u"] = first_u
        residuals.append(recs)
    sources = [SourceSpec(f"e{k}.{m}", "fp32", (N, H), k, [m]) for k in range(experts) for m in ("gate", "up", "down")]
    return MoELayer(0, N, mats, "none", {}, residuals, None, sources)


def write(path, lay):
    with Writer(path, {"architecture": "t", "source_dtype": "fp32"}) as w:
        w.add_layer(lay)
    return path


@pytest.mark.parametrize("vd", ["bf16", "fp32", "int8"])
def test_shared_u_round_trips_and_is_counted_once(tmp_path, vd):
    lay = layer(np.random.default_rng(0), vd)
    p = write(tmp_path / "s.rmoe", lay)
    q = write(tmp_path / "n.rmoe", layer(np.random.default_rng(0), vd, share=False))
    with resmoe_format.open(p) as r, resmoe_format.open(q) as r2:
        assert r.version == (2, 0) and r2.version == (1, 0)
        r.verify()
        refs = r.schema.layers[0].residuals[1]
        assert refs["gate"].tensors["u"] == refs["up"].tensors["u"] == refs["down"].tensors["u"]
        for k in range(2):
            for m in ("gate", "up", "down"):
                want = codecs.decode(lay.residuals[k][m])
                np.testing.assert_array_equal(restore.restore_matrix(r, 0, k, m), want)
                np.testing.assert_array_equal(restore.restore_matrix(r2, 0, k, m), want)
        a, a2 = account(r), account(r2)
        assert sum(a.bytes.values()) == p.stat().st_size
        u_bytes = lay.residuals[0]["gate"].parts["u"].nbytes
        assert a2.bytes["residual_values"] - a.bytes["residual_values"] == 2 * 2 * u_bytes


def test_sharing_across_experts_is_stored_twice_not_shared(tmp_path):
    p = write(tmp_path / "x.rmoe", layer(np.random.default_rng(1), share=False, share_across_experts=True))
    with resmoe_format.open(p) as r:
        assert r.version == (1, 0)
        r.verify()


def test_shared_tensor_in_a_1_0_file_is_rejected(tmp_path):
    p = write(tmp_path / "s.rmoe", layer(np.random.default_rng(2)))
    bad = rewrite(p, tmp_path / "b.rmoe", edit_meta=lambda m: m.update(rmoe_version="1.0"))
    with pytest.raises(RmoeFormatError, match="referenced twice"):
        resmoe_format.open(bad)


def _share(schema, src, dst, part="u"):
    lay = schema["layers"][0]
    s_exp, s_mat = src
    d_exp, d_mat = dst
    lay["residuals"][d_exp][d_mat]["tensors"][part] = lay["residuals"][s_exp][s_mat]["tensors"][part]


@pytest.mark.parametrize("edit", [
    lambda s: _share(s, (0, "gate"), (1, "gate")),  # across experts
    lambda s: _share(s, (0, "gate"), (0, "up"), part="v"),  # a v part
    lambda s: s["layers"][0]["residuals"][0]["up"].update(value_dtype="fp16"),  # different value dtypes
])
def test_forbidden_sharing_is_rejected(tmp_path, edit):
    p = write(tmp_path / "s.rmoe", layer(np.random.default_rng(3)))
    bad = rewrite(p, tmp_path / "b.rmoe", edit_schema=edit)
    with pytest.raises(RmoeFormatError):
        with resmoe_format.open(bad) as r:
            r.verify()
