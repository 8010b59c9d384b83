"""The compiled k-quant kernels of fused mode (kquant_kernels.c, native.kq_matmul / kq_rmatmul) against the weights
the file restores (spec 5.10), in the vector build and the portable one, and in a model converted with --bits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from resmoe_format.codecs import kquant
from resmoe_format.codecs.kquant import KQ_DTYPES, KqLayout
from resmoe_format.torch import native
from resmoe_format.torch.experts import FusedExperts
from resmoe_format.torch.kquant import PackedValues
from test_native_kernels import fresh_native, needs_kernels  # noqa: F401  (a fixture)
from test_runtime_kquant import random_parts

LAYOUTS = (KqLayout(64, 4, 6), KqLayout(64, 3, 4))


def spy(monkeypatch) -> dict[str, int]:
    """Counts of the kernels' calls from here on."""
    calls = {"kq_matmul": 0, "kq_rmatmul": 0}
    for name in calls:
        fn = getattr(native, name)

        def counted(*a, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(*a)
        monkeypatch.setattr(native, name, counted)
    return calls


def packed(vd: str, shape: tuple[int, int], layout: KqLayout, seed: int, round_to=None) -> PackedValues:
    rng = np.random.default_rng(seed)
    parts = random_parts(rng, shape[0] * shape[1], vd, layout)
    return PackedValues.from_parts(parts, "values", shape, vd, layout, round_to=round_to)


def close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rhs: bool) -> None:
    """``got`` is x @ w.T (or x @ w with ``rhs``) to float32 sums: within 1e-5 of the sum of |products|."""
    x, w = x.double(), w.double()
    want, scale = (x @ w, x.abs() @ w.abs()) if rhs else (x @ w.T, x.abs() @ w.abs().T)
    assert ((got.double() - want).abs() <= 1e-5 * scale + 1e-30).all()


def products(pv: PackedValues, tokens=(1, 3, 8)) -> list[torch.Tensor]:
    m, n = pv.shape
    out = []
    for T in tokens:
        g = torch.Generator().manual_seed(T)
        out += [pv.linear(torch.randn(T, n, generator=g)), pv.rlinear(torch.randn(T, m, generator=g))]
    return out + [pv.tensor()]


@needs_kernels
@pytest.mark.parametrize("vd", KQ_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=("s4c6", "s3c4"))
def test_products_are_the_restored_weights(monkeypatch, vd, layout):
    """Every code width (ternary included), super-blocks of 3 and 4 groups, 4- and 6-bit scale codes, random grids
    (signed and subnormal super-block scales), rows of 2 and 3 groups, bf16 and float32 activations."""
    calls = spy(monkeypatch)
    for shape in ((37, 128), (5, 192)):
        pv = packed(vd, shape, layout, seed=shape[0])
        w = pv.tensor()
        for T in (1, 3, 8):
            for dt in (torch.float32, torch.bfloat16):
                g = torch.Generator().manual_seed(T)
                x, h = torch.randn(T, shape[1], generator=g).to(dt), torch.randn(T, shape[0], generator=g).to(dt)
                y, z = pv.linear(x.float()), pv.rlinear(h.float())
                close(y, x, w, rhs=False)
                close(z, h, w, rhs=True)
                assert pv.linear(x).dtype == dt
    assert calls["kq_matmul"] > 0 and calls["kq_rmatmul"] > 0


def within(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, tol: float) -> None:
    """``got`` is ``want`` to ``tol`` of ``scale`` (element-wise, float64)."""
    err = ((got.double() - want).abs() / (scale + 1e-300)).max().item()
    assert err <= tol, err


def grid(pv: PackedValues) -> tuple[torch.Tensor, torch.Tensor]:
    """Every weight's group scale a and offset b (spec 5.10), float64, in the matrix's shape."""
    sup = pv.layout.super
    g = torch.arange(pv.pairs.shape[0])
    supers = pv.supers.float().double()[g // sup]
    a, b = supers[:, 0] * pv.pairs[:, 0].double(), supers[:, 1] * pv.pairs[:, 1].double()
    return tuple(v.repeat_interleave(pv.layout.group)[:pv.n].reshape(pv.shape) for v in (a, b))


@needs_kernels
@pytest.mark.parametrize("vd", KQ_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=("s4c6", "s3c4"))
def test_bf16_activations_multiply_by_the_exact_weights(monkeypatch, vd, layout):
    """bf16 activations with AVX512-BF16 (spec 6.7): vdpbf16ps multiplies them by the codes and each group's scale a
    and offset b follow in float32, so no weight is rounded to bf16. x @ W.T is float32 sums of the exact weights;
    h @ W is sum_r bf16(h[r] a) q - h[r] b, each h[r] a rounded to bf16 once (emulated here in float64). Rows of 3
    and 18 groups (a row's scales are read 16 groups at a time), super-blocks of 3 and 4 groups starting mid-row, odd
    row counts (h @ W pairs rows), 1 to 5 tokens; RESMOE_DPBF16=0 (and 8-bit codes) multiply in float32."""
    fast = native.uses_kq_dpbf16() and vd != "q8"
    for m, n in ((21, 192), (6, 192), (7, 64 * 18)):
        pv = packed(vd, (m, n), layout, seed=m)
        w = pv.tensor().double()
        a, b = grid(pv)
        q = torch.where(a != 0, ((w + b) / torch.where(a != 0, a, 1)).round(), 0)  # signed scales too
        for T in (1, 2, 5):
            g = torch.Generator().manual_seed(T)
            x, h = (torch.randn(T, k, generator=g).to(torch.bfloat16) for k in (n, m))
            xd, hd = x.double(), h.double()
            args = pv._kernel_args(T)
            with monkeypatch.context() as mp:
                for off in (False, True):
                    if off:
                        mp.setenv("RESMOE_DPBF16", "0")
                    within(native.kq_matmul(*args, x), xd @ w.T, xd.abs() @ w.abs().T, 1e-6)
                    got = native.kq_rmatmul(*args, h)
                    if fast and not off:
                        ha = (hd[:, :, None] * a[None]).to(torch.bfloat16).double()  # (T, m, n): h[r] a per weight
                        want = (ha * q[None]).sum(1) - hd @ b
                        within(got, want, (ha.abs() * q[None]).sum(1) + hd.abs() @ b.abs(), 1e-5)
                    else:
                        within(got, hd @ w, hd.abs() @ w.abs(), 1e-5)


@needs_kernels
def test_bf16_activations_are_not_rounded_weights():
    """x @ W.T with bf16 activations is far closer to the exact weights' product than the bf16-rounded weights' is (a
    check that the exact path, not a table of rounded weights, ran)."""
    if not native.uses_kq_dpbf16():
        pytest.skip("no AVX512-BF16")
    pv = packed("q3", (64, 1024), LAYOUTS[0], seed=5)
    w = pv.tensor().double()
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    got = native.kq_matmul(*pv._kernel_args(1), x).double()
    exact, rounded = x.double() @ w.T, x.double() @ w.to(torch.bfloat16).double().T
    assert (got - exact).abs().max() * 16 < (rounded - exact).abs().max()


@needs_kernels
@pytest.mark.parametrize("vd", KQ_DTYPES)
def test_dequantize_is_numpy_bit_for_bit(vd):
    """The kernels' whole-matrix decode (many tokens' products, :meth:`PackedValues.tensor`) is the numpy reference's,
    bit for bit, signed zeros and subnormal super-block scales included."""
    rng = np.random.default_rng(7)
    for layout in LAYOUTS:
        for n in (64, 64 * 13, 64 * 40):
            parts = random_parts(rng, n, vd, layout)
            want = kquant.values_of(parts, n, vd, layout)
            got = PackedValues.from_parts(parts, "values", (n,), vd, layout).tensor().numpy()
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (vd, layout, n)


@needs_kernels
@pytest.mark.parametrize("vd", ("q3", "ternary", "q8"))
def test_rounding_to_bf16_is_the_round_to_of_the_weights(vd):
    """A base held rounded to the source dtype (spec 6.7, ``round_to``): the kernels round each decoded weight to
    bf16 (RNE) exactly as torch's cast does."""
    pv = packed(vd, (9, 256), LAYOUTS[0], seed=1, round_to=torch.bfloat16)
    w = pv.tensor()
    assert torch.equal(w, w.to(torch.bfloat16).float())
    eye = torch.eye(256)
    for T in (1, 8):  # identity rows read single weights back
        for i in range(0, 256, 64):
            assert torch.equal(pv.linear(eye[i:i + T]), w[:, i:i + T].T)
    assert torch.equal(pv.rlinear(torch.eye(9)[:8]), w[:8])
    bf = torch.bfloat16  # bf16 activations: the bf16 kernels multiply by a table of the rounded weights
    for i in range(0, 256, 64):
        assert torch.equal(pv.linear(eye[i:i + 1].to(bf)), w[:, i:i + 1].T.to(bf))
    assert torch.equal(pv.rlinear(torch.eye(9)[:8].to(bf)), w[:8].to(bf))


@needs_kernels
def test_the_kernels_apply_only_where_they_can(monkeypatch):
    """Many tokens, partial groups in a row, another group size or a float16 rounding go through torch's dequantized
    product instead, with the same results."""
    calls = spy(monkeypatch)
    pv = packed("q4", (6, 128), LAYOUTS[0], seed=2)
    x = torch.randn(native.DENSE_TOKENS + 1, 128)
    close(pv.linear(x), x, pv.tensor(), rhs=False)
    for other in (packed("q4", (6, 96), LAYOUTS[0], 3), packed("q4", (6, 128), KqLayout(32, 4, 6), 4),
                  packed("q4", (6, 128), LAYOUTS[0], 5, round_to=torch.float16)):
        x = torch.randn(2, other.shape[1])
        close(other.linear(x), x, other.tensor(), rhs=False)
    assert calls == {"kq_matmul": 0, "kq_rmatmul": 0}


@needs_kernels
def test_portable_build_matches_the_vector_kernels(fresh_native, monkeypatch):  # noqa: F811
    """The x86-64 build (no AVX-512: the portable loops) gives the products of this CPU's build."""
    mats = [packed(vd, (11, 128), LAYOUTS[0], seed=i) for i, vd in enumerate(KQ_DTYPES)]
    mats.append(packed("q3", (11, 128), LAYOUTS[0], seed=9, round_to=torch.bfloat16))
    monkeypatch.setattr(native, "_loaded", [])
    want = [p for pv in mats for p in products(pv)]
    native._state.clear()
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setenv("RESMOE_NATIVE_MARCH", "x86-64")
    assert native.available() and not native.uses_kq_avx512()
    for got, w in zip([p for pv in mats for p in products(pv)], want):
        assert (got - w).abs().max() <= 1e-5 * w.abs().max()


@pytest.fixture(scope="module")
def bits_file(tmp_path_factory):
    """A synthetic upcycled Mixtral in bf16 (hidden 64: rows of whole groups) converted with --bits 3."""
    from converters.convert import ConvertOptions, convert
    from converters.example import write_mixtral_checkpoint

    d = tmp_path_factory.mktemp("kq_native")
    write_mixtral_checkpoint(d / "src", 2, 64, 96, 4, vocab=64, dtype=torch.bfloat16)
    convert(d / "src", d / "m.rmoe", ConvertOptions(bits=3), progress=False)
    return d / "m.rmoe"


def _decode_logits(model, steps: int = 4) -> torch.Tensor:
    """Logits of a short prompt and a few decode steps (few tokens per forward: the kernels' case)."""
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        got = [out.logits[0, -1].float()]
        for _ in range(steps):
            out = model(got[-1].argmax().view(1, 1), cache=out.cache, use_cache=True)
            got.append(out.logits[0, -1].float())
    return torch.stack(got)


@needs_kernels
@pytest.mark.parametrize("dtype", ("fp32", "bf16"))
def test_fused_bits_file_runs_on_the_kernels(bits_file, monkeypatch, dtype):
    """A --bits 3 file in fused mode: every barycenter and residual product of a decode step runs in the kernels,
    and the logits are those of torch's dequantized products (RESMOE_NATIVE=0) to float32 sums (fp32) or to the
    bf16 rounding of the weights that torch's bf16 product adds (bf16)."""
    from resmoe_format.torch import load_model

    calls = spy(monkeypatch)
    fused = load_model(bits_file, mode="fused", dtype=dtype)
    got = _decode_logits(fused)
    assert calls["kq_matmul"] > 0 and calls["kq_rmatmul"] > 0
    layers = [m for m in fused.modules() if isinstance(m, FusedExperts)]
    assert layers and all(isinstance(lay.base_out, PackedValues) for lay in layers)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("RESMOE_NATIVE", "0")
    calls.update(kq_matmul=0, kq_rmatmul=0)
    want = _decode_logits(load_model(bits_file, mode="fused", dtype=dtype))
    assert calls == {"kq_matmul": 0, "kq_rmatmul": 0}
    tol = 1e-4 if dtype == "fp32" else 3e-2
    assert (got - want).abs().max() <= tol * want.abs().max()
