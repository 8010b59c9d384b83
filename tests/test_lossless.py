"""Lossless mode: every source tensor comes back bit for bit, for bf16, fp16 and fp32."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load_file

import resmoe_format
from resmoe_format import restore
from resmoe_format.dtypes import by_name
from resmoe_format.exact import lossless_split
from resmoe_format.restore import combine

from builders import write_lossless_file

WIDTH = {"bf16": 16, "fp16": 16, "fp32": 32}
UINT = {16: np.uint16, 32: np.uint32}


def _floats_from_bits(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Every bit pattern but NaNs: subnormals, infinities, signed zeros, extremes."""
    a = bits.astype(UINT[WIDTH[dtype]]).view(by_name(dtype).np)
    return np.where(np.isnan(a.astype(np.float32)), a.dtype.type(0), a)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@given(data=st.data(), n=st.integers(1, 64), experts=st.integers(1, 5))
def test_lossless_split_restores_any_bits(dtype, data, n, experts):
    w = WIDTH[dtype]
    xs = [_floats_from_bits(data.draw(hnp.arrays(UINT[w], n)), dtype) for _ in range(experts)]
    base = _floats_from_bits(data.draw(hnp.arrays(UINT[w], n)), dtype).astype(np.float32)
    b, res = lossless_split(xs, base, dtype)
    for x, d in zip(xs, res):
        got = combine(b.astype(np.float32), d, dtype)
        np.testing.assert_array_equal(got.view(UINT[w]), x.view(UINT[w]))


def test_lossless_split_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        lossless_split([np.array([np.nan], np.float32)], np.zeros(1, np.float32), "fp32")


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("stacked", [False, True])
def test_lossless_file_restores_source_bit_for_bit(tmp_path, dtype, stacked):
    expected = write_lossless_file(tmp_path / "m.rmoe", dtype, stacked=stacked)
    with resmoe_format.open(tmp_path / "m.rmoe") as r:
        r.verify()
        got = dict(restore.restore_all(r, original_order=True))
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name].view(UINT[WIDTH[dtype]]), want.view(UINT[WIDTH[dtype]]), name)


def test_barycenter_order_is_the_same_function(tmp_path):
    """Without --original-order each expert's neurons stay aligned: same MLP output."""
    expected = write_lossless_file(tmp_path / "m.rmoe", "fp32", layers=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    with resmoe_format.open(tmp_path / "m.rmoe") as r:
        for k in range(4):
            e = restore.restore_expert(r, 0, k)
            p = f"model.layers.0.mlp.experts.{k}."
            ref = (silu(x @ expected[p + "gate_proj.weight"].T) * (x @ expected[p + "up_proj.weight"].T)) \
                @ expected[p + "down_proj.weight"].T
            out = (silu(x @ e["gate"].T) * (x @ e["up"].T)) @ e["down"].T
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
            assert not np.array_equal(e["gate"], expected[p + "gate_proj.weight"])  # really permuted


def test_restore_checkpoint_cli_writes_loadable_safetensors(tmp_path):
    from converters.cli.restore import main

    expected = write_lossless_file(tmp_path / "m.rmoe", "fp16", layers=1)
    assert main([str(tmp_path / "m.rmoe"), str(tmp_path / "out"), "--original-order"]) == 0
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert set(loaded) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(loaded[k].view(np.uint16), v.view(np.uint16))
    assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "test"}'
