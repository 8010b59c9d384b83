"""The torch runtime: load_model / patch_model in materialize, lazy and fused modes.

Reference: the restored dense model, i.e. ``resmoe-restore --original-order`` loaded with
transformers' ``from_pretrained``; materialize is bit-identical to it. Lazy and fused compute in
float32 here and reorder sums (aligned neuron order, the shared barycenter products), so their
logits agree with it to RTOL = 1e-5 of the largest logit, on fp32 and bf16 sources alike, with
one exception (spec 6.7): fused multiplies by B + U V for low-rank residuals (and B + D for residuals
of k-quant values, tests/test_runtime_kquant.py), the restored weight before its rounding to the source
dtype T. Then every weight it uses is within half an ulp of T
of the restored weight (|error| <= u_T |W|, u_T the unit roundoff: 2^-8 for bf16, 2^-11 for
fp16), which :func:`check_fused_weights` checks element by element, and its logits agree to RTOL
with those of the dense model built from the unrounded weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import resmoe_format
from converters.convert import ConvertOptions, convert
from converters.restore_checkpoint import restore_checkpoint
from hf_models import ARCHS, build_checkpoint, load_model as hf_load
from resmoe_format.codecs.kquant import is_kquant
from resmoe_format.dtypes import by_name
from resmoe_format.errors import RmoeRuntimeError
from resmoe_format.restore import combine, restore_expert, unpermute
from resmoe_format.torch import ExpertCache, FusedExperts, LazyExperts, cache_stats, load_model, patch_model
from resmoe_format.torch import load as runtime_load

RTOL = 1e-5
#: fp32 arithmetic in the products that rebuild fused's weights, relative to a matrix's largest weight
WEIGHT_SLACK = 2.0 ** -16
LAZY_FUSED = ("lazy", "fused")
DTYPES = ("fp32", "bf16")
_cache: dict[tuple, tuple[Path, Path]] = {}


pytestmark = pytest.mark.usefixtures("quiet_warnings")



def converted(tmp_path_factory, arch: str, dtype: str = "fp32", seed: int = 3, **opts) -> tuple[Path, Path]:
    """(file.rmoe, restored dense checkpoint dir) for ``arch`` in ``dtype`` converted with ``opts``; built
    once per session."""
    key = (arch, dtype, seed, tuple(sorted(opts.items())))
    if key not in _cache:
        d = tmp_path_factory.mktemp(f"{arch}_{dtype}_src")
        build_checkpoint(arch, d, dtype, seed=seed)
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


def unrounded(reader, layer: int, expert: int, matrix) -> bool:
    """Whether fused multiplies by this matrix unrounded (spec 6.7): a 2-D matrix with a lowrank residual,
    a residual of k-quant values or a sparse residual of bf16 values."""
    ref = reader.layer(layer).residuals[expert].get(matrix.name)
    return (ref is not None and (ref.encoding == "lowrank" or is_kquant(ref.value_dtype) or
                                 (ref.encoding in ("csr16", "bitmap", "bsr", "rice") and ref.value_dtype == "bf16"))
            and len(matrix.shape) == 2)


def fused_reference(reader, layer: int, expert: int, original_order: bool = False) -> dict[str, np.ndarray]:
    """Spec 6.7: the weights fused multiplies by, from the file alone: the restored W (6.1), except
    A = B + D (6.1 step 3, not rounded to the source dtype) where the residual is low rank or k-quant."""
    lay = reader.layer(layer)
    mats = restore_expert(reader, layer, expert, original_order)
    for m in lay.matrices:
        if unrounded(reader, layer, expert, m):
            a = combine(reader.base(layer, m.name), reader.residual(layer, expert, m.name), "fp32").reshape(m.shape)
            if original_order and lay.permutations is not None and m.neuron_axis is not None:
                a = unpermute(a, reader.permutation(layer, expert), m.neuron_axis)
            mats[m.name] = a
    return mats


def check_fused_weights(model, rmoe: Path) -> None:
    """Every weight fused multiplies by is the restored one (to fp32 arithmetic), or within half an ulp of
    the source dtype of it for low-rank and k-quant residuals (spec 6.7)."""
    layers = [m for m in model.modules() if isinstance(m, FusedExperts)]
    assert layers
    with resmoe_format.open(rmoe) as r:
        for layer in layers:
            lay = r.layer(layer.layer)
            for e in range(lay.num_experts):
                restored = restore_expert(r, lay.index, e)
                got = layer.weights(e)
                for m in lay.matrices:
                    w = restored[m.name].astype(np.float32)
                    f = got[m.name].numpy().reshape(w.shape)
                    half_ulp = 0.0
                    if unrounded(r, lay.index, e, m):
                        fin = ml_dtypes.finfo(by_name(m.dtype).np)
                        half_ulp = fin.eps / 2 * np.abs(w) + fin.smallest_subnormal / 2
                    bad = np.abs(f - w) > half_ulp + WEIGHT_SLACK * np.abs(w).max()
                    assert not bad.any(), (f"layer {lay.index} expert {e} {m.name}: {int(bad.sum())} weights off, "
                                           f"max {np.abs(f - w).max():.2e}")


def unrounded_dense(monkeypatch, rmoe: Path):
    """The dense (materialize) model built from :func:`fused_reference`'s weights."""
    with monkeypatch.context() as mp:
        mp.setattr(runtime_load, "restore_expert", fused_reference)
        return load_model(rmoe, mode="materialize", dtype="fp32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_mode_gives_the_restored_dense_logits(tmp_path_factory, monkeypatch, arch, dtype):
    rmoe, restored = converted(tmp_path_factory, arch, dtype, residual_keep=0.25)  # sparse residuals in every layer
    want = logits(hf_load(restored), arch)
    assert torch.equal(logits(load_model(rmoe, mode="materialize", dtype="fp32"), arch), want)
    for mode in LAZY_FUSED:
        model = load_model(rmoe, mode=mode, dtype="fp32")
        cls = LazyExperts if mode == "lazy" else FusedExperts
        assert any(isinstance(m, cls) for m in model.modules())
        assert_close(logits(model, arch), fused_want(monkeypatch, rmoe, dtype, arch, want))


def fused_want(monkeypatch, rmoe: Path, dtype: str, arch: str, restored: torch.Tensor) -> torch.Tensor:
    """The logits fused mode must give: the restored model's, or where some weights are unrounded (spec 6.7)
    the dense model's built from them."""
    with resmoe_format.open(rmoe) as r:
        exact = dtype == "fp32" or not any(unrounded(r, lay.index, e, m) for lay in r.layers
                                           for e in range(lay.num_experts) for m in lay.matrices)
    return restored if exact else logits(unrounded_dense(monkeypatch, rmoe), arch)


#: every method and residual scope, int8 residuals and barycenters, every residual encoding
CASES = {"resmoe": dict(residual_keep=0.25), "resmoe-matrix": dict(residual_keep=0.25, residual_scope="matrix"),
         "resmoe-svd": dict(residual="svd", residual_keep=0.3),
         "resmoe-svd-matrix": dict(residual="svd", residual_scope="matrix", residual_keep=0.3),
         "resmoe-int8": dict(value_dtype="int8", residual_keep=0.3),
         "resmoe-svd-matrix-int8": dict(residual="svd", residual_scope="matrix", value_dtype="int8",
                                        residual_keep=0.3),
         "resmoe-int8-base": dict(base_dtype="int8", residual_keep=0.3),
         "resmoe-svd-int8-base": dict(residual="svd", base_dtype="int8", residual_keep=0.3),
         "prune": dict(method="prune"), "prune-matrix": dict(method="prune", residual_scope="matrix"),
         "svd": dict(method="svd"), "svd-matrix": dict(method="svd", residual_scope="matrix"),
         "merge": dict(method="merge"), "lossless": dict(lossless=True),
         "bsr": dict(delta_format="bsr", residual_keep=0.3), "rice": dict(delta_format="rice", keep=0.4),
         "csr16": dict(residual_keep=0.5, delta_format="csr16"),
         "svd-dense": dict(residual="svd", delta_format="dense", residual_keep=0.3)}
#: by default Mixtral and GPT-OSS (biases, interleaved gate/up), and fp16 where its rounding matters (u_T = 2^-11)
FAST_ARCHS = ("mixtral", "gpt_oss")
_FP16 = [("mixtral", c, "fp16") for c in ("resmoe-svd-matrix", "resmoe-int8", "svd")]


@pytest.mark.parametrize("arch,case,dtype", [(a, c, d) for d in DTYPES for a in FAST_ARCHS for c in CASES] + _FP16
                         + [pytest.param(a, c, d, marks=pytest.mark.slow) for d in DTYPES for a in ARCHS
                            if a not in FAST_ARCHS for c in CASES])
def test_every_method_and_encoding(tmp_path_factory, monkeypatch, arch, case, dtype):
    rmoe, _ = converted(tmp_path_factory, arch, dtype, **CASES[case])
    want = logits(load_model(rmoe, mode="materialize", dtype="fp32"), arch)
    fused = load_model(rmoe, mode="fused", dtype="fp32")
    check_fused_weights(fused, rmoe)
    fused_logits = fused_want(monkeypatch, rmoe, dtype, arch, want)
    assert_close(logits(fused, arch), fused_logits)
    lazy = load_model(rmoe, mode="lazy", dtype="fp32")
    assert_close(logits(lazy, arch), fused_logits)
    assert torch.equal(logits(lazy, arch), logits(fused, arch))  # the same products, built later


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["mixtral", "switch"])
def test_generate_matches_the_dense_model(tmp_path_factory, arch, dtype):
    rmoe, restored = converted(tmp_path_factory, arch, dtype, residual_keep=0.25)
    ids = inputs("mixtral", batch=2, seq=5)["input_ids"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = hf_load(restored).generate(ids, **kw)
    for mode in ("materialize",) + LAZY_FUSED:
        assert torch.equal(load_model(rmoe, mode=mode, dtype="fp32").generate(ids, **kw), want), mode


def test_fused_holds_barycenter_and_residuals_not_dense_experts(tmp_path_factory):
    rmoe, _ = converted(tmp_path_factory, "mixtral", keep=0.5)
    model = load_model(rmoe, mode="fused")
    layers = [m for m in model.modules() if isinstance(m, FusedExperts)]
    assert layers
    for lay in layers:
        dense = sum(p.numel() for p in (lay.base_in, lay.base_out)) * lay.num_experts * 4
        assert lay.nbytes() < 0.85 * dense  # 4-byte CSR indices cost more than the file's 16-bit ones
    assert not any(n.endswith("gate_up_proj") for n, _ in model.named_parameters())


@pytest.mark.parametrize("dtype", DTYPES)
def test_lazy_cache_is_bounded_and_evicts(tmp_path_factory, monkeypatch, dtype):
    rmoe, restored = converted(tmp_path_factory, "mixtral", dtype, residual_keep=0.25)
    full = load_model(rmoe, mode="lazy", dtype="fp32")
    want = fused_want(monkeypatch, rmoe, dtype, "mixtral", logits(hf_load(restored), "mixtral"))
    assert_close(logits(full, "mixtral"), want)
    stats = cache_stats(full)
    assert stats["misses"] == stats["resident_experts"] > 1 and stats["not_admitted"] == 0  # default: all fit
    one = max(m.expert_bytes for m in full.modules() if isinstance(m, LazyExperts))
    model = load_model(rmoe, mode="lazy", cache_bytes=2 * one, dtype="fp32")
    assert_close(logits(model, "mixtral"), want)
    cache: ExpertCache = next(m for m in model.modules() if isinstance(m, LazyExperts)).cache
    assert cache.nbytes <= 2 * one and 1 <= len(cache.entries) <= 3 and cache.misses > 3
    with pytest.raises(RmoeRuntimeError, match="smaller than one expert"):
        load_model(rmoe, mode="lazy", cache_bytes=one - 1, dtype="fp32")


def test_frequency_cache_keeps_the_most_used_experts_instead_of_thrashing():
    """Layers asking for 4 experts in turn of a cache that holds 3: LRU would miss every time (it evicts the one
    needed next); the frequency cache keeps a stable set and hits on it."""
    cache = ExpertCache(3)
    built = []
    for step in range(200):
        for e in range(4):
            cache.get((0, e), lambda e=e: built.append(e) or e, size=1)
    assert cache.hit_rate > 0.6 and len(cache.entries) == 3 and cache.nbytes == 3
    # skewed use: the hot expert stays resident
    cache = ExpertCache(2)
    for step in range(300):
        for key in ((0, 0), (0, 1 + step % 5)):
            cache.get(key, lambda: 0, size=1)
    assert (0, 0) in cache.entries and cache.hits >= 299


@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_model_swaps_experts_in_place(tmp_path_factory, monkeypatch, dtype):
    rmoe, restored = converted(tmp_path_factory, "qwen3_moe", dtype, residual_keep=0.25)
    restored_logits = logits(hf_load(restored), "qwen3_moe")
    for mode in ("materialize",) + LAZY_FUSED:
        want = restored_logits if mode == "materialize" else fused_want(monkeypatch, rmoe, dtype, "qwen3_moe",
                                                                        restored_logits)
        model = hf_load(restored)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 3:
                    p.zero_()  # the experts must come from the file
        assert patch_model(model, rmoe, mode=mode) is model
        assert_close(logits(model, "qwen3_moe"), want)


def test_bf16_compute_on_an_fp32_source(tmp_path_factory):
    rmoe, restored = converted(tmp_path_factory, "mixtral", residual_keep=0.25)
    want = logits(hf_load(restored), "mixtral")
    for mode in ("materialize",) + LAZY_FUSED:
        model = load_model(rmoe, mode=mode, dtype="bf16")
        assert next(model.parameters()).dtype == torch.bfloat16
        assert_close(logits(model, "mixtral").float(), want, rtol=5e-2)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_bf16_checkpoint_runs_in_bf16_by_default(tmp_path_factory, arch):
    """bf16 source weights (ml_dtypes arrays in the reader) in every mode, against from_pretrained in bf16.
    bf16 arithmetic can flip a router's choice (GPT-OSS's seed-3 model does, from_pretrained included): seed 4."""
    rmoe, restored = converted(tmp_path_factory, arch, "bf16", seed=4, residual_keep=0.25)
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(restored, dtype=torch.bfloat16).eval()
    want = logits(ref, arch)
    model = load_model(rmoe, mode="materialize")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert torch.equal(logits(model, arch), want)
    for mode in LAZY_FUSED:
        assert_close(logits(load_model(rmoe, mode=mode), arch).float(), want.float(), rtol=5e-2)


def test_device_argument_takes_the_cuda_code_path_on_cpu(tmp_path_factory):
    rmoe, _ = converted(tmp_path_factory, "mixtral", residual_keep=0.25)
    model = load_model(rmoe, mode="fused", device=torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda(tmp_path_factory, dtype):
    rmoe, restored = converted(tmp_path_factory, "mixtral", dtype, residual_keep=0.25)
    want = logits(hf_load(restored), "mixtral")
    for mode in ("materialize",) + LAZY_FUSED:
        model = load_model(rmoe, mode=mode, device="cuda", dtype="fp32")
        with torch.no_grad():
            got = model(**{k: v.cuda() for k, v in inputs("mixtral").items()}).logits.cpu()
        assert_close(got, want, rtol=1e-3)


# --- bad input ------------------------------------------------------------------------------

def test_bad_arguments_are_clear_errors(tmp_path_factory):
    rmoe, _ = converted(tmp_path_factory, "mixtral", residual_keep=0.25)
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
    rmoe, restored = converted(tmp_path_factory, "mixtral", residual_keep=0.25)
    other, _ = converted(tmp_path_factory, "qwen3_moe", residual_keep=0.25)
    with pytest.raises(RmoeRuntimeError, match="holds a 'qwen3_moe' model"):
        patch_model(hf_load(restored), other)


def test_corrupt_file_is_a_format_error(tmp_path_factory, tmp_path):
    from resmoe_format import RmoeFormatError

    rmoe, _ = converted(tmp_path_factory, "mixtral", residual_keep=0.25)
    bad = tmp_path / "bad.rmoe"
    bad.write_bytes(rmoe.read_bytes()[:-100])
    with pytest.raises(RmoeFormatError):
        load_model(bad)


def _tiny_llama():
    import transformers as T

    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))


def test_config_json_round_trips(tmp_path_factory):
    rmoe, restored = converted(tmp_path_factory, "olmoe", residual_keep=0.25)
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


@pytest.mark.parametrize("arch", ["mixtral", pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def test_lossless_fields_file_runs_as_the_source_in_every_mode(tmp_path_factory, monkeypatch, arch):
    """--lossless --compress-passthrough (fields records, a predictor base, coded non-expert tensors): materialize
    gives the source model's logits exactly, lazy and fused (aligned neuron order: sums reordered) to the usual
    tolerance. The tiny model's tensors are coded even where their header entries cost more than coding saves."""
    from hf_models import build_checkpoint
    from hf_models import load_model as hf_source
    from resmoe_format import container

    monkeypatch.setattr(container, "_header_cost", lambda c: 0)
    rmoe, restored = converted(tmp_path_factory, arch, "bf16", lossless=True, compress_passthrough=True)
    with resmoe_format.open(rmoe) as r:
        assert r.version == (4, 0) and r.schema.coded
    src = tmp_path_factory.mktemp(f"{arch}_bf16_again")
    build_checkpoint(arch, src, "bf16", seed=3)
    want = logits(hf_source(src), arch)
    assert torch.equal(logits(hf_load(restored), arch), want)
    assert torch.equal(logits(load_model(rmoe, mode="materialize", dtype="fp32"), arch), want)
    for mode in LAZY_FUSED:
        assert_close(logits(load_model(rmoe, mode=mode, dtype="fp32"), arch), want)
