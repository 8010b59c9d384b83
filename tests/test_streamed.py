"""Bounded memory per layer: experts streamed from the mapped checkpoint give the in-memory path's file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import resmoe_format
from converters.convert import ConvertOptions, convert
from converters.encoders.barycenter import streamed_barycenter, wasserstein_barycenter
from converters.example import write_mixtral_checkpoint
from resmoe_format import MatrixSpec, MoELayer, Writer, codecs
from resmoe_format.errors import RmoeFormatError


@pytest.mark.parametrize("e,n,d,noise", [(8, 64, 16, None), (12, 100, 8, None), (6, 128, 200, 3.0)])
def test_streamed_barycenter_is_the_in_memory_one(e, n, d, noise):
    g = torch.Generator().manual_seed(e)
    if noise is None:  # unstructured experts: several iterations, solver calls
        w = torch.randn(e, n, d, generator=g)
    else:  # upcycled: permuted copies of one expert plus noise
        base = torch.randn(n, d, generator=g)
        w = torch.stack([base[torch.randperm(n, generator=g)] + noise * torch.randn(n, d, generator=g)
                         for _ in range(e)])
    reads = []
    got = streamed_barycenter(lambda k: reads.append(k) or w[k], e, max_iter=50)
    for cache in (0, 4 << 30):
        want = wasserstein_barycenter(w, max_iter=50, cache_bytes=cache)
        assert got.objective == want.objective and got.history == want.history
        assert torch.equal(got.barycenter, want.barycenter)
        assert all(np.array_equal(a, b) for a, b in zip(got.permutations, want.permutations))
    assert len(reads) == 1 + e * got.iterations


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("streamed") / "src"
    write_mixtral_checkpoint(d, layers=2, hidden=32, inter=96, experts=6, vocab=128)
    return d


@pytest.mark.parametrize("opts", [{}, {"residual": "svd"}, {"value_dtype": "int8", "base_dtype": "int8"},
                                  {"method": "prune"}], ids=["resmoe", "svd-shared-u", "int8", "prune"])
def test_streamed_layers_write_the_same_bytes(src, tmp_path, opts):
    a = convert(src, tmp_path / "a.rmoe", ConvertOptions(**opts), progress=False)
    b = convert(src, tmp_path / "b.rmoe", ConvertOptions(stream_experts=True, **opts), progress=False)
    assert (tmp_path / "a.rmoe").read_bytes() == (tmp_path / "b.rmoe").read_bytes()
    assert all("streamed" in lay for lay in b["layers"]) and not any("streamed" in lay for lay in a["layers"])
    for x, y in zip(a["layers"], b["layers"]):
        assert x["matrices"] == y["matrices"]  # the same measured errors and sizes


def test_a_refused_streamed_record_aborts_the_writer(tmp_path):
    spec = MatrixSpec("w", (4, 3), "fp32", 0)
    def good():
        return {"w": codecs.encode(np.ones((4, 3), np.float32), "dense", "fp32")}

    bad = {"w": codecs.encode(np.ones((3, 4), np.float32), "dense", "fp32")}  # the wrong shape
    w = Writer(tmp_path / "o.rmoe", {"architecture": "x"})
    layer = MoELayer(0, 4, [spec], "none", {}, [], None)
    with pytest.raises(RmoeFormatError, match="experts.1.w.values: shape"):
        w.add_layer_stream(layer, iter([good(), bad]))
    with pytest.raises(RuntimeError, match="closed"):
        w.add_passthrough("x", np.zeros(1, np.float32))
    w.close()
    assert list(tmp_path.iterdir()) == []
    with Writer(tmp_path / "o.rmoe", {"architecture": "x"}) as w:
        w.add_layer_stream(layer, iter([good(), good()]))
    with resmoe_format.open(tmp_path / "o.rmoe") as r:
        assert r.layers[0].num_experts == 2
