"""resmoe-export --to onnx: the dense and lowrank graphs run in ONNX Runtime and give the torch
runtime's logits (materialize for dense, fused for lowrank) with dynamic batch and sequence, on
fp32 and bf16 sources, for every method and residual scope.

The lowrank graph multiplies by the weights fused does (spec 6.7: B + U V, not rounded to the
source dtype), so it is compared with fused; the dense graph holds the restored weights. Both in
float32: ONNX Runtime fuses and reorders sums, and the logits over the non-padded positions agree
to RTOL of the largest logit. Padded query positions attend to nothing, which each runtime fills
differently, so they are not compared.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from converters.convert import ConvertOptions, convert
from converters.errors import ConversionError
from converters.exporters import onnx_export
from converters.exporters.onnx_export import LowRankExperts, export_onnx
from hf_models import ARCHS, build_checkpoint
from resmoe_format.torch import load_model

ort = pytest.importorskip("onnxruntime")

RTOL = 1e-5
ONNX_ARCHS = [a for a in ARCHS if a != "switch"]
SVD = dict(residual="svd", residual_keep=0.3)
DTYPES = ("fp32", "bf16")
_cache: dict[tuple, Path] = {}


pytestmark = pytest.mark.usefixtures("quiet_warnings")



def converted(tmp_path_factory, arch: str, dtype: str = "fp32", overrides: dict | None = None, num_experts: int = 4,
              num_layers: int = 1, **opts) -> Path:
    """``arch`` in ``dtype`` converted with ``opts`` (a .rmoe file); built once per session. One MoE layer
    (tracing costs about 2.5 s a layer): ``num_layers`` decoder layers, two for DeepSeek (the first is dense)
    and Switch (every other block is sparse)."""
    key = (arch, dtype, tuple(sorted((overrides or {}).items())), num_experts, num_layers, tuple(sorted(opts.items())))
    if key not in _cache:
        d = tmp_path_factory.mktemp(f"{arch}_{dtype}_src")
        if arch.startswith("deepseek"):  # released DeepSeek configs have as many key/value heads as heads
            overrides = {"num_key_value_heads": 2, **(overrides or {})}
        layers = max(num_layers, 2) if arch.startswith("deepseek") or arch == "switch" else num_layers
        build_checkpoint(arch, d, dtype, seed=3, num_layers=layers, num_experts=num_experts, overrides=overrides)
        out = d.parent / f"{d.name}.rmoe"
        convert(d, out, ConvertOptions(**opts), progress=False)
        _cache[key] = out
    return _cache[key]


def batch(b: int = 3, s: int = 11, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ids and an attention mask with the first row left-padded (sizes unlike the export example's)."""
    ids = torch.randint(3, 64, (b, s), generator=torch.Generator().manual_seed(seed)).numpy()
    mask = np.ones_like(ids)
    if b > 1:
        mask[0, :3] = 0
    return ids, mask


def onnx_logits(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    return sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def rel_diff(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    keep = mask.astype(bool)
    return float(np.abs(got - want)[keep].max() / np.abs(want[keep]).max())


def assert_matches(onnx_path: Path, rmoe: Path, mode: str) -> None:
    model = load_model(rmoe, mode=mode, dtype="fp32")
    for b, s in ((3, 11), (1, 5)):
        ids, mask = batch(b, s)
        err = rel_diff(onnx_logits(onnx_path, ids, mask), torch_logits(model, ids, mask), mask)
        assert err < RTOL, f"batch {b}, sequence {s}: max relative difference {err:.2e}"


def assert_only(directory: Path, *names: str) -> None:
    """``directory`` holds exactly ``names`` (no temporaries left behind)."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


#: every method and residual scope with int8 values; the svd ones also export as the lowrank graph
METHODS = {"resmoe": dict(residual_keep=0.25), "resmoe-matrix": dict(residual_keep=0.25, residual_scope="matrix"),
           "resmoe-int8": dict(value_dtype="int8", residual_keep=0.3), "prune": dict(method="prune"),
           "prune-matrix": dict(method="prune", residual_scope="matrix"), "merge": dict(method="merge"),
           "lossless": dict(lossless=True), "resmoe-svd": SVD,
           "resmoe-svd-matrix-int8": dict(SVD, residual_scope="matrix", value_dtype="int8"),
           "svd": dict(method="svd"), "svd-matrix": dict(method="svd", residual_scope="matrix")}
_DENSE_METHODS = list(METHODS)[:7] + ["svd"]


def _dense_cases():
    """The dense graph runs the restored weights whatever the method and source dtype: by default each
    architecture once, methods in turn, dtypes alternating (every architecture, method and dtype
    appears); slow, each architecture in its other dtype with the methods shifted by half, so that the
    two sets hold every architecture and every method in both dtypes."""
    n = len(_DENSE_METHODS)
    for i, arch in enumerate(ONNX_ARCHS):
        for shift, slow in ((0, False), (n // 2, True)):
            method = _DENSE_METHODS[(i + shift) % n]
            dtype = DTYPES[(i + slow) % 2]
            yield pytest.param(arch, method, dtype, marks=pytest.mark.slow if slow else (),
                               id=f"{arch}-{method}-{dtype}")


_DENSE = list(_dense_cases())


@pytest.mark.parametrize("arch,method,dtype", _DENSE)
def test_dense_export_matches_the_runtime(tmp_path_factory, tmp_path, arch, method, dtype):
    import onnx

    rmoe = converted(tmp_path_factory, arch, dtype, **METHODS[method])
    external = arch == "qwen3_moe"  # its cases store their weights externally, at opset 18
    out = export_onnx(rmoe, tmp_path / "model.onnx", external_data=external, opset=18 if external else None)
    assert out == tmp_path / "model.onnx"
    assert_only(tmp_path, "model.onnx", *(["model.onnx.data"] if external else []))
    if external:
        model = onnx.load(out, load_external_data=False)
        places = {d.value for t in model.graph.initializer for d in t.external_data if d.key == "location"}
        assert places == {"model.onnx.data"}
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {18}
    assert_matches(out, rmoe, "materialize")


#: every low-rank method and scope (resmoe's matrix scope with int8 factors), biases (gpt_oss), in bf16 (and
#: Mixtral's expert-scope factors in test_lowrank_graph_keeps_factors_and_is_smaller); slow: the same in fp32,
#: and the other architectures
_LOWRANK = [("gpt_oss", "resmoe-svd"), ("mixtral", "resmoe-svd-matrix-int8"), ("mixtral", "svd"),
            ("gpt_oss", "svd-matrix")]
_LOWRANK_CASES = [pytest.param(a, m, d, marks=pytest.mark.slow if d == "fp32" else (), id=f"{a}-{m}-{d}")
                  for d in DTYPES for a, m in _LOWRANK]
_LOWRANK_CASES += [pytest.param(a, "resmoe-svd", d, marks=pytest.mark.slow, id=f"{a}-resmoe-svd-{d}")
                   for d in DTYPES for a in ONNX_ARCHS if a not in ("gpt_oss", "mixtral")]


@pytest.mark.parametrize("arch,method,dtype", _LOWRANK_CASES)
def test_lowrank_export_matches_the_fused_runtime(tmp_path_factory, tmp_path, arch, method, dtype):
    rmoe = converted(tmp_path_factory, arch, dtype, **METHODS[method])
    out = export_onnx(rmoe, tmp_path / "model.onnx", "lowrank")
    assert_only(tmp_path, "model.onnx")
    assert_matches(out, rmoe, "fused")


@pytest.mark.slow
def test_lowrank_graph_keeps_factors_and_is_smaller(tmp_path_factory, tmp_path):
    import onnx

    # experts large enough for rank-r factors plus one barycenter to undercut dense experts; two MoE layers
    rmoe = converted(tmp_path_factory, "mixtral", overrides={"intermediate_size": 256}, num_experts=8, num_layers=2,
                     **SVD)
    dense = export_onnx(rmoe, tmp_path / "dense.onnx")
    low = export_onnx(rmoe, tmp_path / "low.onnx", "lowrank")
    # the graph's debug metadata (about 2 kB a node) weighs more than this model's weights: compare both
    assert low.stat().st_size < dense.stat().st_size
    weights = {p: [int(np.prod(t.dims)) for t in onnx.load(p).graph.initializer] for p in (dense, low)}
    assert sum(weights[low]) < 0.5 * sum(weights[dense])
    assert max(weights[low]) < 8 * 256 * 16  # no stacked dense experts (one matrix per expert is that much)
    assert_matches(low, rmoe, "fused")
    assert_matches(dense, rmoe, "materialize")


def test_expert_scope_factors_share_one_u(tmp_path_factory):
    model = load_model(converted(tmp_path_factory, "mixtral", **SVD), mode="fused")
    from resmoe_format.torch import FusedExperts

    fused = next(m for m in model.modules() if isinstance(m, FusedExperts))
    low = LowRankExperts.from_fused(fused)
    assert low.u_out is None and low.u_in.shape[1] == 1
    matrix = load_model(converted(tmp_path_factory, "mixtral", **METHODS["resmoe-svd-matrix-int8"]), mode="fused")
    low = LowRankExperts.from_fused(next(m for m in matrix.modules() if isinstance(m, FusedExperts)))
    assert low.u_out is not None and low.u_in.shape[1] == 2


def test_kquant_records_export(tmp_path_factory, tmp_path):
    """k-quant barycenters and low-rank factors (spec 5.10; an expert's U shared) of a bf16 source: the dense
    graph runs the restored weights, the lowrank graph fused's (B + U V of the dequantized values)."""
    from kquant_files import requantize

    rmoe = requantize(converted(tmp_path_factory, "mixtral", "bf16", **SVD), tmp_path / "kq.rmoe",
                      lambda lay, e, m, enc: ("dense", "q5") if e is None else ("lowrank", "q3"))
    assert_matches(export_onnx(rmoe, tmp_path / "dense.onnx"), rmoe, "materialize")
    assert_matches(export_onnx(rmoe, tmp_path / "low.onnx", "lowrank"), rmoe, "fused")


# --- bad input: a clear ConversionError and nothing at the output path ------------------------

def test_unknown_variant(tmp_path_factory, tmp_path):
    with pytest.raises(ConversionError, match="variant 'sparse': choose one of dense, lowrank"):
        export_onnx(converted(tmp_path_factory, "mixtral", residual_keep=0.25), tmp_path / "m.onnx", "sparse")
    assert_only(tmp_path)


def test_lowrank_needs_lowrank_residuals(tmp_path_factory, tmp_path):
    rmoe = converted(tmp_path_factory, "mixtral", residual_keep=0.25)
    want = r"low-rank residuals, but layer 0 expert 0 stores gate as '\w+': convert with resmoe-convert --residual svd$"
    with pytest.raises(ConversionError, match=want):
        export_onnx(rmoe, tmp_path / "m.onnx", "lowrank")
    assert_only(tmp_path)


def test_unsupported_architecture(tmp_path_factory, tmp_path):
    rmoe = converted(tmp_path_factory, "switch", residual_keep=0.25)
    with pytest.raises(ConversionError, match="supports model types .*mixtral.*not 'switch_transformers' "
                                              r"\(an encoder-decoder model\)"):
        export_onnx(rmoe, tmp_path / "m.onnx")
    assert_only(tmp_path)


def test_deepseek_with_fewer_key_value_heads(tmp_path_factory, tmp_path):
    rmoe = converted(tmp_path_factory, "deepseek_v3", overrides={"num_key_value_heads": 1}, residual_keep=0.25)
    with pytest.raises(ConversionError, match=r"num_key_value_heads \(1\) differs"):
        export_onnx(rmoe, tmp_path / "m.onnx")
    assert_only(tmp_path)


def test_missing_output_directory(tmp_path_factory, tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        export_onnx(converted(tmp_path_factory, "mixtral", residual_keep=0.25), tmp_path / "no" / "m.onnx")


def test_a_failed_export_or_save_leaves_nothing(tmp_path_factory, tmp_path, monkeypatch):
    rmoe = converted(tmp_path_factory, "mixtral", residual_keep=0.25)

    def broken(*a, **k):
        raise RuntimeError("no translation for op X\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ConversionError, match="torch.onnx.export failed for mixtral: RuntimeError: no translation "
                                              "for op X$"):
        export_onnx(rmoe, tmp_path / "m.onnx")
    assert_only(tmp_path)

    class HalfWritten:
        def save(self, path, external_data=None):
            Path(path).write_bytes(b"partial")
            Path(f"{path}.data").write_bytes(b"partial")
            raise OSError("disk full")

    monkeypatch.setattr(onnx_export, "_export", lambda *a: HalfWritten())
    with pytest.raises(OSError, match="disk full"):
        export_onnx(rmoe, tmp_path / "m.onnx")
    assert_only(tmp_path)


def test_cli(tmp_path_factory, tmp_path, capsys):
    from converters.cli.export import main

    rmoe = converted(tmp_path_factory, "mixtral", residual_keep=0.25)
    assert main([str(rmoe), "--to", "onnx", str(tmp_path / "m.onnx"), "--variant", "lowrank"]) == 2
    assert "resmoe-convert --residual svd" in capsys.readouterr().err
    assert_only(tmp_path)
