"""compressed-tensors export, checked by real clients: the compressed-tensors package decompresses every expert
back to within the scheme's quantization error of the restored weight, and transformers' from_pretrained loads
the directory with logits close to the restored model's.

Tolerances (max |logit difference| / max |logit|, 24 random ids, tiny random-weight models, groups of 8):
- against a dense model holding the compressed-tensors-decompressed experts: 1e-5 (the load path is exact);
- against the restored model: w8a16 5e-3 (measured 4.8e-4 to 1.04e-3), w4a16 8e-2 (measured 1.5e-2 to 5.7e-2).
Per element: |decompressed - restored| <= scale / 2 of its group (plus 2^-7 of the weight on a bf16 source: the
bf16 rounding of the scale and of the dequantized product).
vLLM is not run here (no GPU): unverified in vLLM.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.convert import ConvertOptions, convert
from converters.errors import ConversionError
from converters.exporters.ct_export import export_compressed_tensors
from converters.paths import PathError
from converters.restore_checkpoint import restore_checkpoint
from hf_models import build_checkpoint
from hf_models import load_model as hf_load

pytestmark = pytest.mark.usefixtures("quiet_warnings")
LOGIT_RTOL = {"w8a16": 5e-3, "w4a16": 8e-2}
GROUP = 8


def _files(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _decompressed(ct_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], object]:
    """(every weight as compressed-tensors decompresses it, the expert scales, the scheme)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.loads((ct_dir / "config.json").read_text())["quantization_config"])
    assert qc.quant_method == "compressed-tensors" and qc.format == "pack-quantized"
    scheme = qc.config_groups["group_0"]
    comp = BaseCompressor.get_value_from_registry(qc.format)
    t = _files(ct_dir)
    out, scales = {}, {}
    for k in [k for k in t if k.endswith(".weight_packed")]:
        m = k[:-len(".weight_packed")]
        sd = {n: t.pop(f"{m}.{n}") for n in ("weight_packed", "weight_scale", "weight_shape")}
        out[f"{m}.weight"] = comp.decompress(sd, scheme)["weight"]
        scales[f"{m}.weight"] = sd["weight_scale"]
    out.update(t)
    return out, scales, scheme


def _logits(model, ids) -> np.ndarray:
    """float32 logits. transformers leaves decompressed experts in the scale dtype (bf16 for a bf16 source) under
    dtype=float32 and refuses .float() on a quantized model: the parameters are widened in place (exactly)."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.float()
        return model(ids).logits[0].double().numpy()


def _check(rmoe: Path, tmp: Path, scheme: str, dtype: str, shard_bytes: int = 6_000) -> dict[str, float]:
    from safetensors.torch import save_file

    restored = restore_checkpoint(rmoe, tmp / "restored", original_order=True)
    ct = export_compressed_tensors(rmoe, tmp / scheme, scheme, GROUP, shard_bytes=shard_bytes)
    assert (ct / "model.safetensors.index.json").exists() and len(list(ct.glob("model-*.safetensors"))) > 1
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]
    want = _files(restored)
    got, scales, sch = _decompressed(ct)
    assert set(got) == set(want)
    # bf16: the scale and the dequantized product are each rounded to bf16 (2^-9 relative each, and a scale
    # rounded down can push a group's largest value past the last code by 7.5 * 2^-9 of its scale)
    half_ulp = 2.0 ** -7 if dtype == "bf16" else 0.0
    n_experts = 0
    for name, w in want.items():
        if name not in scales:
            assert torch.equal(got[name], w), f"{name} is not as the source had it"
            continue
        n_experts += 1
        bound = scales[name].float().repeat_interleave(GROUP, dim=1) / 2 * (1 + 1e-3) + half_ulp * w.float().abs()
        err = (got[name].float() - w.float()).abs()
        assert (err <= bound + 1e-7).all(), f"{name}: error {(err - bound).max():.3g} above scale/2"
    assert n_experts > 0 and sch.weights.num_bits == int(scheme[1])
    # transformers loads the directory (compressed-tensors decompresses in its load path)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32).eval()
    dense = tmp / "dense"
    shutil.copytree(restored, dense)
    save_file({k: v.contiguous() for k, v in got.items()}, dense / "model.safetensors", metadata={"format": "pt"})
    ids = torch.tensor([np.random.default_rng(0).integers(3, 64, 24).tolist()])
    ref, deq, out = _logits(hf_load(restored), ids), _logits(hf_load(dense), ids), _logits(model, ids)
    scale = np.abs(ref).max()
    errs = {"load": np.abs(out - deq).max() / scale, "restored": np.abs(out - ref).max() / scale}
    assert errs["load"] < 1e-5, errs
    assert errs["restored"] < LOGIT_RTOL[scheme], errs
    return errs


@pytest.mark.parametrize("arch,dtype,scheme", [
    ("mixtral", "fp32", "w4a16"), ("phimoe", "bf16", "w4a16"),
    pytest.param("mixtral", "bf16", "w8a16", marks=pytest.mark.slow),
    pytest.param("olmoe", "fp32", "w8a16", marks=pytest.mark.slow)])
def test_export_decompresses_and_loads_in_transformers(tmp_path, arch, dtype, scheme):
    """Phi-MoE: transformers renames its router (block_sparse_moe.gate -> mlp.router); both names stay unquantized."""
    d = build_checkpoint(arch, tmp_path / "src", dtype, seed=3)
    convert(d, tmp_path / "m.rmoe", ConvertOptions(residual_keep=0.25), progress=False)
    _check(tmp_path / "m.rmoe", tmp_path, scheme, dtype)


def test_kquant_file_exports(tmp_path):
    """A .rmoe 3.0 file (k-quant barycenters and residuals) exports as resmoe-restore restores it."""
    from kquant_files import mixed_plan, requantize

    d = build_checkpoint("mixtral", tmp_path / "src", "fp32", seed=4)
    convert(d, tmp_path / "m.rmoe", ConvertOptions(residual_keep=0.25), progress=False)
    _check(requantize(tmp_path / "m.rmoe", tmp_path / "kq.rmoe", mixed_plan), tmp_path, "w8a16", "fp32")


def test_bad_input_is_refused_before_any_output(tmp_path, capsys):
    from converters.cli.export import main

    d = build_checkpoint("mixtral", tmp_path / "src", "fp32", seed=1)
    rmoe = tmp_path / "m.rmoe"
    convert(d, rmoe, ConvertOptions(), progress=False)
    with pytest.raises(ConversionError, match=r"--scheme 'w3a16' is not supported; supported: w4a16, w8a16"):
        export_compressed_tensors(rmoe, tmp_path / "o", "w3a16")
    with pytest.raises(ConversionError, match=r"--group-size 128 does not divide the input width of"):
        export_compressed_tensors(rmoe, tmp_path / "o", "w4a16")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(PathError, match="is not empty; give a new or empty directory"):
        export_compressed_tensors(rmoe, tmp_path / "full", "w4a16", GROUP)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    for arch, why in (("gpt_oss", "experts stacked in 3-D tensors"), ("switch", "encoder-decoder")):
        src = build_checkpoint(arch, tmp_path / arch, "fp32")
        convert(src, tmp_path / f"{arch}.rmoe", ConvertOptions(), progress=False)
        with pytest.raises(ConversionError, match=why):
            export_compressed_tensors(tmp_path / f"{arch}.rmoe", tmp_path / "o", "w4a16", GROUP)
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # the command line
    out = tmp_path / "cli"
    assert main([str(rmoe), "--to", "compressed-tensors", str(out), "--scheme", "w4a16", "--group-size", "8"]) == 0
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    capsys.readouterr()
    assert main([str(rmoe), "--to", "compressed-tensors", str(tmp_path / "x")]) == 2
    assert "needs --scheme w4a16 or w8a16" in capsys.readouterr().err
    assert main([str(rmoe), "--to", "compressed-tensors", str(out), "--scheme", "w4a16", "--group-size", "8"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main([str(rmoe), "--to", "gguf", str(tmp_path / "x.gguf"), "--scheme", "w4a16"]) == 2
    assert "--scheme applies to --to compressed-tensors" in capsys.readouterr().err
    assert main([str(rmoe), "--to", "compressed-tensors", str(tmp_path / "y"), "--scheme", "int4"]) == 2
    assert "--scheme 'int4' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
