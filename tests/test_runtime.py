"""The torch runtime: load_model / patch_model in materialize, lazy and fused modes.

Reference: the restored dense model, i.e. ``resmoe-restore --original-order`` loaded with
transformers' ``from_pretrained``. Tolerances (float32 weights and activations):
materialize is bit-identical; lazy and fused reorder sums (aligned neuron order, the shared
barycenter products), so their logits agree to 1e-5 of the largest logit.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from converters.convert import ConvertOptions, convert
from converters.restore_checkpoint import restore_checkpoint
from hf_models import ARCHS, build_checkpoint, load_model as hf_load
from resmoe_format.errors import RmoeRuntimeError
from resmoe_format.torch import ExpertCache, FusedExperts, LazyExperts, load_model, patch_model

RTOL = 1e-5
LAZY_FUSED = ("lazy", "fused")
_cache: dict[tuple, tuple[Path, Path]] = {}


pytestmark = pytest.mark.usefixtures("quiet_warnings")


def converted(tmp_path_factory, arch: str, **opts) -> tuple[Path, Path]:
    """(file.rmoe, restored dense checkpoint dir) for ``arch`` converted with ``opts``; built once per session."""
    key = (arch, tuple(sorted(opts.items())))
    if key not in _cache:
        d = tmp_path_factory.mktemp(f"{arch}_src")
        build_checkpoint(arch, d, "fp32", seed=3)
        out = d.parent / f"{d.name}.rmoe"
        convert(d, out, ConvertOptions(**opts), progress=False)
        _cache[key] = out, restore_checkpoint(out, d.parent / f"{d.name}_restored", original_order=True)
    return _cache[key]


def inputs(arch: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict:
    ids = torch.randint(3, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, **({"decoder_input_ids": ids} if arch == "switch" else {})}


def logits(model, arch: str, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(arch, **kw)).logits


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err <= rtol, f"max relative difference {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_mode_gives_the_restored_dense_logits(tmp_path_factory, arch):
    rmoe, restored = converted(tmp_path_factory, arch, residual_keep=0.25)  # sparse residuals in every layer
    want = logits(hf_load(restored), arch)
    assert torch.equal(logits(load_model(rmoe, mode="materialize"), arch), want)
    for mode in LAZY_FUSED:
        model = load_model(rmoe, mode=mode)
        cls = LazyExperts if mode == "lazy" else FusedExperts
        assert any(isinstance(m, cls) for m in model.modules())
        assert_close(logits(model, arch), want)


@pytest.mark.parametrize("opts", [dict(residual="svd", residual_keep=0.3),
                                  dict(residual="svd", residual_scope="matrix", residual_keep=0.3),
                                  dict(keep=0.5), dict(method="prune"), dict(method="svd"), dict(method="merge"),
                                  dict(value_dtype="int8", residual_keep=0.3), dict(lossless=True),
                                  dict(delta_format="bsr", residual_keep=0.3), dict(delta_format="rice", keep=0.4),
                                  dict(residual_keep=0.5, delta_format="csr16")],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_every_encoding_and_method(tmp_path_factory, arch, opts):
    rmoe, restored = converted(tmp_path_factory, arch, **opts)
    want = logits(hf_load(restored), arch)
    for mode in LAZY_FUSED:
        assert_close(logits(load_model(rmoe, mode=mode), arch), want)


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
def test_generate_matches_the_dense_model(tmp_path_factory, arch):
    rmoe, restored = converted(tmp_path_factory, arch, residual_keep=0.25)
    ids = inputs("mixtral", batch=2, seq=5)["input_ids"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = hf_load(restored).generate(ids, **kw)
    for mode in ("materialize",) + LAZY_FUSED:
        assert torch.equal(load_model(rmoe, mode=mode).generate(ids, **kw), want), mode


def test_fused_holds_barycenter_and_residuals_not_dense_experts(tmp_path_factory):
    rmoe, _ = converted(tmp_path_factory, "mixtral", keep=0.5)
    model = load_model(rmoe, mode="fused")
    layers = [m for m in model.modules() if isinstance(m, FusedExperts)]
    assert layers
    for lay in layers:
        dense = sum(p.numel() for p in (lay.base_in, lay.base_out)) * lay.num_experts * 4
        assert lay.nbytes() < 0.85 * dense  # 4-byte CSR indices cost more than the file's 16-bit ones
    assert not any(n.endswith("gate_up_proj") for n, _ in model.named_parameters())


def test_lazy_cache_is_bounded_and_evicts(tmp_path_factory):
    rmoe, restored = converted(tmp_path_factory, "mixtral")
    one = next(m for m in load_model(rmoe, mode="lazy").modules() if isinstance(m, LazyExperts)).expert_bytes
    model = load_model(rmoe, mode="lazy", cache_bytes=one)
    assert_close(logits(model, "mixtral"), logits(hf_load(restored), "mixtral"))
    cache: ExpertCache = next(m for m in model.modules() if isinstance(m, LazyExperts)).cache
    assert cache.nbytes <= one and len(cache.entries) == 1 and cache.misses > 1


def test_patch_model_swaps_experts_in_place(tmp_path_factory):
    rmoe, restored = converted(tmp_path_factory, "qwen3_moe")
    want = logits(hf_load(restored), "qwen3_moe")
    for mode in ("materialize",) + LAZY_FUSED:
        model = hf_load(restored)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 3:
                    p.zero_()  # the experts must come from the file
        assert patch_model(model, rmoe, mode=mode) is model
        assert_close(logits(model, "qwen3_moe"), want)


def test_bf16_runtime(tmp_path_factory):
    rmoe, restored = converted(tmp_path_factory, "mixtral")
    want = logits(hf_load(restored), "mixtral")
    for mode in ("materialize",) + LAZY_FUSED:
        model = load_model(rmoe, mode=mode, dtype="bf16")
        assert next(model.parameters()).dtype == torch.bfloat16
        assert_close(logits(model, "mixtral").float(), want, rtol=5e-2)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_bf16_checkpoint(tmp_path, arch):
    """bf16 source weights (ml_dtypes arrays in the reader) in every mode, against from_pretrained in bf16."""
    d = build_checkpoint(arch, tmp_path / "src", "bf16", seed=4)
    rmoe = tmp_path / "m.rmoe"
    convert(d, rmoe, ConvertOptions(residual_keep=0.25), progress=False)
    restored = restore_checkpoint(rmoe, tmp_path / "restored", original_order=True)
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(restored, dtype=torch.bfloat16).eval()
    want = logits(ref, arch)
    model = load_model(rmoe, mode="materialize")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert torch.equal(logits(model, arch), want)
    for mode in LAZY_FUSED:
        assert_close(logits(load_model(rmoe, mode=mode), arch).float(), want.float(), rtol=5e-2)


def test_device_argument_takes_the_cuda_code_path_on_cpu(tmp_path_factory):
    rmoe, _ = converted(tmp_path_factory, "mixtral")
    model = load_model(rmoe, mode="fused", device=torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda(tmp_path_factory):
    rmoe, restored = converted(tmp_path_factory, "mixtral")
    want = logits(hf_load(restored), "mixtral")
    for mode in ("materialize",) + LAZY_FUSED:
        model = load_model(rmoe, mode=mode, device="cuda")
        with torch.no_grad():
            got = model(**{k: v.cuda() for k, v in inputs("mixtral").items()}).logits.cpu()
        assert_close(got, want, rtol=1e-3)


# --- bad input ------------------------------------------------------------------------------

def test_bad_arguments_are_clear_errors(tmp_path_factory):
    rmoe, _ = converted(tmp_path_factory, "mixtral")
    with pytest.raises(RmoeRuntimeError, match="mode 'dense'"):
        load_model(rmoe, mode="dense")
    with pytest.raises(RmoeRuntimeError, match="dtype 'fp8' is not available"):
        load_model(rmoe, dtype="fp8")
    with pytest.raises(RmoeRuntimeError, match="not available"):
        load_model(rmoe, dtype=torch.int8)
    with pytest.raises(RmoeRuntimeError, match="not a torch device"):
        load_model(rmoe, device="gpu0")
    with pytest.raises(RmoeRuntimeError, match="supports cpu and cuda"):
        load_model(rmoe, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(RmoeRuntimeError, match="no CUDA GPU"):
            load_model(rmoe, device="cuda")
    with pytest.raises(RmoeRuntimeError, match="smaller than one expert"):
        load_model(rmoe, mode="lazy", cache_bytes=100)


def test_an_architecture_the_runtime_cannot_build(tmp_path):
    from builders import write_lossless_file

    path = tmp_path / "x.rmoe"
    write_lossless_file(path)  # embeds config.json {"model_type": "test"}
    with pytest.raises(RmoeRuntimeError, match="model_type 'test'|no model class"):
        load_model(path)
    with pytest.raises(RmoeRuntimeError, match="supported: .*mixtral"):
        patch_model(_tiny_llama(), path)


def test_a_file_without_config(tmp_path):
    import numpy as np

    from resmoe_format import Writer

    path = tmp_path / "noconfig.rmoe"
    with Writer(path, {"architecture": "MixtralForCausalLM", "source_dtype": "fp32"}) as w:
        w.add_passthrough("model.norm.weight", np.ones(16, np.float32))
    with pytest.raises(RmoeRuntimeError, match="embeds no config.json"):
        load_model(path)


def test_patch_refuses_another_model_type(tmp_path_factory):
    rmoe, restored = converted(tmp_path_factory, "mixtral")
    other, _ = converted(tmp_path_factory, "qwen3_moe")
    with pytest.raises(RmoeRuntimeError, match="holds a 'qwen3_moe' model"):
        patch_model(hf_load(restored), other)


def test_corrupt_file_is_a_format_error(tmp_path_factory, tmp_path):
    from resmoe_format import RmoeFormatError

    rmoe, _ = converted(tmp_path_factory, "mixtral")
    bad = tmp_path / "bad.rmoe"
    bad.write_bytes(rmoe.read_bytes()[:-100])
    with pytest.raises(RmoeFormatError):
        load_model(bad)


def _tiny_llama():
    import transformers as T

    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))


def test_config_json_round_trips(tmp_path_factory):
    rmoe, restored = converted(tmp_path_factory, "olmoe")
    cfg = json.loads((restored / "config.json").read_text())
    assert load_model(rmoe, mode="fused").config.model_type == cfg["model_type"]


def test_fused_residual_operators_follow_the_encoding(tmp_path_factory):
    from resmoe_format.torch.residuals import DenseResidual, LowRankResidual, SparseResidual

    def ops(**opts):
        model = load_model(converted(tmp_path_factory, "mixtral", **opts)[0], mode="fused")
        lay = next(m for m in model.modules() if isinstance(m, FusedExperts))
        return {type(op) for ops_ in lay.in_ops for _, _, op in ops_} | {type(op) for op in lay.out_ops}

    assert ops(residual_keep=0.25) == {SparseResidual}
    assert ops(residual="svd", residual_keep=0.3) == {LowRankResidual}
    assert ops(lossless=True) <= {DenseResidual, SparseResidual}
