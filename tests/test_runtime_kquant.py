"""The torch runtime on records with k-quant values (spec 5.10): dequantization in torch bit for bit as
numpy's, and every mode of load_model on files whose bases and residuals (dense, sparse, low-rank) hold
k-quant values. Reference as in test_runtime: materialize equals the restored checkpoint loaded by
transformers; lazy and fused agree with it to RTOL, fused with residuals of k-quant values multiplying
by B + D before its rounding to the source dtype (spec 6.7, :func:`test_runtime.unrounded`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import resmoe_format
from converters.convert import ConvertOptions, convert
from converters.restore_checkpoint import restore_checkpoint
from hf_models import build_checkpoint, load_model as hf_load
from kquant_files import requantize
from resmoe_format.codecs import kquant
from resmoe_format.codecs.kquant import KqGrid, KqLayout
from resmoe_format.errors import RmoeFormatError
from resmoe_format.torch import FusedExperts, LazyExperts, load_model
from resmoe_format.torch import kquant as tkq
from resmoe_format.torch.residuals import DenseResidual, LowRankResidual, PackedSparseResidual
from test_runtime import assert_close, check_fused_weights, fused_want, logits

pytestmark = pytest.mark.usefixtures("quiet_warnings")

LAYOUTS = (KqLayout(), KqLayout(7, 3, 4), KqLayout(32, 8, 8), KqLayout(1, 1, 6))
SIZES = (1, 5, 63, 64, 65, 1000, 4097)
RESIDUAL_DTYPES = ("q2", "q3", "q5", "q6", "q8", "ternary")
SPARSE = (("bitmap", "q3"), ("rice", "ternary"), ("csr16", "q4"), ("bsr", "q2"))
#: name -> (converter options of the source file, requantize plan, drop_base)
PLANS = {
    "dense": (dict(residual_keep=0.25), lambda lay, e, m, enc: ("dense", "q4" if e is None else
                                                                RESIDUAL_DTYPES[(e + lay) % 6]), False),
    "kquant-base": (dict(residual_keep=0.25), lambda lay, e, m, enc: ("dense", "q5") if e is None else None, False),
    "sparse": (dict(residual_keep=0.25), lambda lay, e, m, enc: None if e is None else SPARSE[e % 4], False),
    "lowrank": (dict(residual="svd", residual_keep=0.3),
                lambda lay, e, m, enc: ("dense", "q8") if e is None else ("lowrank", "q4"), False),
    "no-base": (dict(residual_keep=0.25), lambda lay, e, m, enc: ("dense", "q4"), True),
}
#: the plans also run on an fp32 source (where fused must agree with materialize exactly)
FP32_PLANS = ("dense", "lowrank")
_sources: dict[tuple, Path] = {}
_files: dict[tuple[str, str], tuple[Path, Path]] = {}


def random_parts(rng, n: int, vd: str, layout: KqLayout) -> dict[str, np.ndarray]:
    """Stored parts of n values with codes over all levels and random grids (signed, subnormal scales)."""
    g = layout.n_groups(n)
    top = (1 << layout.scale_bits) - 1
    supers = rng.standard_normal((layout.n_super(n), 2)) * np.array([1e-2, 1e-6])[rng.integers(0, 2, 1)]
    grid = KqGrid(rng.integers(0, top + 1, g).astype(np.uint8), rng.integers(0, top + 1, g).astype(np.uint8),
                  supers.astype(np.float16))
    return kquant.parts_of(rng.integers(0, kquant.levels(vd), n).astype(np.uint8), grid, vd, layout)


@pytest.mark.parametrize("vd", kquant.KQ_DTYPES)
def test_torch_dequantize_is_numpy_bit_for_bit(vd):
    rng = np.random.default_rng(1)
    for layout in LAYOUTS:
        for n in SIZES:
            parts = random_parts(rng, n, vd, layout)
            want = kquant.values_of(parts, n, vd, layout)
            t = {k: torch.from_numpy(v) for k, v in parts.items()}
            got = tkq.dequantize(t["values"], t["group_scales"], t["scales"], n, vd, layout).numpy()
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (vd, layout, n)
            packed = tkq.PackedValues.from_parts(parts, "values", (n,), vd, layout)
            assert torch.equal(packed.tensor(), torch.from_numpy(want))
            assert packed.nbytes() == kquant.codes_nbytes(n, vd) + 2 * layout.n_groups(n) + 4 * layout.n_super(n)


def test_packed_values_refuse_what_the_numpy_decoder_refuses():
    rng = np.random.default_rng(2)
    layout = KqLayout(8, 2, 6)

    def refused(parts, n, vd, match):
        with pytest.raises(RmoeFormatError, match=match):
            kquant.values_of(parts, n, vd, layout)
        with pytest.raises(RmoeFormatError, match=match):
            tkq.PackedValues.from_parts(parts, "values", (n,), vd, layout)

    parts = random_parts(rng, 12, "ternary", layout)
    refused(parts | {"values": np.array([243, 0, 0], np.uint8)}, 12, "ternary", "above 242")
    refused(parts | {"values": np.array([0, 0, 9], np.uint8)}, 12, "ternary", "padding codes")
    parts = random_parts(rng, 13, "q3", layout)
    codes = parts["values"].copy()
    codes[-1] |= 0x80
    refused(parts | {"values": codes}, 13, "q3", "unused bits")
    refused(parts | {"values": codes[:-1]}, 13, "q3", "expected")
    refused(parts | {"scales": np.full((1, 2), np.inf, np.float16)}, 13, "q3", "finite")


def kquant_file(tmp_path_factory, plan: str, dtype: str) -> tuple[Path, Path]:
    """(file with the plan's k-quant records, its restored checkpoint in original order), built once."""
    opts, choose, drop_base = PLANS[plan]
    src_key = (dtype, tuple(sorted(opts.items())))
    if src_key not in _sources:
        d = tmp_path_factory.mktemp(f"kq_src_{dtype}")
        build_checkpoint("mixtral", d / "src", dtype, seed=3)
        convert(d / "src", d / "src.rmoe", ConvertOptions(**opts), progress=False)
        _sources[src_key] = d / "src.rmoe"
    if (plan, dtype) not in _files:
        d = tmp_path_factory.mktemp(f"kq_{plan}_{dtype}")
        out = requantize(_sources[src_key], d / "kq.rmoe", choose, drop_base=drop_base)
        _files[plan, dtype] = out, restore_checkpoint(out, d / "restored", original_order=True)
    return _files[plan, dtype]


@pytest.mark.parametrize("plan,dtype", [(p, "bf16") for p in PLANS] + [(p, "fp32") for p in FP32_PLANS])
def test_every_mode_reads_kquant_records(tmp_path_factory, monkeypatch, plan, dtype):
    rmoe, restored = kquant_file(tmp_path_factory, plan, dtype)
    with resmoe_format.open(rmoe) as r:
        assert r.version == (3, 0)
    want = logits(load_model(rmoe, mode="materialize", dtype="fp32"), "mixtral")
    assert torch.equal(want, logits(hf_load(restored), "mixtral"))
    lazy = load_model(rmoe, mode="lazy", dtype="fp32")
    assert any(isinstance(m, LazyExperts) for m in lazy.modules())
    fused = load_model(rmoe, mode="fused", dtype="fp32")
    check_fused_weights(fused, rmoe)
    assert_close(logits(fused, "mixtral"), fused_want(monkeypatch, rmoe, dtype, "mixtral", want))
    assert torch.equal(logits(lazy, "mixtral"), logits(fused, "mixtral"))


def _fused_layers(rmoe: Path) -> list[FusedExperts]:
    return [m for m in load_model(rmoe, mode="fused").modules() if isinstance(m, FusedExperts)]


def _ops(lay: FusedExperts) -> list:
    return [op for ops in lay.in_ops for _, _, op in ops] + [op for op in lay.out_ops if op is not None]


def test_fused_holds_kquant_records_packed(tmp_path_factory):
    """Dense k-quant barycenters and residuals are held as their stored codes and super-block scales and
    one byte per group scale or offset code, nothing more."""
    rmoe, _ = kquant_file(tmp_path_factory, "dense", "bf16")
    layers = _fused_layers(rmoe)
    with resmoe_format.open(rmoe) as r:
        for lay in layers:
            assert all(isinstance(op, DenseResidual) and isinstance(op.d, tkq.PackedValues) for op in _ops(lay))
            spec = r.layer(lay.layer)
            records = list(spec.base.items()) + [item for res in spec.residuals for item in res.items()]
            want = sum(r.tensor(ref.tensors["values"]).nbytes + r.tensor(ref.tensors["scales"]).nbytes
                       + 2 * ref.quant.n_groups(int(np.prod(spec.matrix(m).shape))) for m, ref in records)
            assert lay.nbytes() == want


def test_fused_packed_operators_follow_the_encoding(tmp_path_factory):
    sparse = _ops(_fused_layers(kquant_file(tmp_path_factory, "sparse", "bf16")[0])[0])
    assert {type(op) for op in sparse} >= {PackedSparseResidual}
    lay = _fused_layers(kquant_file(tmp_path_factory, "lowrank", "bf16")[0])[0]
    for e in range(lay.num_experts):
        low = [op for _, _, op in lay.in_ops[e]] + [lay.out_ops[e]]
        assert all(isinstance(op, LowRankResidual) and isinstance(op.v, tkq.PackedValues) for op in low)
        assert [op.u_shared for op in low] == [False, True, True]  # expert scope: gate's U serves up and down
        assert len({id(op.u) for op in low}) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("plan", ("dense", "sparse", "lowrank"))
def test_cuda(tmp_path_factory, plan):
    rmoe, _ = kquant_file(tmp_path_factory, plan, "fp32")
    vd, n, layout = "q3", 4097, KqLayout()
    parts = random_parts(np.random.default_rng(3), n, vd, layout)
    got = tkq.PackedValues.from_parts(parts, "values", (n,), vd, layout, "cuda").tensor().cpu().numpy()
    assert np.array_equal(got.view(np.uint32), kquant.values_of(parts, n, vd, layout).view(np.uint32))
    want = logits(load_model(rmoe, mode="materialize", dtype="fp32"), "mixtral")
    for mode in ("materialize", "lazy", "fused"):
        model = load_model(rmoe, mode=mode, device="cuda", dtype="fp32")
        with torch.no_grad():
            got = model(input_ids=torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0)).cuda())
        assert_close(got.logits.cpu(), want, rtol=1e-3)
