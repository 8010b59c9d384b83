"""resmoe-export --to onnx: the dense and lowrank graphs run in ONNX Runtime and give the torch
runtime's logits (materialize for dense, fused for lowrank) with dynamic batch and sequence.

Tolerance: float32 everywhere, but ONNX Runtime fuses and reorders sums: max |diff| over the
non-padded positions within 2e-3 of the largest logit (measured: about 3e-7). Padded query
positions attend to nothing, which each runtime fills differently, so they are not compared.
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

RTOL = 2e-3
ONNX_ARCHS = [a for a in ARCHS if a != "switch"]
SVD = dict(residual="svd", residual_keep=0.3)
_cache: dict[tuple, Path] = {}


pytestmark = pytest.mark.usefixtures("quiet_warnings")


def converted(tmp_path_factory, arch: str, overrides: dict | None = None, num_experts: int = 4, **opts) -> Path:
    """``arch`` converted with ``opts`` (a .rmoe file); built once per session."""
    key = (arch, tuple(sorted((overrides or {}).items())), num_experts, tuple(sorted(opts.items())))
    if key not in _cache:
        d = tmp_path_factory.mktemp(f"{arch}_src")
        if arch.startswith("deepseek"):  # released DeepSeek configs have as many key/value heads as heads
            overrides = {"num_key_value_heads": 2, **(overrides or {})}
        build_checkpoint(arch, d, "fp32", seed=3, num_experts=num_experts, overrides=overrides)
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


@pytest.mark.parametrize("arch", ONNX_ARCHS)
def test_dense_export_matches_the_runtime(tmp_path_factory, tmp_path, arch):
    rmoe = converted(tmp_path_factory, arch, residual_keep=0.25)
    out = export_onnx(rmoe, tmp_path / "model.onnx")
    assert out == tmp_path / "model.onnx"
    assert_only(tmp_path, "model.onnx")
    assert_matches(out, rmoe, "materialize")


# Mixtral with expert-scope factors: test_lowrank_graph_keeps_factors_and_is_smaller. Fast: biases, a U per
# matrix, no barycenter (--method svd); slow: the same code under other architectures and int8 factors.
_LOWRANK = [("gpt_oss", SVD), ("mixtral", dict(SVD, residual_scope="matrix")), ("mixtral", dict(method="svd"))]
_LOWRANK += [pytest.param(*case, marks=pytest.mark.slow) for case in
             [("gpt_oss", dict(SVD, residual_scope="matrix")), ("mixtral", dict(SVD, value_dtype="int8"))]
             + [(a, SVD) for a in ONNX_ARCHS if a not in ("gpt_oss", "mixtral")]]


@pytest.mark.parametrize("arch,opts", _LOWRANK, ids=lambda x: x if isinstance(x, str) else
                         ",".join(f"{k}={v}" for k, v in x.items()))
def test_lowrank_export_matches_the_fused_runtime(tmp_path_factory, tmp_path, arch, opts):
    rmoe = converted(tmp_path_factory, arch, **opts)
    out = export_onnx(rmoe, tmp_path / "model.onnx", "lowrank")
    assert_only(tmp_path, "model.onnx")
    assert_matches(out, rmoe, "fused")


def test_lowrank_graph_keeps_factors_and_is_smaller(tmp_path_factory, tmp_path):
    import onnx

    # experts large enough for rank-r factors plus one barycenter to undercut dense experts
    rmoe = converted(tmp_path_factory, "mixtral", overrides={"intermediate_size": 256}, num_experts=8, **SVD)
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
    matrix = load_model(converted(tmp_path_factory, "mixtral", **SVD, residual_scope="matrix"), mode="fused")
    low = LowRankExperts.from_fused(next(m for m in matrix.modules() if isinstance(m, FusedExperts)))
    assert low.u_out is not None and low.u_in.shape[1] == 2


def test_external_data_and_opset(tmp_path_factory, tmp_path):
    import onnx

    rmoe = converted(tmp_path_factory, "qwen3_moe", residual_keep=0.25)
    out = export_onnx(rmoe, tmp_path / "ext.onnx", external_data=True, opset=18)
    assert_only(tmp_path, "ext.onnx", "ext.onnx.data")
    model = onnx.load(out, load_external_data=False)
    places = {d.value for t in model.graph.initializer for d in t.external_data if d.key == "location"}
    assert places == {"ext.onnx.data"}
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {18}
    assert_matches(out, rmoe, "materialize")


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
