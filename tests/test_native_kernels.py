"""The compiled sparse kernels of fused mode (resmoe_format/torch/native.py, sparse_kernels.c) against dense
products, the in-place reading of bitmap records, and the pure-torch fallback when no kernels can be built."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from resmoe_format.codecs import CODECS
from resmoe_format.torch import native
from resmoe_format.torch.experts import FusedExperts
from resmoe_format.torch.residuals import SparseResidual

needs_kernels = pytest.mark.skipif(not native.available(), reason=f"no kernels: {native.unavailable_reason()}")


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """native.py's loaded state forgotten (and restored after the test), a private build cache."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("RESMOE_CACHE", str(tmp_path / "cache"))
    return native


def sparse(m: int, n: int, density: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((m, n)).astype(np.float32) * (rng.random((m, n)) < density)
    return torch.from_numpy(d).to(torch.bfloat16).float().numpy()  # bf16 numbers, so both value dtypes hold them


def check(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    err = (got.double() - want).abs().max().item()
    assert err <= rtol * want.abs().max().item() + 1e-6, err


def rtol(T: int, x: torch.dtype) -> float:
    """Beyond DENSE_TOKENS a bitmap is expanded and bf16 activations multiplied in bf16 (a bf16 result)."""
    return 2 ** -7 if T > native.DENSE_TOKENS and x == torch.bfloat16 else 1e-5


@needs_kernels
@pytest.mark.parametrize("values", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,density", [(40, 64, 0.3), (33, 50, 0.2), (7, 1000, 0.01), (16, 96, 0.9),
                                         (5, 32, 0.0), (9, 4000, 0.02)])
def test_products_match_dense(values, m, n, density):
    """Bitmaps (blocks of rows, tails) and CSR rows (16 entries a step and a tail, their activations gathered)
    against float64, 1 to 11 tokens, float32 and bf16 activations."""
    d = sparse(m, n, density)
    rows = native.pack_rows(d, values)
    assert rows.fmt == ("csr" if density in (0.01, 0.0, 0.02) else "bitmap")
    assert torch.equal(rows.to_dense(), torch.from_numpy(d))
    dd = torch.from_numpy(d).double()
    for T in (1, 2, 3, 4, 5, 6, 7, 8, 11):
        for xdt in (torch.float32, torch.bfloat16):  # bf16 activations with bf16 values: the vdpbf16ps path
            x = torch.randn(T, n).to(xdt)
            tol = rtol(T, xdt) if rows.fmt == "bitmap" else 1e-5
            check(rows.matmul(x), x.double() @ dd.T, tol)
            if rows.fmt == "bitmap":
                h = torch.randn(T, m).to(xdt)
                check(rows.rmatmul(h), h.double() @ dd, tol)
                if T == 1:
                    assert torch.equal(rows.dense().float(), torch.from_numpy(d))


@needs_kernels
@pytest.mark.parametrize("m,n", [(64, 256), (33, 70), (5, 31)])
def test_dense_bf16_products_match_torch(m, n):
    """The barycenter's one-pass product (every token count up to DENSE_TOKENS, a column tail) against float64."""
    w = torch.randn(m, n).to(torch.bfloat16)
    for T in range(1, native.DENSE_TOKENS + 2):
        x = torch.randn(T, n).to(torch.bfloat16)
        got = native.dense_bf16_linear(x, w)
        assert got.dtype == torch.bfloat16 and got.shape == (T, m)
        check(got, x.double() @ w.double().T, 2 ** -7)  # one rounding of a float32 sum to bf16


@needs_kernels
def test_dpbf16_and_float32_kernels_agree(monkeypatch):
    """bf16 values and activations (vdpbf16ps; x @ D.T by blocks of rows for few tokens, x @ D by pairs of rows, runs
    of rows split between threads, an odd row count pairing the last row with zeros) against the float32 kernels
    (RESMOE_DPBF16=0): the same exact products, summed in another order."""
    d = sparse(64, 256, 0.2)
    rows = native.pack_rows(d, torch.bfloat16)
    x = torch.randn(3, 256).to(torch.bfloat16)
    fast = rows.matmul(x)
    dr = sparse(203, 96, 0.15, seed=3)
    r_rows = native.pack_rows(dr, torch.bfloat16)
    assert r_rows.fmt == "bitmap"
    hs = [torch.randn(T, 203).to(torch.bfloat16) for T in (1, 2, 5, 8)]
    xs = [torch.randn(T, 96).to(torch.bfloat16) for T in (1, 2, 3, 4, 5)]  # x @ D.T: 4, 2 and 1 rows a block
    threads = torch.get_num_threads()
    try:
        fast_r, fast_m = [], []
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            fast_r.append([r_rows.rmatmul(h) for h in hs])
            fast_m.append([r_rows.matmul(xx) for xx in xs])
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("RESMOE_DPBF16", "0")
    check(rows.matmul(x), fast.double())
    for h, *got in zip(hs, *fast_r):
        want = r_rows.rmatmul(h)
        for g in got:
            check(g, want.double())
        check(want, h.double() @ torch.from_numpy(dr).double())
    for xx, *got in zip(xs, *fast_m):  # 203 rows: blocks of 4 and 2 rows leave a tail of single rows
        want = r_rows.matmul(xx)
        for g in got:
            check(g, want.double())
        check(want, xx.double() @ torch.from_numpy(dr).double().T)


@needs_kernels
def test_bitmap_record_read_in_place():
    d = sparse(24, 64, 0.25)
    enc = CODECS["bitmap"].encode(d, "bf16")
    mask, values = enc.parts["mask"], enc.parts["values"]
    mask.flags.writeable = values.flags.writeable = False  # as a mapped file gives them
    rows = native.bitmap_record_rows(mask, values, "bf16", enc.shape)
    assert rows is not None and rows.values.data_ptr() == values.ctypes.data  # no copy
    assert torch.equal(rows.to_dense(), torch.from_numpy(d))
    h = torch.randn(2, 24)
    check(rows.rmatmul(h), h.double() @ torch.from_numpy(d).double())
    # what the kernels cannot read in place: rows that are not whole 32-bit words, fp16 values
    assert native.bitmap_record_rows(mask[:-1], values, "bf16", (24, 60)) is None
    assert native.bitmap_record_rows(mask, values, "fp16", enc.shape) is None


@needs_kernels
def test_hostile_bitmap_record_is_refused():
    """More set bits than values would send the kernels past the values: refused before any product."""
    d = sparse(8, 32, 0.5)
    enc = CODECS["bitmap"].encode(d, "bf16")
    with pytest.raises(ValueError, match="bits set but"):
        native.bitmap_record_rows(enc.parts["mask"], enc.parts["values"][:-1], "bf16", enc.shape)


@needs_kernels
def test_portable_build_matches_the_vector_kernels(fresh_native, monkeypatch):
    """The kernels built for a baseline x86-64 (no AVX-512: the portable loops a CPU without it runs) give the
    products of the build for this CPU."""
    shapes = [(40, 64, 0.3), (33, 50, 0.2), (7, 300, 0.01)]
    mats = {s: sparse(*s) for s in shapes}

    def products() -> list[torch.Tensor]:
        out = []
        for (m, n, _), d in mats.items():
            for values in (torch.float32, torch.bfloat16):
                rows = native.pack_rows(d, values)
                for T in (1, 3, 9):
                    x = torch.randn(T, n, generator=torch.Generator().manual_seed(T)).to(torch.bfloat16)
                    out.append(rows.matmul(x))
                    if rows.fmt == "bitmap":
                        out.append(rows.rmatmul(torch.randn(T, m, generator=torch.Generator().manual_seed(T))))
        return out

    monkeypatch.setattr(native, "_loaded", [])
    want = products()
    native._state.clear()
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setenv("RESMOE_NATIVE_MARCH", "x86-64")
    assert native.available() and not native.uses_avx512() and not native.uses_dpbf16()
    for got, w in zip(products(), want):
        check(got, w.double(), 2 ** -7)  # the vector path sums in another order (and bf16 products in pairs)


def test_without_a_compiler_the_torch_fallback_runs(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "/bin/false")
    assert not native.available()
    assert "failed" in native.unavailable_reason()
    op = SparseResidual.from_dense(sparse(16, 40, 0.3), torch.device("cpu"), torch.bfloat16)
    assert op.rows is None and op.csr is not None
    x = torch.randn(2, 40)
    check(op.apply_in(x), x.double() @ torch.from_numpy(sparse(16, 40, 0.3)).double().T)


def test_resmoe_native_0_disables_the_kernels(fresh_native, monkeypatch):
    monkeypatch.setenv("RESMOE_NATIVE", "0")
    assert native.library() is None and "RESMOE_NATIVE=0" in native.unavailable_reason()


def test_a_build_is_cached_and_reused(fresh_native):
    path = native.build()
    if path is None:
        pytest.skip(native.unavailable_reason())
    assert native.build() == path and path.stat().st_size > 0
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary left behind


@pytest.fixture(scope="module")
def bitmap_bf16(tmp_path_factory):
    """A synthetic upcycled Mixtral in bf16 (hidden 64: rows of whole 32-bit words), --delta-format bitmap."""
    from converters.convert import ConvertOptions, convert
    from converters.example import write_mixtral_checkpoint

    d = tmp_path_factory.mktemp("native")
    write_mixtral_checkpoint(d / "src", 2, 64, 96, 4, vocab=64, dtype=torch.bfloat16)
    convert(d / "src", d / "m.rmoe", ConvertOptions(keep=0.4, delta_format="bitmap"), progress=False)
    return d / "m.rmoe"


def _logits(model) -> torch.Tensor:
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits.float()


@needs_kernels
def test_fused_reads_bitmap_records_in_place_and_matches_the_fallback(bitmap_bf16, monkeypatch):
    from resmoe_format.torch import load_model
    from test_runtime import check_fused_weights

    fused = load_model(bitmap_bf16, mode="fused", dtype="bf16")
    layers = [m for m in fused.modules() if isinstance(m, FusedExperts)]
    ops = [op for lay in layers for ops in lay.in_ops for _, _, op in ops]
    outs = [op for lay in layers for op in lay.out_ops]
    assert all(isinstance(op, SparseResidual) and op.rows is not None for op in ops + outs)
    assert all(op.output_rows for op in outs) and all(op.rows.values.dtype == torch.bfloat16 for op in ops)
    f32 = load_model(bitmap_bf16, mode="fused", dtype="fp32")
    check_fused_weights(f32, bitmap_bf16)
    want = _logits(load_model(bitmap_bf16, mode="materialize", dtype="fp32"))
    got = _logits(f32)
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()  # B + D against round_bf16(B + D) (spec 6.7)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("RESMOE_NATIVE", "0")
    torch_csr = load_model(bitmap_bf16, mode="fused", dtype="fp32")
    assert all(op.rows is None for lay in torch_csr.modules() if isinstance(lay, FusedExperts)
               for op in lay.out_ops)
    assert (_logits(torch_csr) - got).abs().max() <= 1e-4 * got.abs().max()  # same weights, other kernels
    bf16 = _logits(fused)
    assert (bf16 - got).abs().max() <= 5e-2 * got.abs().max()
