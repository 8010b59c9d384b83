"""resmoe-convert end to end on real-format checkpoints written by transformers."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import resmoe_format
from converters.cli.convert import main as convert_main
from converters.cli.restore import main as restore_main
from converters.convert import ConvertOptions, convert
from converters.errors import ConversionError
from converters.restore_checkpoint import restore_checkpoint
from resmoe_format import accounting
from hf_models import ARCHS, build_checkpoint, load_model


def tensors_of(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    return build_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral") / "ckpt", "bf16")


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_round_trip_bit_exact(arch, dtype, tmp_path):
    src = build_checkpoint(arch, tmp_path / "src", dtype)
    out = tmp_path / "m.rmoe"
    convert(src, out, ConvertOptions(lossless=True), progress=False)
    with resmoe_format.open(out) as r:
        r.verify()
        assert r.schema.layers, "no MoE layer was compressed"
        assert r.model["architecture"] == json.loads((src / "config.json").read_text())["architectures"][0]
    restore_checkpoint(out, tmp_path / "restored", original_order=True)
    assert_bit_equal(tensors_of(src), tensors_of(tmp_path / "restored"))
    assert json.loads((tmp_path / "restored" / "config.json").read_text()) == \
        json.loads((src / "config.json").read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_restored_checkpoint_loads_and_keeps_the_function(arch, tmp_path):
    """Without --original-order experts stay in barycenter order: the same function."""
    src = build_checkpoint(arch, tmp_path / "src", "fp32")
    convert(src, tmp_path / "m.rmoe", ConvertOptions(lossless=True), progress=False)
    restore_checkpoint(tmp_path / "m.rmoe", tmp_path / "aligned")
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(0))
    ref, got = load_model(src), load_model(tmp_path / "aligned")
    with torch.no_grad():
        kw = {"decoder_input_ids": ids} if arch == "switch" else {}
        torch.testing.assert_close(got(input_ids=ids, **kw).logits, ref(input_ids=ids, **kw).logits,
                                   rtol=1e-4, atol=1e-5)


def test_lossy_restore_loads_with_from_pretrained(mixtral, tmp_path):
    assert convert_main([str(mixtral), str(tmp_path / "m.rmoe"), "-q"]) == 0
    assert restore_main([str(tmp_path / "m.rmoe"), str(tmp_path / "out")]) == 0
    model = load_model(tmp_path / "out")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def upcycle(src: Path, noise: float = 0.05, seed: int = 0) -> None:
    """Rewrite a Mixtral checkpoint's experts as neuron-permuted copies of one base plus noise."""
    f = next(src.glob("*.safetensors"))
    with safe_open(f, "pt") as h:
        meta = h.metadata()
    t = load_file(f)
    g = torch.Generator().manual_seed(seed)
    layers = sorted({int(k.split(".")[2]) for k in t if ".experts." in k})
    for lay in layers:
        pre = f"model.layers.{lay}.block_sparse_moe.experts"
        base = {w: t[f"{pre}.0.{w}.weight"].float() for w in ("w1", "w2", "w3")}
        k = 0
        while f"{pre}.{k}.w1.weight" in t:
            n = base["w1"].shape[0]
            p = torch.randperm(n, generator=g)
            for w, v in base.items():
                v = v[:, p] if w == "w2" else v[p]
                v = v + noise * v.std() * torch.randn(v.shape, generator=g)
                t[f"{pre}.{k}.{w}.weight"] = v.to(t[f"{pre}.{k}.{w}.weight"].dtype)
            k += 1
    save_file(t, f, metadata=meta)


def test_resmoe_error_far_below_vanilla_pruning(tmp_path):
    src = build_checkpoint("mixtral", tmp_path / "src", "fp32", num_experts=8)
    upcycle(src)
    reports = {}
    for method in ("resmoe", "prune", "svd", "merge"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reports[method] = convert(src, tmp_path / f"{method}.rmoe", ConvertOptions(method=method, keep=0.25),
                                      progress=False)["summary"]
        # merge says it stores 1/E whatever --keep says; no other method warns at this budget
        want = [True] if method == "merge" else []
        assert [str(w.message).startswith("--method merge stores") for w in caught] == want
    assert reports["resmoe"]["rel_error_mean"] < 0.25 * reports["prune"]["rel_error_mean"], reports
    assert reports["resmoe"]["rel_error_mean"] < reports["svd"]["rel_error_mean"]
    assert reports["resmoe"]["rel_error_mean"] < reports["merge"]["rel_error_mean"]
    for r in reports.values():  # the same total budget for every method
        assert r["kept_fraction"] <= 0.25 + 1e-6


def test_report_matches_what_restores(mixtral, tmp_path):
    out, rep = tmp_path / "m.rmoe", tmp_path / "r.json"
    assert convert_main([str(mixtral), str(out), "--keep", "0.5", "--report", str(rep), "-q"]) == 0
    report = json.loads(rep.read_text())
    lay = report["layers"][0]
    assert {"index", "matrices", "bytes", "seconds", "kept", "params", "barycenter"} <= set(lay)
    gate = lay["matrices"]["gate"]
    assert len(gate["rel_error"]) == lay["num_experts"] and gate["kept"] <= gate["params"]
    assert abs(report["summary"]["kept_fraction"] - 0.5) < 0.01
    # both budget conventions are reported: 4 experts, keep 0.5 -> each residual keeps 0.5 - 1/4
    assert report["summary"]["keep"] == pytest.approx(0.5, abs=0.01)
    assert report["summary"]["residual_keep"] == pytest.approx(0.25, abs=0.01)
    assert report["method"]["keep"] == 0.5
    with resmoe_format.open(out) as r:
        i = r.schema.layers[0].index
        perm = r.permutation(i, 1)
        w = resmoe_format.restore.restore_matrix(r, i, 1, "gate").astype(np.float32)
        acc = accounting.account(r)
        assert sum(acc.bytes.values()) == out.stat().st_size
    src = tensors_of(mixtral)[f"model.layers.{i}.block_sparse_moe.experts.1.w1.weight"].float().numpy()[perm]
    err = np.linalg.norm(src - w) / np.linalg.norm(src)
    assert err == pytest.approx(gate["rel_error"][1], rel=1e-5)


def test_deterministic_output(mixtral, tmp_path):
    for name in ("a", "b"):
        convert(mixtral, tmp_path / f"{name}.rmoe", ConvertOptions(keep=0.4), progress=False)
    assert (tmp_path / "a.rmoe").read_bytes() == (tmp_path / "b.rmoe").read_bytes()


@pytest.mark.parametrize("flags", [
    ["--residual", "svd"], ["--residual", "svd", "--residual-scope", "matrix"], ["--residual", "svd", "--rank", "2"],
    ["--residual-scope", "matrix"], ["--residual-keep", "0.25"], ["--delta-format", "csr16"],
    ["--delta-format", "bitmap"], ["--delta-format", "bsr"], ["--delta-format", "dense"], ["--value-dtype", "int8"],
    ["--value-dtype", "fp32"], ["--method", "prune"], ["--method", "svd"], ["--method", "merge"],
    ["--layers", "top:1"], ["--layers", "bottom:1"], ["--layers", "1"], ["--device", "cpu"],
    ["--delta-format", "lowrank"],
])
def test_flag_combinations_write_valid_files(mixtral, tmp_path, flags):
    out = tmp_path / "m.rmoe"
    assert convert_main([str(mixtral), str(out), "-q", *flags]) == 0
    with resmoe_format.open(out) as r:
        r.verify()
        acc = accounting.account(r)
        assert sum(acc.bytes.values()) == out.stat().st_size
    restore_checkpoint(out, tmp_path / "restored")
    restored, source = tensors_of(tmp_path / "restored"), tensors_of(mixtral)
    assert sorted(restored) == sorted(source)
    if "--layers" in flags:  # layers left out pass through bit for bit
        with resmoe_format.open(out) as r:
            kept = {lay.index for lay in r.schema.layers}
        assert len(kept) == 1
        other = ({0, 1} - kept).pop()
        for k in source:
            if k.startswith(f"model.layers.{other}."):
                assert torch.equal(source[k], restored[k])


def test_shared_u_is_stored_once(mixtral, tmp_path):
    out = tmp_path / "m.rmoe"
    convert(mixtral, out, ConvertOptions(residual="svd", keep=0.6), progress=False)
    with resmoe_format.open(out) as r:
        lay = r.schema.layers[0]
        refs = lay.residuals[0]
        assert refs["gate"].encoding == refs["up"].encoding == refs["down"].encoding == "lowrank"
        assert refs["gate"].tensors["u"] == refs["up"].tensors["u"] == refs["down"].tensors["u"]


def test_sharded_input_and_config_flag(tmp_path):
    src = build_checkpoint("qwen3_moe", tmp_path / "src", "bf16", shard_size="8KB")
    assert (src / "model.safetensors.index.json").exists()
    convert(src, tmp_path / "m.rmoe", ConvertOptions(lossless=True), progress=False)
    restore_checkpoint(tmp_path / "m.rmoe", tmp_path / "r", original_order=True)
    assert_bit_equal(tensors_of(src), tensors_of(tmp_path / "r"))
    single = build_checkpoint("olmoe", tmp_path / "single", "bf16")
    cfg = tmp_path / "elsewhere.json"
    (single / "config.json").rename(cfg)
    convert(single / "model.safetensors", tmp_path / "o.rmoe", ConvertOptions(), config=cfg, progress=False)


# ---------------------------------------------------------------------------------------------------
# bad input: a clear error, exit status 2, and no output file (not even a partial one)

def _fails(args, tmp_path, capsys, match):
    out = tmp_path / "bad.rmoe"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert convert_main([*args[:1], str(out), "-q", *args[1:]]) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err  # one clear line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even temporaries


@pytest.mark.parametrize("flags,match", [
    (["--keep", "0"], "(0, 1]"), (["--keep", "1.5"], "(0, 1]"), (["--residual-keep", "-1"], "(0, 1]"),
    (["--keep", "0.1"], "below what the shared base"), (["--layers", "7"], "not an MoE layer"),
    (["--layers", "top:9"], "between 1 and 2"), (["--layers", "x"], "expected all"),
    (["--rank", "3"], "--rank applies"), (["--residual", "svd", "--delta-format", "csr16"], "must be auto"),
    (["--lossless", "--keep", "0.5"], "--lossless keeps everything"), (["--method", "merge", "--residual-keep", "0.5"],
                                                                         "does not apply"),
])
def test_bad_flags(mixtral, tmp_path, capsys, flags, match):
    _fails([str(mixtral), *flags], tmp_path, capsys, match)


def test_non_moe_model_rejected(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(d)
    _fails([str(d)], tmp_path, capsys, "Mixture-of-Experts")


def test_unknown_architecture_lists_supported(mixtral, tmp_path, capsys):
    d = tmp_path / "weird"
    d.mkdir()
    cfg = json.loads((mixtral / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["WeirdMoEForCausalLM"], "weird"
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes((mixtral / "model.safetensors").read_bytes())
    _fails([str(d)], tmp_path, capsys, "MixtralForCausalLM")


def test_nan_weights_rejected_without_output(mixtral, tmp_path, capsys):
    d = tmp_path / "nan"
    d.mkdir()
    (d / "config.json").write_text((mixtral / "config.json").read_text())
    t = tensors_of(mixtral)
    t["model.layers.1.block_sparse_moe.experts.2.w3.weight"][3, 4] = float("nan")
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    _fails([str(d)], tmp_path, capsys, "NaN or Inf")
    t["model.layers.1.block_sparse_moe.experts.2.w3.weight"][3, 4] = 0
    t["model.embed_tokens.weight"][0, 0] = float("inf")
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    _fails([str(d)], tmp_path, capsys, "NaN or Inf")


def test_shape_mismatch_and_missing_shard(tmp_path, capsys):
    src = build_checkpoint("mixtral", tmp_path / "src", "bf16", shard_size="20KB")
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(idx["weight_map"].values()))[-1]
    (src / shard).rename(tmp_path / "moved")
    _fails([str(src)], tmp_path, capsys, shard)
    (tmp_path / "moved").rename(src / shard)
    d = tmp_path / "shape"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    t = tensors_of(src)
    name = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    t[name] = t[name][:-1]
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    _fails([str(d)], tmp_path, capsys, "experts.1.w1.weight")


def test_cuda_flag_without_gpu(mixtral, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _fails([str(mixtral), "--device", "cuda"], tmp_path, capsys, "no CUDA GPU")


def test_existing_output_untouched_on_failure(mixtral, tmp_path):
    out = tmp_path / "keep.rmoe"
    out.write_bytes(b"previous")
    with pytest.raises(ConversionError):
        convert(mixtral, out, ConvertOptions(keep=0.01), progress=False)
    assert out.read_bytes() == b"previous"


def test_readme_example_end_to_end(tmp_path):
    """README set-up command 1: the built-in example, resmoe-convert with a report, resmoe-inspect."""
    import os
    import subprocess
    import sys

    from converters.cli.inspect import main as inspect_main
    from converters.example import main as example_main

    assert example_main([str(tmp_path / "tiny"), "--layers", "2"]) == 0
    out = subprocess.run([sys.executable, "-m", "converters.cli.convert", str(tmp_path / "tiny"),
                          str(tmp_path / "tiny.rmoe"), "--report", str(tmp_path / "r.json")],
                         capture_output=True, text=True, check=False, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "MixtralForCausalLM" in out.stdout and "error mean" in out.stdout
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert summary["kept_fraction"] == pytest.approx(0.25) and summary["rel_error_mean"] < 0.2
    assert inspect_main([str(tmp_path / "tiny.rmoe")]) == 0


def test_residual_keep_is_the_papers_convention(mixtral, tmp_path):
    rep = convert(mixtral, tmp_path / "m.rmoe", ConvertOptions(residual_keep=0.25), progress=False)
    assert rep["method"]["residual_keep"] == 0.25
    assert rep["summary"]["residual_keep"] == pytest.approx(0.25, abs=0.01)
    assert rep["summary"]["keep"] == pytest.approx(0.25 + 1 / 4, abs=0.01)  # the barycenter on top


def test_list_layers_writes_nothing(tmp_path, capsys):
    src = build_checkpoint("switch", tmp_path / "sw", "fp32")
    assert convert_main([str(src), "--list-layers"]) == 0
    out = capsys.readouterr().out
    assert "SwitchTransformersForConditionalGeneration" in out
    assert [p.name for p in tmp_path.iterdir()] == ["sw"]


def test_int8_barycenter(tmp_path):
    """--base-dtype int8: the barycenter is an int8 dense record with scales; kept residual entries are
    exact against the stored (rounded) barycenter, so the error barely moves while the bytes drop."""
    import resmoe_format
    from converters.example import write_mixtral_checkpoint
    from resmoe_format.accounting import account

    src = tmp_path / "src"
    write_mixtral_checkpoint(src, layers=2, hidden=64, inter=192, experts=8)
    out = {}
    for name, extra in {"bf16": {}, "int8": {"base_dtype": "int8"}}.items():
        f = tmp_path / f"{name}.rmoe"
        rep = convert(src, f, ConvertOptions(keep=0.5, value_dtype="int8", **extra), progress=False)
        with resmoe_format.open(f) as r:
            r.verify()
            lay = r.layers[0]
            assert {ref.value_dtype for ref in lay.base.values()} == {name}
            out[name] = (rep["summary"]["rel_error_mean"], account(r).bytes["barycenters"])
    assert out["int8"][1] < 0.6 * out["bf16"][1]
    assert out["int8"][0] < out["bf16"][0] * 1.05 + 1e-3
    with pytest.raises(ConversionError, match="--base-dtype"):
        convert(src, tmp_path / "x.rmoe", ConvertOptions(method="prune", keep=0.5, base_dtype="int8"), progress=False)
    with pytest.raises(ConversionError, match="--base-dtype"):
        convert(src, tmp_path / "x.rmoe", ConvertOptions(lossless=True, base_dtype="int8"), progress=False)
    assert not (tmp_path / "x.rmoe").exists()
