"""Compressed experts (spec 4.5 ``compressed_experts``, .rmoe 6.0): the IA3 formula, the runtime in every mode,
resmoe-tune-ce (training, determinism, resume, bad input) and the exporters' refusal."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import resmoe_format
from hf_models import build_checkpoint, build_dense_checkpoint, load_model as hf_load, tokenizer_json, CHARS
from filecraft import rewrite
from resmoe_format import RmoeFormatError
from resmoe_format.compressed_experts import ones_vectors, read_vectors, write_with_vectors
from resmoe_format.errors import RmoeRuntimeError
from resmoe_format.torch import load_model
from resmoe_format.torch.ce import CEExperts, split_routing

TOP_K = 3
N_EXPERTS = 4


def _text(n: int = 4000, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list(CHARS[:26]), size=rng.integers(2, 7))) for _ in range(40)]
    return " ".join(rng.choice(words, size=n // 5))[:n]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = build_checkpoint("qwen3_moe", tmp_path_factory.mktemp("ce") / "ckpt", num_experts=N_EXPERTS,
                         overrides={"num_experts_per_tok": TOP_K, "norm_topk_prob": True})
    (d / "tokenizer.json").write_text(tokenizer_json())
    return d


@pytest.fixture(scope="module")
def lossless(ckpt, tmp_path_factory) -> Path:
    from converters.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("ce") / "lossless.rmoe"
    convert(ckpt, out, ConvertOptions(lossless=True), progress=False)
    return out


@pytest.fixture(scope="module")
def aligned(ckpt, tmp_path_factory) -> Path:
    """ResMoE (barycenter, permutations, residuals kept at 0.5): a compressed, aligned file."""
    from converters.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("ce") / "aligned.rmoe"
    convert(ckpt, out, ConvertOptions(keep=0.5), progress=False)
    with resmoe_format.open(out) as r:
        assert any(r.permutation(lay.index, e) is not None and (r.permutation(lay.index, e) != np.arange(
            lay.num_neurons)).any() for lay in r.layers for e in range(lay.num_experts))
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ce") / "train.txt"
    p.write_text(_text())
    return p


def _random_vectors(path: Path, seed: int = 0, scale: float = 0.3) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    with resmoe_format.open(path) as r:
        return {i: (1 + scale * rng.standard_normal(v.shape)).astype(np.float32) for i, v in ones_vectors(r).items()}


def _with_vectors(src: Path, out: Path, vectors, n_ce: int) -> Path:
    with resmoe_format.open(src) as r:
        write_with_vectors(r, out, vectors, n_ce)
    return out


IDS = torch.tensor(np.random.default_rng(1).integers(3, 58, (2, 12)))


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


# --- the formula ------------------------------------------------------------------------------------------

def test_split_routing_hand_computed():
    vec = torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(4, 3, 2)  # E=4, L=2
    index = torch.tensor([[2, 0, 1]])
    weights = torch.tensor([[0.2, 0.5, 0.3]])
    main, w, c = split_routing(index, weights, 1, vec)
    assert main.tolist() == [[0, 1]] and torch.allclose(w, torch.tensor([[0.5, 0.3]]))
    assert torch.equal(c[0], vec[2])  # one auxiliary expert: its own vectors
    main, w, c = split_routing(index, weights, 2, vec)
    assert main.tolist() == [[0]] and torch.allclose(w, torch.tensor([[0.5]]))
    assert torch.allclose(c[0], 0.6 * vec[1] + 0.4 * vec[2])  # 0.3 / 0.5 and 0.2 / 0.5
    # "no expert" (index E, weight 0) gives nothing; all-zero auxiliary weights leave the main experts unscaled
    main, w, c = split_routing(torch.tensor([[1, 4]]), torch.tensor([[1.0, 0.0]]), 1, vec)
    assert main.tolist() == [[1]] and torch.equal(c[0], torch.ones(3, 2))


def test_ia3_expert_by_hand():
    """One main expert, one auxiliary: y = w * down(silu(gate(x*e1)) * up(x*e3) * e2[:n]) computed by hand."""
    from resmoe_format.torch.kinds import kind_for
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=3, moe_intermediate_size=2, num_experts=2, num_experts_per_tok=2)
    mod = Qwen3MoeExperts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mod.gate_up_proj.copy_(torch.randn(mod.gate_up_proj.shape, generator=g))
        mod.down_proj.copy_(torch.randn(mod.down_proj.shape, generator=g))
    vec = torch.ones(2, 3, 3)
    vec[1] = torch.tensor([[2.0, 0.5, 1.0], [3.0, -1.0, 7.0], [0.0, 1.0, 4.0]])  # e2[:2] = (3, -1); 7 is cut off
    ce = CEExperts(mod, kind_for(cfg), vec, 1, 2, 3)
    x = torch.tensor([[1.0, -2.0, 0.5]])
    y = ce(x, torch.tensor([[0, 1]]), torch.tensor([[0.7, 0.3]]))
    G, U, D = mod.gate_up_proj[0, :2], mod.gate_up_proj[0, 2:], mod.down_proj[0]
    x1, x3 = x * torch.tensor([2.0, 0.5, 1.0]), x * torch.tensor([0.0, 1.0, 4.0])
    h = torch.nn.functional.silu(x1 @ G.T) * (x3 @ U.T) * torch.tensor([3.0, -1.0])
    assert torch.allclose(y, 0.7 * (h @ D.T), atol=1e-6)
    ce.n_ce, ce.direct_pairs = 0, 0  # the full top-k: the transformers module itself
    assert torch.equal(ce(x, torch.tensor([[0, 1]]), torch.tensor([[0.7, 0.3]])),
                       mod(x, torch.tensor([[0, 1]]), torch.tensor([[0.7, 0.3]])))


# --- the direct path (few tokens: decoding) ----------------------------------------------------------------

def _experts_module(arch: str, dtype: torch.dtype, experts: int = 6):
    """A transformers experts module of ``arch`` (top-3 of ``experts``, random weights and biases) and its kind."""
    import transformers
    from hf_models import _config
    from resmoe_format.torch.kinds import kind_for

    cfg = _config(arch, 1, experts)
    cfg.num_experts_per_tok = 3
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.set_experts_implementation("eager")  # transformers' own loop over experts
    mod = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    with torch.no_grad():
        for t in mod.parameters():
            t.copy_(0.3 * torch.randn(t.shape))
    return mod.to(dtype), kind_for(cfg)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_path_is_the_loop(arch, dtype, monkeypatch):
    """The direct path (token by token on views of the routed experts) computes what the loop over experts and
    the transformers module (n_ce = 0) compute: GPT-OSS for biases and an interleaved, transposed layout."""
    mod, kind = _experts_module(arch, dtype)
    E, H = mod.num_experts, mod.hidden_size if hasattr(mod, "hidden_size") else mod.hidden_dim
    n = kind.read_dense(mod, 0)[kind.output].shape[0]
    g = torch.Generator().manual_seed(1)
    vec = 1 + 0.3 * torch.randn(E, 3, max(H, n), generator=g)
    x = torch.randn(5, H, generator=g).to(dtype)
    index = torch.rand(5, E, generator=g).argsort(1)[:, :3]
    weights = torch.softmax(torch.randn(5, 3, generator=g), 1).to(dtype)
    calls = []
    run = CEExperts._run_direct
    monkeypatch.setattr(CEExperts, "_run_direct", lambda self, *a: calls.append(1) or run(self, *a))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    got = {}
    for n_ce in (0, 1, 2):
        ce = CEExperts(mod, kind, vec, n_ce, n, H, direct_pairs=0)
        with torch.no_grad():
            loop = ce(x, index, weights).float()
            ce.direct_pairs = 64
            fast = ce(x, index, weights).float()
        assert len(calls) == n_ce + 1  # the direct path ran (once a call)
        assert (fast - loop).abs().max() <= tol * loop.abs().max(), n_ce
        got[n_ce] = fast
    assert not torch.allclose(got[0], got[1], atol=1e-2) and not torch.allclose(got[1], got[2], atol=1e-2)
    # ties (the earlier slot is a main expert), auxiliary weights of zero (c = 1), "no expert" (E) among them
    tie_w = torch.tensor([[0.25, 0.5, 0.25], [0.6, 0.4, 0.0], [1.0, 0.0, 0.0], [0.3, 0.4, 0.3], [0.5, 0.5, 0.0]])
    tie_i = index.clone()
    tie_i[2, 2] = E
    for n_ce in (1, 2):
        ce = CEExperts(mod, kind, vec, n_ce, n, H, direct_pairs=0)
        with torch.no_grad():
            loop = ce(x, tie_i, tie_w.to(dtype)).float()
            ce.direct_pairs = 64
            assert (ce(x, tie_i, tie_w.to(dtype)).float() - loop).abs().max() <= tol * loop.abs().max(), n_ce
    calls.clear()
    # the direct path keeps views of the experts' weights between calls: new weights (in place, or new storage as
    # module.to() gives) are seen
    ce = CEExperts(mod, kind, vec, 1, n, H)
    with torch.no_grad():
        ce(x, index, weights)
        for t in mod.parameters():
            t.mul_(-1)
        ce.direct_pairs = 0
        loop = ce(x, index, weights).float()
        ce.direct_pairs = 64
        assert (ce(x, index, weights).float() - loop).abs().max() <= tol * loop.abs().max()
        for t in mod.parameters():
            t.data = t.data.clone() * 0.5
        ce.direct_pairs = 0
        loop = ce(x, index, weights).float()
        ce.direct_pairs = 64
        assert (ce(x, index, weights).float() - loop).abs().max() <= tol * loop.abs().max()
    calls.clear()
    ce = CEExperts(mod, kind, vec, 0, n, H, direct_pairs=14)  # 5 tokens x 3: above it, the module itself
    with torch.no_grad():
        assert torch.equal(ce(x, index, weights), mod(x, index, weights))
        if arch == "qwen3_moe":  # "no expert" (index E, weight 0) adds nothing, as in the module's own loop
            pad, wpad = index.clone(), weights.clone()
            pad[0, 2], wpad[0, 2] = E, 0
            ce.direct_pairs = 64
            assert (ce(x, pad, wpad).float() - mod(x, pad, wpad).float()).abs().max() <= tol * got[0].abs().max()
    assert len(calls) == (arch == "qwen3_moe")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_direct_path_on_aligned_and_lossless_files(lossless, aligned, tmp_path, dtype):
    """Whole models from a lossless and from an aligned (permuted, compressed) file, materialize mode: a short
    prompt (direct path) gives the logits the loop over experts gives, for n_ce = 1, 2 and 0 (full top-k)."""
    from resmoe_format.torch.ce import ce_modules, set_direct_pairs

    ids = IDS[:1, :5]  # 5 tokens x at most 3 experts: the direct path
    tol = 1e-5 if dtype == "fp32" else 3e-2
    for src in (lossless, aligned):
        for n_ce in (1, 2):
            f = _with_vectors(src, tmp_path / f"v{n_ce}.rmoe", _random_vectors(src, seed=n_ce), n_ce)
            for want_n in (None, 0):
                model = load_model(f, "materialize", dtype=dtype, n_ce=want_n)
                model.config._experts_implementation = "eager"  # grouped_mm refuses bf16 at these widths on a CPU
                assert all(m.direct_pairs >= ids.numel() * TOP_K for m in ce_modules(model))
                fast = _logits(model, ids)
                set_direct_pairs(model, 0)
                loop = _logits(model, ids)
                assert (fast - loop).abs().max() <= tol * loop.abs().max(), (src.name, n_ce, want_n)


def _reference_forward(model, vectors: dict[int, np.ndarray] | None, n_ce: int):
    """Patch a transformers Qwen3-MoE model's experts with a plain loop over the formula (module docstring of
    resmoe_format.torch.ce); ``vectors`` None: drop the auxiliary experts."""
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        vec = torch.ones(N_EXPERTS, 3, 16) if vectors is None else torch.from_numpy(vectors[i])

        def fwd(x, index, weights, ex=ex, vec=vec):
            out = torch.zeros_like(x)
            n = ex.intermediate_dim
            for t in range(x.shape[0]):
                order = sorted(range(index.shape[1]), key=lambda j: -float(weights[t, j]))
                main, aux = order[:TOP_K - n_ce], order[TOP_K - n_ce:]
                tot = sum(float(weights[t, j]) for j in aux)
                c = sum(float(weights[t, j]) / tot * vec[int(index[t, j])] for j in aux)
                for j in main:
                    e = int(index[t, j])
                    G, U, D = ex.gate_up_proj[e, :n], ex.gate_up_proj[e, n:], ex.down_proj[e]
                    h = torch.nn.functional.silu((x[t] * c[0]) @ G.T) * ((x[t] * c[2]) @ U.T) * c[1, :n]
                    out[t] += weights[t, j] * (D @ h)
            return out

        ex.forward = fwd
    return model


@pytest.mark.parametrize("n_ce", [1, 2])
def test_runtime_matches_reference_formula(lossless, ckpt, tmp_path, n_ce):
    src = hf_load(ckpt)
    full = _logits(src)
    ones = _with_vectors(lossless, tmp_path / "ones.rmoe", None or _ones(lossless), n_ce)
    assert torch.equal(_logits(load_model(ones, "materialize", dtype="fp32", n_ce=0)), full)
    dropped = _logits(_reference_forward(hf_load(ckpt), None, n_ce))
    assert not torch.allclose(dropped, full, atol=1e-3)
    assert torch.allclose(_logits(load_model(ones, "materialize", dtype="fp32")), dropped, atol=1e-5)
    vec = _random_vectors(lossless, seed=n_ce)
    rnd = _with_vectors(lossless, tmp_path / "rnd.rmoe", vec, n_ce)
    want = _logits(_reference_forward(hf_load(ckpt), vec, n_ce))
    assert not torch.allclose(want, dropped, atol=1e-3)
    for mode in ("materialize", "lazy", "fused"):
        assert torch.allclose(_logits(load_model(rnd, mode, dtype="fp32")), want, atol=1e-5), mode
        assert torch.allclose(_logits(load_model(rnd, mode, dtype="fp32", n_ce=0)), full, atol=1e-5), mode


def _ones(path: Path) -> dict[int, np.ndarray]:
    with resmoe_format.open(path) as r:
        return ones_vectors(r)


def test_compressed_rmoe_src_modes_agree(aligned, tmp_path):
    """Vectors on a compressed (not lossless) file: fused multiplies barycenter and residuals separately."""
    comp = aligned
    f = _with_vectors(comp, tmp_path / "comp_ce.rmoe", _random_vectors(comp), 1)
    ref = _logits(load_model(f, "materialize", dtype="fp32"))
    for mode in ("lazy", "fused"):
        assert torch.allclose(_logits(load_model(f, mode, dtype="fp32")), ref, atol=1e-4), mode


# --- the file ---------------------------------------------------------------------------------------------

def test_file_version_accounting_and_n_ce_choices(lossless, tmp_path):
    from resmoe_format.accounting import account

    f = _with_vectors(lossless, tmp_path / "ce.rmoe", _ones(lossless), 2)
    with resmoe_format.open(f) as r:
        r.verify()
        assert r.version == (6, 0) and {lay.ce.n_ce for lay in r.layers} == {2}
        acc = account(r)
        assert acc.bytes["compressed_experts"] == sum(N_EXPERTS * 3 * 16 * 4 for _ in r.layers)
        vec, n = read_vectors(r)
        assert n == 2 and all((v == 1).all() for v in vec.values())
    with resmoe_format.open(lossless) as r:
        assert r.version[0] == 4  # the source is unchanged
    with pytest.raises(RmoeRuntimeError, match="trained for n_ce=2"):
        load_model(f, "fused", n_ce=1)
    with pytest.raises(RmoeRuntimeError, match="no compressed experts"):
        load_model(lossless, "fused", n_ce=1)
    with pytest.raises(RmoeFormatError, match="overwrite its input"), resmoe_format.open(f) as r:
        write_with_vectors(r, f, _ones(lossless), 1)


def test_bad_files_are_refused(lossless, tmp_path):
    f = _with_vectors(lossless, tmp_path / "ce.rmoe", _ones(lossless), 1)
    name = "rmoe.layers.0.compressed_experts"

    def wrong_shape(head):
        head[name]["shape"] = [N_EXPERTS, 1, 3 * 16]

    with pytest.raises(RmoeFormatError, match=r"must be bf16/fp16/fp32 \[4, 3, 16\]"):
        resmoe_format.open(rewrite(f, tmp_path / "shape.rmoe", edit_head=wrong_shape))

    def missing(schema):
        schema["layers"][0]["compressed_experts"]["vectors"] = "rmoe.layers.0.gone"

    with pytest.raises(RmoeFormatError, match="does not hold"):
        resmoe_format.open(rewrite(f, tmp_path / "missing.rmoe", edit_schema=missing))

    def dropped(schema):  # the member gone, the tensor left: never run without it
        del schema["layers"][0]["compressed_experts"]

    with pytest.raises(RmoeFormatError, match="has no role"):
        resmoe_format.open(rewrite(f, tmp_path / "dropped.rmoe", edit_schema=dropped))

    def bad_n(schema):
        schema["layers"][0]["compressed_experts"]["n_ce"] = 0

    with pytest.raises(RmoeFormatError, match="n_ce"):
        resmoe_format.open(rewrite(f, tmp_path / "n0.rmoe", edit_schema=bad_n))
    with pytest.raises(RmoeFormatError, match=r"compressed experts need \.rmoe version 6\.0 or later; this file is "
                                              r"major version 5"):
        resmoe_format.open(rewrite(f, tmp_path / "v5.rmoe", edit_meta=lambda m: m.update(rmoe_version="5.0")))


def test_a_5x_reader_refuses(lossless, tmp_path, monkeypatch):
    from resmoe_format import schema

    f = _with_vectors(lossless, tmp_path / "ce.rmoe", _ones(lossless), 1)
    monkeypatch.setattr(schema, "READ_MAJORS", (1, 2, 3, 4, 5))
    with pytest.raises(RmoeFormatError, match=r"version 6\.0; this reader understands major versions 1, 2, 3, 4 and "
                                              r"5 only"):
        resmoe_format.open(f)


def test_top_k_checked_against_the_file(ckpt, lossless, tmp_path):
    f = _with_vectors(lossless, tmp_path / "ce3.rmoe", _ones(lossless), TOP_K)  # the format allows it ...
    with pytest.raises(RmoeRuntimeError, match="1 <= n_ce < top-k = 3"):  # ... the runtime does not
        load_model(f, "fused")


# --- exporters --------------------------------------------------------------------------------------------

def test_exporters_refuse_and_ignore_ce_exports(lossless, tmp_path, capsys):
    from converters.cli.export import main as export_main
    from converters.cli.restore import main as restore_main

    pytest.importorskip("gguf")
    f = _with_vectors(lossless, tmp_path / "ce.rmoe", _random_vectors(lossless), 1)
    for target, out in (("gguf", "m.gguf"), ("onnx", "m.onnx"), ("safetensors", "st"),
                        ("compressed-tensors", "ct")):
        extra = ["--scheme", "w8a16", "--group-size", "16"] if target == "compressed-tensors" else []
        assert export_main([str(f), "--to", target, str(tmp_path / out), *extra]) == 2
        err = capsys.readouterr().err
        assert "has compressed experts" in err and "--ignore-ce" in err and "invalid" not in err, err
        assert not (tmp_path / out).exists()
    assert restore_main([str(f), str(tmp_path / "r")]) == 2
    assert "has compressed experts" in capsys.readouterr().err
    assert export_main([str(f), "--to", "gguf", str(tmp_path / "m.gguf"), "--ignore-ce"]) == 0
    assert restore_main([str(f), str(tmp_path / "r"), "--ignore-ce"]) == 0
    from safetensors.numpy import load_file

    with resmoe_format.open(lossless) as r:
        from resmoe_format.restore import restore_all

        want = dict(restore_all(r, original_order=True))
    got = load_file(tmp_path / "r" / "model.safetensors")
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_onnx_ignore_ce_exports_full_top_k(lossless, tmp_path):
    from converters.exporters.onnx_export import export_onnx

    f = _with_vectors(lossless, tmp_path / "ce.rmoe", _random_vectors(lossless), 1)
    export_onnx(f, tmp_path / "m.onnx", ignore_ce=True)
    assert (tmp_path / "m.onnx").exists()


# --- resmoe-tune-ce ---------------------------------------------------------------------------------------

def _tune(src, out, text, **kw):
    from converters.tune_ce import TuneOptions, tune_ce

    opts = dict(n_ce=1, steps=6, lr=0.2, window=32, batch=2, device="cpu", checkpoint_every=2, objective="lm")
    opts.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tune_ce(src, out, text, TuneOptions(**opts), progress=False)


def _vectors(path):
    with resmoe_format.open(path) as r:
        return read_vectors(r)[0]


def _text_loss(path: Path, text: str, n_ce=None) -> float:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tokenizer_json()).encode(text, add_special_tokens=False).ids
    x = torch.tensor(ids[:(len(ids) // 33) * 33]).reshape(-1, 33)[:24]
    with torch.no_grad():
        logits = load_model(path, "fused", dtype="fp32", n_ce=n_ce)(input_ids=x[:, :-1], use_cache=False).logits
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)))


def test_training_lowers_the_loss_deterministic_and_resumable(ckpt, lossless, text_file, tmp_path):
    a = tmp_path / "a.rmoe"
    rep = _tune(ckpt, a, text_file, steps=4, n_ce=2)
    assert len(rep["losses"]) == 4 and Path(str(a) + ".ce-state").exists()
    text = text_file.read_text()
    ones = _with_vectors(lossless, tmp_path / "ones.rmoe", _ones(lossless), 2)
    assert _text_loss(a, text) < _text_loss(ones, text) - 1e-3
    assert _text_loss(a, text, n_ce=0) == pytest.approx(_text_loss(lossless, text), abs=1e-5)
    with resmoe_format.open(a) as r:  # a checkpoint SRC: experts kept exactly
        meth = r.schema.method["compressed_experts"]
        assert meth["n_ce"] == 2 and meth["steps"] == 4 and r.layers[0].ce.n_ce == 2
    # the same seed and model (here from its lossless .rmoe): bit for bit, also when resumed half-way
    c = tmp_path / "c.rmoe"
    _tune(lossless, c, text_file, steps=2, n_ce=2)
    rep = _tune(lossless, c, text_file, steps=4, n_ce=2, resume=True)
    assert rep["resumed_from"] == 2 and rep["losses"][:2] == _tune(lossless, tmp_path / "e.rmoe", text_file, steps=2,
                                                                   n_ce=2)["losses"]
    va, vc = _vectors(a), _vectors(c)
    assert all(np.array_equal(va[i], vc[i]) for i in va)
    d = tmp_path / "d.rmoe"
    _tune(lossless, d, text_file, steps=4, n_ce=2, seed=1)
    assert not all(np.array_equal(va[i], v) for i, v in _vectors(d).items())
    with pytest.raises(Exception, match="saved for another SRC, text or other options"):
        _tune(lossless, d, text_file, steps=6, n_ce=2, resume=True)  # d's state is seed 1's


def test_train_experts_writes_tuned_experts(ckpt, lossless, text_file, tmp_path):
    out = tmp_path / "te.rmoe"
    _tune(ckpt, out, text_file, steps=3, train_experts=True, expert_lr=1e-2)
    with resmoe_format.open(out) as r, resmoe_format.open(lossless) as r0:
        from resmoe_format.restore import restore_expert

        assert r.version == (6, 0)
        changed = [not np.array_equal(restore_expert(r, lay.index, 0)["gate"], restore_expert(r0, lay.index, 0)["gate"])
                   for lay in r.layers]
        assert any(changed)
        # the passthrough tensors are unchanged
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(r.passthrough_tensors(), r0.passthrough_tensors()))
    with pytest.raises(Exception, match="--train-experts: .* is a .rmoe file"):
        _tune(lossless, tmp_path / "x.rmoe", text_file, train_experts=True)


def spy_teacher_experts(monkeypatch) -> list[list[torch.Tensor]]:
    """The experts' values each time resmoe-tune-ce swaps SRC's experts in for the teacher (one list a step)."""
    import contextlib

    import converters.tune_ce as tc

    seen: list[list[torch.Tensor]] = []
    real = tc.swapped

    @contextlib.contextmanager
    def spy(params, values):
        with real(params, values):
            seen.append([p.detach().clone() for p in params])
            yield

    monkeypatch.setattr(tc, "swapped", spy)
    return seen


def test_distill_teacher_is_the_source_experts_full_top_k(ckpt, lossless, text_file, tmp_path, monkeypatch):
    """--objective distill with --train-experts: every step's teacher (the full top-k) runs on the experts as SRC has
    them, while the student's experts move; a teacher that moved with them could agree with the student by getting
    worse."""
    seen = spy_teacher_experts(monkeypatch)
    out = tmp_path / "dt.rmoe"
    _tune(ckpt, out, text_file, steps=3, train_experts=True, expert_lr=1e-2, objective="distill")
    assert len(seen) == 3
    with resmoe_format.open(lossless) as r0, resmoe_format.open(out) as r:
        from resmoe_format.restore import restore_expert

        moved = [not np.array_equal(restore_expert(r, lay.index, 0)["gate"], restore_expert(r0, lay.index, 0)["gate"])
                 for lay in r.layers]
    assert any(moved)  # the student's experts were trained ...
    assert all(torch.equal(a, b) for step in seen[1:] for a, b in zip(step, seen[0]))  # ... the teacher's were not


def _cli(argv, capsys):
    from converters.cli.tune_ce import main

    rc = main([*map(str, argv), "-q"])
    return rc, capsys.readouterr().err


def test_bad_input_refused_before_work(ckpt, lossless, text_file, tmp_path, capsys):
    out = tmp_path / "o.rmoe"
    cases = [
        ([ckpt, out, "--text", text_file, "--n-ce", TOP_K], "1 <= n_ce < top-k = 3"),
        ([ckpt, out, "--text", text_file, "--n-ce", 0], "1 <= n_ce < top-k"),
        ([lossless, lossless, "--text", text_file, "--n-ce", 1], "is the input"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"abc\0def" * 100)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    cases += [([ckpt, out, "--text", empty, "--n-ce", 1], "the file is empty"),
              ([ckpt, out, "--text", nul, "--n-ce", 1], "binary file"),
              ([ckpt, out, "--text", latin, "--n-ce", 1], "not UTF-8"),
              ([ckpt, out, "--text", tmp_path / "none.txt", "--n-ce", 1], "none.txt")]
    dense = build_dense_checkpoint(tmp_path / "dense")
    cases.append(([dense, out, "--text", text_file, "--n-ce", 1], "not a Mixture-of-Experts"))
    top1 = build_checkpoint("qwen3_moe", tmp_path / "top1", num_experts=N_EXPERTS,
                            overrides={"num_experts_per_tok": 1})
    cases.append(([top1, out, "--text", text_file, "--n-ce", 1], "need top-k >= 2"))
    f = _with_vectors(lossless, tmp_path / "ce.rmoe", _ones(lossless), 1)
    bad = rewrite(f, tmp_path / "bad.rmoe",
                  edit_head=lambda h: h["rmoe.layers.0.compressed_experts"].update(shape=[N_EXPERTS, 1, 48]))
    cases.append(([bad, out, "--text", text_file, "--n-ce", 1], "invalid .rmoe file"))
    for argv, msg in cases:
        rc, err = _cli(argv, capsys)
        assert rc == 2 and msg in err, (argv, err)
        assert not out.exists() and not list(tmp_path.glob(".o.rmoe*"))


def test_failed_run_leaves_no_output(ckpt, text_file, tmp_path, monkeypatch):
    import converters.tune_ce as tc
    from resmoe_format.torch import ce

    calls = {"n": 0}
    real = ce.CEExperts.forward

    def boom(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(ce.CEExperts, "forward", boom)
    out = tmp_path / "o.rmoe"
    with pytest.raises(KeyboardInterrupt):
        _tune(ckpt, out, text_file)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert tc.STATE_SUFFIX == ".ce-state"


def test_cli_end_to_end(ckpt, text_file, tmp_path, capsys):
    from converters.cli.tune_ce import main

    out = tmp_path / "cli.rmoe"
    assert main([str(ckpt), str(out), "--text", str(text_file), "--n-ce", "1", "--steps", "2", "--window", "32",
                 "--batch", "2", "--device", "cpu", "--objective", "distill"]) == 0
    o = capsys.readouterr()
    assert "wrote" in o.out and "loss" in o.out and "loss" in o.err  # the summary and the progress bar
    with resmoe_format.open(out) as r:
        meth = json.loads(json.dumps(r.schema.method))["compressed_experts"]
        assert meth["steps"] == 2 and meth["objective"] == "distill" and meth["loss_last"] > 0
    assert isinstance(next(m for m in load_model(out, "fused").modules() if isinstance(m, CEExperts)), CEExperts)


def test_spec_worked_example():
    """spec/FORMAT.md 6.8's worked example: the bytes of the vectors and the token's output."""
    from resmoe_format.torch.kinds import kind_for
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    vec = np.ones((2, 3, 2), np.float32)
    vec[1] = [[2.0, 0.5], [3.0, -1.0], [0.0, 1.0]]
    spec = (Path(__file__).parent.parent / "spec" / "FORMAT.md").read_text().replace("\u2212", "-")
    assert " ".join(vec.tobytes()[24:].hex(" ", 4).upper().split()) in spec
    cfg = Qwen3MoeConfig(hidden_size=2, moe_intermediate_size=2, num_experts=2, num_experts_per_tok=2)
    mod = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        mod.gate_up_proj[0] = torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 1]])  # gate rows, then up rows
        mod.down_proj[0] = torch.eye(2)  # (hidden, n): W_down canonical (n, hidden) transposed
    ce = CEExperts(mod, kind_for(cfg), torch.from_numpy(vec), 1, 2, 2)
    x, idx, w = torch.tensor([[1.0, -2.0]]), torch.tensor([[0, 1]]), torch.tensor([[0.7, 0.3]])
    y = ce(x, idx, w)[0].tolist()
    assert y == pytest.approx([-7.398695, -0.376518], abs=1e-6)
    assert "(-7.398695, -0.376518)" in spec and "(-0.511741, 0.333768)" in spec
    ce.vectors.data.fill_(1.0)
    assert ce(x, idx, w)[0].tolist() == pytest.approx([-0.511741, 0.333768], abs=1e-6)


def _ids(text: str, window: int = 32, rows: int = 4) -> torch.Tensor:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tokenizer_json()).encode(text, add_special_tokens=False).ids
    return torch.tensor(ids[:rows * window]).reshape(rows, window)


def _block_errors(path: Path, x: torch.Tensor) -> list[float]:
    from converters.tune_ce import block_errors
    from resmoe_format.torch.ce import ce_modules

    model = load_model(path, "materialize", dtype="fp32")
    with torch.no_grad():
        return [float(e) for e in block_errors(model, ce_modules(model), x, model_n_ce(model), [], [])]


def model_n_ce(model) -> int:
    from resmoe_format.torch.ce import ce_modules

    return ce_modules(model)[0].n_ce


def test_block_errors_by_hand(lossless, tmp_path):
    """--objective layer's per-block error: the first block's input does not depend on any experts, so its error is
    that of the first experts block between two separate runs of the model, at n_ce = 0 and at the file's n_ce."""
    from resmoe_format.torch.ce import ce_modules, set_n_ce

    f = _with_vectors(lossless, tmp_path / "r.rmoe", _random_vectors(lossless), 2)
    x = _ids(_text(600, seed=3))
    model = load_model(f, "materialize", dtype="fp32")
    outs = {}
    h = ce_modules(model)[0].register_forward_hook(lambda m, a, o: outs.__setitem__(m.n_ce, o.detach().clone()))
    with torch.no_grad():
        for n_ce in (0, 2):
            set_n_ce(model, n_ce)
            model(input_ids=x, use_cache=False)
    h.remove()
    want = float(((outs[2] - outs[0]) ** 2).sum() / (outs[0] ** 2).sum())
    got = _block_errors(f, x)
    assert len(got) == len(ce_modules(model)) and got[0] == pytest.approx(want, rel=1e-5)
    assert all(e > 0 for e in got)
    # later blocks see the full model's hidden states: vectors of ones there leave later blocks' errors unchanged
    vec = _random_vectors(lossless)
    first = min(vec)
    vec = {i: (v if i == first else np.ones_like(v)) for i, v in vec.items()}
    g = _block_errors(_with_vectors(lossless, tmp_path / "o.rmoe", vec, 2), x)
    ones = _block_errors(_with_vectors(lossless, tmp_path / "1.rmoe", _ones(lossless), 2), x)
    assert g[0] != pytest.approx(ones[0], rel=1e-3) and g[1:] == pytest.approx(ones[1:], rel=1e-6)


def test_layer_objective_lowers_block_errors_and_keeps_source_teacher(ckpt, lossless, text_file, tmp_path,
                                                                     monkeypatch):
    a = tmp_path / "a.rmoe"
    rep = _tune(lossless, a, text_file, steps=6, n_ce=2, objective="layer", lr=0.05)
    x = _ids(text_file.read_text())
    ones = _with_vectors(lossless, tmp_path / "ones.rmoe", _ones(lossless), 2)
    assert np.mean(_block_errors(a, x)) < 0.9 * np.mean(_block_errors(ones, x))
    assert rep["losses"][-1] < rep["losses"][0]
    b = tmp_path / "b.rmoe"
    assert _tune(lossless, b, text_file, steps=6, n_ce=2, objective="layer", lr=0.05)["losses"] == rep["losses"]
    with resmoe_format.open(b) as r:
        assert r.schema.method["compressed_experts"]["objective"] == "layer"
    # --train-experts: every step's targets come from the experts as SRC has them
    seen = spy_teacher_experts(monkeypatch)
    _tune(ckpt, tmp_path / "te.rmoe", text_file, steps=3, objective="layer", train_experts=True, expert_lr=1e-2)
    assert len(seen) == 3 and all(torch.equal(a, b) for step in seen[1:] for a, b in zip(step, seen[0]))


def test_cosine_schedule_and_its_resume(lossless, text_file, tmp_path, monkeypatch):
    from converters.tune_ce import lr_scale
    from resmoe_format.torch import ce

    assert lr_scale("constant", 7, 10) == 1.0
    assert lr_scale("cosine", 0, 10) == 1.0 and lr_scale("cosine", 5, 10) == pytest.approx(0.5)
    lrs: list[list[float]] = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        lrs.append([g["lr"] for g in self.param_groups])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    a = tmp_path / "a.rmoe"
    _tune(lossless, a, text_file, steps=4, n_ce=2, lr=0.1, schedule="cosine")
    assert [v[0] for v in lrs] == pytest.approx([0.1 * lr_scale("cosine", s, 4) for s in range(4)])
    assert lrs[-1][0] < lrs[0][0]
    # interrupted after the state of step 2, resumed: bit for bit the uninterrupted run
    calls, real = {"n": 0}, ce.CEExperts.forward
    n_blocks = len(_ones(lossless))

    def boom(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] > 3 * n_blocks:
            raise KeyboardInterrupt
        return real(self, *args, **kw)

    c = tmp_path / "c.rmoe"
    monkeypatch.setattr(ce.CEExperts, "forward", boom)
    with pytest.raises(KeyboardInterrupt):
        _tune(lossless, c, text_file, steps=4, n_ce=2, lr=0.1, schedule="cosine")
    monkeypatch.setattr(ce.CEExperts, "forward", real)
    assert not c.exists() and Path(str(c) + ".ce-state").exists()
    rep = _tune(lossless, c, text_file, steps=4, n_ce=2, lr=0.1, schedule="cosine", resume=True)
    assert rep["resumed_from"] == 2
    va, vc = _vectors(a), _vectors(c)
    assert all(np.array_equal(va[i], vc[i]) for i in va)
    assert not all(np.array_equal(va[i], v) for i, v in _vectors(_tune_const(lossless, tmp_path, text_file)).items())
    with pytest.raises(Exception, match="saved for another SRC, text or other options"):
        _tune(lossless, c, text_file, steps=6, n_ce=2, lr=0.1, schedule="cosine", resume=True)  # another schedule
    with pytest.raises(Exception, match="--schedule 'linear'"):
        _tune(lossless, tmp_path / "x.rmoe", text_file, schedule="linear")


def _tune_const(lossless, tmp_path, text_file) -> Path:
    out = tmp_path / "const.rmoe"
    _tune(lossless, out, text_file, steps=4, n_ce=2, lr=0.1)
    return out
