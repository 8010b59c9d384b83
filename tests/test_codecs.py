"""Round trips of every encoding and value dtype; exact sizes; the auto choice."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from resmoe_format import codecs
from resmoe_format.codecs import Quant, keep_mask
from resmoe_format.dtypes import by_name

ELEMENTWISE = ("dense", "csr16", "bitmap", "bsr", "rice")


@st.composite
def sparse_matrices(draw, max_side=40):
    m = draw(st.integers(0, max_side))
    n = draw(st.integers(0, max_side))
    x = draw(hnp.arrays(np.float32, (m, n), elements=st.floats(-1e4, 1e4, width=32)))
    keep = draw(hnp.arrays(np.bool_, (m, n)))
    return np.where(keep, x, np.float32(0))


def _expected(x, value_dtype):
    return x.astype(by_name(value_dtype).np).astype(np.float32)


@pytest.mark.parametrize("encoding", ELEMENTWISE)
@pytest.mark.parametrize("value_dtype", ["fp32", "bf16", "fp16"])
@given(x=sparse_matrices(), block=st.sampled_from([(1, 1), (2, 3), (4, 4), (8, 8)]))
def test_float_round_trip_is_exact_rounding(encoding, value_dtype, x, block):
    enc = codecs.encode(x, encoding, value_dtype, block_shape=block)
    y = codecs.decode(enc)
    np.testing.assert_array_equal(y.view(np.uint32), _expected(x, value_dtype).view(np.uint32))
    label = f"bsr{block[0]}x{block[1]}" if encoding == "bsr" else encoding
    assert codecs.predict_sizes(x, value_dtype, block_shapes=[block])[label][0] == enc.nbytes


@pytest.mark.parametrize("encoding", ELEMENTWISE)
@pytest.mark.parametrize("quant", [Quant("per_row"), Quant("per_block", 7), Quant("per_row", scale_dtype="bf16")])
@given(x=sparse_matrices())
def test_int8_round_trip_within_half_a_step(encoding, quant, x):
    enc = codecs.encode(x, encoding, "int8", quant)
    y = codecs.decode(enc)
    mask = keep_mask(x)
    assert (y[~mask] == 0).all()
    step = enc.parts["scales"].astype(np.float32).max(initial=0)
    # every value is within half a quantization step (plus the scale's own rounding)
    assert np.all(np.abs(y - np.where(mask, x, 0)) <= step * 0.5 * 1.01 + 1e-30)


@given(x=sparse_matrices(20))
def test_int8_per_row_uses_each_rows_own_scale(x):
    enc = codecs.encode(x, "dense", "int8", Quant("per_row"))
    s = enc.parts["scales"].astype(np.float32)
    want = (np.abs(x).max(axis=1, initial=0) / np.float32(127)).astype(np.float32)
    np.testing.assert_array_equal(s, want)
    y = codecs.decode(enc)
    assert np.all(np.abs(y - x) <= s[:, None] * 0.5 + 1e-30)


def test_negative_zero_is_kept_by_sparse_encodings():
    x = np.zeros((3, 5), np.float32)
    x[1, 2] = -0.0
    x[2, 4] = 1.5
    for e in ("csr16", "bitmap", "bsr", "rice"):
        y = codecs.decode(codecs.encode(x, e, "fp32"))
        assert np.signbit(y[1, 2]) and y[2, 4] == 1.5 and not np.signbit(y[0, 0])


def test_csr16_splits_wide_rows_into_column_blocks():
    rng = np.random.default_rng(1)
    x = np.zeros((3, 70000), np.float32)
    cols = rng.choice(70000, 500, replace=False)
    x[rng.integers(0, 3, 500), cols] = rng.standard_normal(500)
    enc = codecs.encode(x, "csr16", "fp32")
    assert enc.parts["indptr"].shape == (2, 4)
    assert enc.parts["indices"].dtype == np.uint16
    np.testing.assert_array_equal(codecs.decode(enc), x)


@given(m=st.integers(1, 30), n=st.integers(1, 30), r=st.integers(0, 5), vd=st.sampled_from(["fp32", "bf16", "int8"]))
def test_lowrank_is_the_product_of_its_factors(m, n, r, vd):
    r = min(r, m, n)
    rng = np.random.default_rng(m * 100 + n)
    u, v = rng.standard_normal((m, r)).astype(np.float32), rng.standard_normal((r, n)).astype(np.float32)
    enc = codecs.encode(None, "lowrank", vd, u=u, v=v)
    y = codecs.decode(enc)
    if vd == "fp32":
        np.testing.assert_array_equal(y, (u.astype(np.float64) @ v.astype(np.float64)).astype(np.float32))
    else:
        np.testing.assert_allclose(y, u @ v, atol=0.1 * max(1, r))
    assert enc.nbytes == codecs.CODECS["lowrank"].predict_nbytes((m, n), vd, enc.quant, rank=r)


def test_lowrank_from_svd_is_optimal_rank_r():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((40, 3)) @ rng.standard_normal((3, 30))).astype(np.float32)
    y = codecs.decode(codecs.encode(x, "lowrank", "fp32", rank=3))
    np.testing.assert_allclose(y, x, atol=1e-4)


@pytest.mark.parametrize("vd", ["bf16", "int8"])
@given(x=sparse_matrices(48))
def test_auto_stores_the_smallest_encoding(vd, x):
    enc = codecs.encode(x, "auto", vd)
    sizes = codecs.predict_sizes(x, vd, enc.quant)
    assert enc.nbytes == min(s for s, _ in sizes.values())
    np.testing.assert_array_equal(codecs.decode(enc) == 0, codecs.decode(codecs.encode(x, "dense", vd)) == 0)


def test_bitmap_beats_csr16_above_one_sixteenth():
    rng = np.random.default_rng(0)
    for d, smaller in ((0.04, "csr16"), (0.08, "bitmap")):
        x = rng.standard_normal((256, 512)).astype(np.float32)
        x[rng.random(x.shape) >= d] = 0
        sizes = codecs.predict_sizes(x, "bf16")
        assert min(("csr16", "bitmap"), key=lambda e: sizes[e][0]) == smaller


@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.25, 0.5])
def test_auto_is_near_the_entropy_bound_on_random_masks(density):
    """Gap coding (rice) keeps unstructured masks within a few percent of H(d) + d * 16 bits."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, 1024)).astype(np.float32)
    x[rng.random(x.shape) >= density] = 0
    d = np.count_nonzero(x) / x.size
    bound_bits = -(d * np.log2(d) + (1 - d) * np.log2(1 - d)) + 16 * d
    enc = codecs.encode(x, "auto", "bf16")
    assert 8 * enc.nbytes / x.size <= 1.05 * bound_bits


@pytest.mark.parametrize("k", [0, 1, 3, 9])
def test_rice_with_any_parameter_round_trips(k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((37, 53)).astype(np.float32)
    x[rng.random(x.shape) >= 0.2] = 0
    enc = codecs.encode(x, "rice", "fp32", k=k)
    assert enc.params["k"] == k
    np.testing.assert_array_equal(codecs.decode(enc), x)


def test_auto_keeps_low_rank_factors_low_rank():
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal((64, 4)), rng.standard_normal((4, 64))
    assert codecs.encode(None, "auto", "bf16", u=u, v=v).encoding == "lowrank"
    u, v = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    assert codecs.encode(None, "auto", "bf16", u=u, v=v).encoding == "dense"


def test_one_dimensional_matrices_are_one_row():
    x = np.array([0, 1.5, 0, -2], np.float32)
    enc = codecs.encode(x, "bitmap", "fp32")
    assert enc.shape == (1, 4)
    np.testing.assert_array_equal(codecs.decode(enc)[0], x)


def test_fp16_overflow_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        codecs.encode(np.array([[1e6]], np.float32), "dense", "fp16")


def test_auto_tie_break_follows_auto_order():
    """At equal size, auto picks the earlier encoding of AUTO_ORDER (csr16 before rice and bsr)."""
    from resmoe_format.codecs import AUTO_ORDER, predict_sizes
    rng = np.random.default_rng(3)
    for _ in range(200):
        m, n = rng.integers(1, 9, size=2)
        x = np.where(rng.random((m, n)) < rng.random(), rng.standard_normal((m, n)), 0).astype(np.float32)
        sizes = predict_sizes(x, "bf16")
        best = min(s for s, _ in sizes.values())
        winners = {("bsr" if k.startswith("bsr") else k) for k, (s, _) in sizes.items() if s == best}
        expect = min(winners, key=AUTO_ORDER.index)
        assert codecs.encode(x, "auto", "bf16").encoding == expect
