"""--method d2moe: Fisher-weighted base, activation-whitened low-rank deltas, --share-v; stored, run, refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import resmoe_format
from converters import delta
from converters.cli.convert import main as convert_main
from converters.convert import ConvertOptions, convert
from converters.encoders.d2moe import matrix_ranks, shared_whitened_svd, whitened_svd
from converters.encoders.fisher import fisher_merge
from converters.errors import ConversionError
from hf_models import ARCHS, build_checkpoint, tokenizer_json
from resmoe_format import MatrixSpec
from resmoe_format.restore import restore_expert
from resmoe_format.torch import load_model

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n" * 12)
#: architectures the default run converts end to end (the others with -m slow): one with a dense first layer,
#: shared experts and MLA, and one with expert biases (Mixtral runs in the other tests)
_FAST = ("deepseek_v3", "gpt_oss")
DECODERS = [a if a in _FAST else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS if a != "switch"]


def _experts(rng, n=3, shape=(6, 5)):
    return [{"w": torch.from_numpy(rng.standard_normal(shape).astype(np.float32))} for _ in range(n)]


def test_fisher_merge_with_equal_fisher_and_frequency_is_the_plain_average():
    rng = np.random.default_rng(0)
    ex = _experts(rng)
    same = torch.from_numpy(rng.random((6, 5)).astype(np.float32) + 0.1)
    got = fisher_merge(ex, [{"w": same} for _ in ex], np.full(3, 1 / 3))
    torch.testing.assert_close(got["w"], sum(e["w"] for e in ex) / 3, rtol=1e-6, atol=1e-6)


def test_fisher_merge_weights_each_element_by_fisher_times_frequency():
    rng = np.random.default_rng(1)
    ex = _experts(rng, 2, (2, 2))
    f = [{"w": torch.tensor([[1.0, 0.0], [3.0, 1.0]])}, {"w": torch.tensor([[1.0, 2.0], [1.0, 0.0]])}]
    freq = np.array([0.25, 0.75])
    got = fisher_merge(ex, f, freq)["w"]
    w0, w1 = ex[0]["w"], ex[1]["w"]
    want = torch.stack([
        torch.stack([(0.25 * w0[0, 0] + 0.75 * w1[0, 0]) / 1.0, w1[0, 1]]),
        torch.stack([(0.75 * w0[1, 0] + 0.75 * w1[1, 0]) / 1.5, w0[1, 1]])])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # no Fisher information anywhere for an element: the frequency-weighted mean
    zero = fisher_merge(ex, [{"w": torch.zeros(2, 2)}] * 2, freq)["w"]
    torch.testing.assert_close(zero, 0.25 * w0 + 0.75 * w1, rtol=1e-6, atol=1e-6)


def _gram(rng, dim, tokens=40):
    x = rng.standard_normal((tokens, dim)) * rng.random(dim) * 3
    return torch.from_numpy(x.T @ x)


@pytest.mark.parametrize("axis", [0, 1])
def test_whitened_svd_at_full_rank_restores_the_delta(axis):
    rng = np.random.default_rng(2)
    delta = torch.from_numpy(rng.standard_normal((12, 7)).astype(np.float32))
    part = whitened_svd(delta, _gram(rng, 7 if axis == 1 else 12), 7, axis)
    torch.testing.assert_close(part.u @ part.v, delta, rtol=1e-4, atol=1e-4)


def test_whitened_svd_truncation_minimises_the_output_error_not_the_weight_error():
    rng = np.random.default_rng(3)
    delta = torch.from_numpy(rng.standard_normal((16, 10)))
    x = torch.from_numpy(rng.standard_normal((200, 10)) * np.geomspace(10, 0.01, 10))
    w = whitened_svd(delta.float(), x.T @ x, 3, 1)
    u, s, vt = torch.linalg.svd(delta)
    plain = (u[:, :3] * s[:3]) @ vt[:3]
    out_err = {name: torch.linalg.norm((delta - d.double()) @ x.T).item()
               for name, d in (("whitened", w.u @ w.v), ("plain", plain))}
    assert out_err["whitened"] < 0.9 * out_err["plain"]


@pytest.mark.parametrize("axis", [0, 1])
def test_shared_factor_svd_at_full_rank_restores_every_delta(axis):
    rng = np.random.default_rng(4)
    deltas = [torch.from_numpy(rng.standard_normal((4, 9)).astype(np.float32)) for _ in range(3)]
    if axis == 0:
        deltas = [d.T.contiguous() for d in deltas]  # (9, 4): the input axis is 0
    parts = shared_whitened_svd(deltas, _gram(rng, 9), 9, axis)
    shared = [p.v if axis == 1 else p.u for p in parts]
    assert all(t is shared[0] for t in shared)
    for d, p in zip(deltas, parts):
        torch.testing.assert_close(p.u @ p.v, d, rtol=1e-4, atol=1e-4)


def test_ranks_follow_the_budget():
    specs = [MatrixSpec("gate", [24, 16], "bf16", 0), MatrixSpec("up", [24, 16], "bf16", 0),
             MatrixSpec("down", [24, 16], "bf16", 0)]
    assert matrix_ranks(specs, 3 * 40 * 4, 8, False) == {"gate": 4, "up": 4, "down": 4}
    # a shared (r, 16) factor costs 16 r / 8 per expert: more rank for the same budget
    assert matrix_ranks(specs, 3 * 40 * 4, 8, True) == {"gate": 6, "up": 6, "down": 6}
    # the output matrix's shared factor is its (24, r) side: 16 r of its own plus 24 r / 8, so rank 8
    assert matrix_ranks(specs, 3 * 40 * 4, 8, True, output="down") == {"gate": 6, "up": 6, "down": 8}
    # however large the budget, no rank exceeds the matrix's smaller side (the lowrank record's bound)
    assert matrix_ranks(specs, 6 * 24 * 16, 8, True, output="down") == {"gate": 16, "up": 16, "down": 16}


# ---- end to end ------------------------------------------------------------------------------------------

def _source(tmp_path, arch="mixtral", dtype="bf16", **kw):
    src = build_checkpoint(arch, tmp_path / f"{arch}_{dtype}", dtype, num_layers=3, **kw)
    (src / "tokenizer.json").write_text(tokenizer_json())
    cal = tmp_path / "cal.txt"
    cal.write_text(TEXT)
    return src, str(cal)


def _logits(path, mode, dtype="fp32"):
    ids = torch.tensor([[5, 9, 12, 30, 7, 22, 41, 3, 17, 26]])
    with torch.no_grad():
        return load_model(path, mode=mode, dtype=dtype)(input_ids=ids).logits


@pytest.mark.parametrize("arch", DECODERS)
def test_every_architecture_converts_and_runs_in_every_mode(tmp_path, arch):
    src, cal = _source(tmp_path, arch)
    out = tmp_path / "d.rmoe"
    report = convert(src, out, ConvertOptions(method="d2moe", keep=0.5, calibration=cal), progress=False)
    assert report["summary"]["expert_bytes_fraction"] <= 0.5 + 1e-3
    with resmoe_format.open(out) as r:
        for lay in r.layers:
            assert lay.base_kind == "weighted" and lay.permutations is None
            assert all(ref.encoding == "lowrank" for res in lay.residuals for m, ref in res.items()
                       if ref is not None and len(lay.matrix(m).shape) == 2)
    ref = _logits(out, "materialize")
    for mode in ("lazy", "fused"):
        got = _logits(out, mode)
        # fused multiplies by B + U V before its rounding to bf16 (spec 6.7): within that, not bit for bit
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max(), mode


@pytest.mark.parametrize("dtype", [pytest.param("bf16", marks=pytest.mark.slow), "fp32"])
def test_deterministic_and_better_than_plain_svd_at_equal_parameters(tmp_path, dtype):
    src, cal = _source(tmp_path, dtype=dtype)
    a, b = tmp_path / "a.rmoe", tmp_path / "b.rmoe"
    rep = convert(src, a, ConvertOptions(method="d2moe", keep=0.5, calibration=cal), progress=False)
    delta._MEMO.clear()  # calibrate again: the statistics themselves must be deterministic
    convert(src, b, ConvertOptions(method="d2moe", keep=0.5, calibration=cal), progress=False)
    assert a.read_bytes() == b.read_bytes()
    assert rep["method"]["name"] == "d2moe" and rep["method"]["base"] == "fisher"
    assert all(abs(sum(lay["routing_frequency"]) - 1) < 1e-9 for lay in rep["layers"])
    # fp32: fused computes with exactly the restored weights
    if dtype == "fp32":
        torch.testing.assert_close(_logits(a, "fused"), _logits(a, "materialize"), rtol=1e-4, atol=1e-4)


def test_share_v_stores_one_input_factor_per_matrix_as_version_5(tmp_path):
    src, cal = _source(tmp_path)
    out = tmp_path / "s.rmoe"
    rep = convert(src, out, ConvertOptions(method="d2moe", keep=0.5, calibration=cal, share_v=True), progress=False)
    with resmoe_format.open(out) as r:
        assert r.version == (5, 0)
        lay = r.layers[0]
        for m in ("gate", "up"):
            assert len({res[m].tensors["v"] for res in lay.residuals}) == 1
            assert len({res[m].tensors["u"] for res in lay.residuals}) == lay.num_experts
        assert len({res["down"].tensors["u"] for res in lay.residuals}) == 1
        restored = restore_expert(r, lay.index, 1)
        assert set(restored) == {"gate", "up", "down"}
    assert rep["summary"]["expert_bytes_fraction"] <= 0.5 + 1e-3
    torch.testing.assert_close(_logits(out, "fused", "fp32"), _logits(out, "materialize", "fp32"),
                               rtol=0.05, atol=0.05)
    assert torch.equal(_logits(out, "lazy", "fp32"), _logits(out, "fused", "fp32"))  # lazy: fused's products


def test_a_version_4_file_may_not_share_a_factor_across_experts(tmp_path):
    from filecraft import rewrite

    src, cal = _source(tmp_path)
    out = tmp_path / "s.rmoe"
    convert(src, out, ConvertOptions(method="d2moe", keep=0.5, calibration=cal, share_v=True), progress=False)
    bad = tmp_path / "v4.rmoe"

    def meta(m):
        m["rmoe_version"] = "4.0"
    rewrite(out, bad, edit_meta=meta)
    with pytest.raises(resmoe_format.RmoeFormatError, match="shared by several experts needs .rmoe version 5.0"):
        resmoe_format.open(bad)


# ---- bad input ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _source(tmp_path_factory.mktemp("small"))


@pytest.mark.parametrize("args, message", [
    (["--method", "d2moe", "--keep", "0.5"], "give --calibration FILE.txt"),
    (["--method", "d2moe", "--calibration", "CAL", "--keep", "0.26"], "not rank 1 of any delta"),
    (["--method", "d2moe", "--calibration", "CAL", "--rank", "0"], "--rank must be a positive integer"),
    (["--method", "d2moe", "--calibration", "CAL", "--delta-format", "csr16"], "must be auto or lowrank"),
    (["--method", "d2moe", "--calibration", "CAL", "--lossless"], "not available with --method d2moe"),
    (["--method", "svd", "--bits", "3"], "--bits applies to --method resmoe, quant and d2moe"),
    (["--share-v"], "--share-v is a D²-MoE option"),
    (["--allow-unrouted-experts"], "--allow-unrouted-experts is a D²-MoE option"),
    (["--method", "d2moe", "--calibration", "CAL", "--prune-base", "1.5"], "--prune-base must be a fraction"),
])
def test_bad_flags_are_refused_before_any_output(tmp_path, small, capsys, args, message):
    src, cal = small
    out = tmp_path / "x.rmoe"
    args = [cal if a == "CAL" else a for a in args]
    assert convert_main([str(src), str(out), "-q", *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_text_that_leaves_an_expert_without_tokens_names_it(tmp_path, small):
    src, _ = small
    cal = tmp_path / "same.txt"
    cal.write_text("a" * 300)  # one token repeated: every position routes to the same experts in layer 0
    out = tmp_path / "x.rmoe"
    with pytest.raises(ConversionError, match=r"routes no token to expert\(s\) \d"):
        convert(src, out, ConvertOptions(method="d2moe", keep=0.5, calibration=str(cal)), progress=False)
    assert not out.exists()
    # a dead expert (no text reaches it): converted on request, with no Fisher weight and an unwhitened delta
    rep = convert(src, out, ConvertOptions(method="d2moe", keep=0.5, calibration=str(cal), allow_unrouted_experts=True),
                  progress=False)
    assert rep["layers"][0]["unrouted_experts"] and all(np.isfinite(e) for lay in rep["layers"]
                                                        for st in lay["matrices"].values() for e in st["rel_error"])
    torch.testing.assert_close(_logits(out, "fused"), _logits(out, "materialize"), rtol=0.05, atol=0.05)


def test_a_zero_gram_whitens_by_the_identity():
    from converters.encoders.d2moe import whitening

    s, s_inv = whitening(torch.zeros(5, 5))
    assert torch.equal(s, torch.eye(5, dtype=torch.float64)) and torch.equal(s_inv, s)


def test_report_json_round_trips(tmp_path, small):
    src, cal = small
    rep_path = tmp_path / "r.json"
    assert convert_main([str(src), str(tmp_path / "o.rmoe"), "-q", "--method", "d2moe", "--calibration", cal,
                         "--keep", "0.5", "--report", str(rep_path)]) == 0
    rep = json.loads(rep_path.read_text())
    assert rep["calibration"]["tokens"] and rep["method"]["share_v"] is False


# ---- --prune-base ------------------------------------------------------------------------------------------

def test_pruned_count_uses_multiples_of_64_where_the_size_allows():
    from converters.encoders.d2moe import pruned_count

    assert pruned_count(2048, 0.3) == 576 and pruned_count(24, 0.5) == 12 and pruned_count(100, 0.9) == 90
    assert pruned_count(4, 0.99) == 3  # one channel stays


@pytest.mark.parametrize("dtype", ["bf16", pytest.param("fp32", marks=pytest.mark.slow)])
def test_prune_base_removes_channels_from_the_stored_base_and_runs_in_every_mode(tmp_path, dtype):
    src, cal = _source(tmp_path, dtype=dtype)
    plain, pruned = tmp_path / "p.rmoe", tmp_path / "q.rmoe"
    convert(src, plain, ConvertOptions(method="d2moe", keep=0.5, calibration=cal), progress=False)
    rep = convert(src, pruned, ConvertOptions(method="d2moe", keep=0.5, calibration=cal, prune_base=0.5,
                                              share_v=True), progress=False)
    assert rep["method"]["prune_base"] == 0.5
    with resmoe_format.open(plain) as a, resmoe_format.open(pruned) as b:
        assert b.version == (5, 0)
        for la, lb in zip(a.layers, b.layers):
            c = b.base_channels(lb.index)
            assert c.size == lb.num_neurons - lb.num_neurons // 2 and np.all(np.diff(c) > 0)
            for m in ("gate", "up", "down"):
                assert b.tensor(lb.base[m].tensors["values"]).shape[0] == c.size
                full = b.base(lb.index, m)
                dropped = np.setdiff1d(np.arange(lb.num_neurons), c)
                assert not full[dropped].any()
            # the freed base parameters went to the deltas: higher rank at the same budget
            assert (lb.residuals[0]["gate"].params["rank"] > la.residuals[0]["gate"].params["rank"])
    assert rep["summary"]["keep"] <= 0.5 + 1e-3
    ref = _logits(pruned, "materialize")
    tol = 1e-4 if dtype == "fp32" else 0.05  # fp32: fused multiplies by exactly the restored weights
    assert (_logits(pruned, "fused") - ref).abs().max() <= tol * max(1.0, ref.abs().max())
    assert torch.equal(_logits(pruned, "lazy"), _logits(pruned, "fused"))  # lazy: fused's products, built later


@pytest.mark.slow
def test_pruned_and_shared_files_export_to_onnx_and_round_trip_gguf_rmoe(tmp_path):
    from converters.exporters.onnx_export import export_onnx
    from test_export_onnx import assert_matches

    src, cal = _source(tmp_path, dtype="fp32")
    out = tmp_path / "q.rmoe"
    convert(src, out, ConvertOptions(method="d2moe", keep=0.5, calibration=cal, prune_base=0.5, share_v=True),
            progress=False)
    onnx_path = export_onnx(out, tmp_path / "m.onnx", "lowrank")
    assert_matches(onnx_path, out, "fused")
    from converters.cli.export import main as export_main

    assert export_main([str(out), "--to", "gguf-rmoe", str(tmp_path / "q.gguf")]) == 0
    assert export_main([str(tmp_path / "q.gguf"), "--to", "rmoe", str(tmp_path / "back.rmoe")]) == 0
    assert (tmp_path / "back.rmoe").read_bytes() == out.read_bytes()


def test_a_version_4_file_may_not_prune_base_channels(tmp_path):
    from filecraft import rewrite

    src, cal = _source(tmp_path)
    out = tmp_path / "q.rmoe"
    convert(src, out, ConvertOptions(method="d2moe", keep=0.5, calibration=cal, prune_base=0.5), progress=False)

    def meta(m):
        m["rmoe_version"] = "4.0"
    rewrite(out, tmp_path / "v4.rmoe", edit_meta=meta)
    with pytest.raises(resmoe_format.RmoeFormatError, match="pruned channels needs .rmoe version 5.0"):
        resmoe_format.open(tmp_path / "v4.rmoe")


def test_hostile_base_channels_are_refused(tmp_path):
    from filecraft import rewrite, split

    src, cal = _source(tmp_path, dtype="fp32")
    out = tmp_path / "q.rmoe"
    convert(src, out, ConvertOptions(method="d2moe", keep=0.5, calibration=cal, prune_base=0.5), progress=False)
    with resmoe_format.open(out) as r:
        name = r.layers[0].base_channels
        c = r.tensor(name).copy()
    bad = c.copy()
    bad[1] = bad[0]  # not strictly increasing

    start, end = split(out)[0][name]["data_offsets"]

    def data(buf):
        buf[start:end] = bad.tobytes()
        return buf
    rewrite(out, tmp_path / "bad.rmoe", edit_data=data)
    with resmoe_format.open(tmp_path / "bad.rmoe", verify_checksums=False) as r:
        with pytest.raises(resmoe_format.RmoeFormatError, match="strictly increasing"):
            r.base(r.layers[0].index, "gate")


# ---- --bits ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bf16", pytest.param("fp32", marks=pytest.mark.slow)])
def test_bits_quantizes_the_fisher_base_and_whitened_factors_within_the_budget(tmp_path, dtype):
    src, cal = _source(tmp_path, dtype=dtype, num_experts=8)
    out = tmp_path / "b.rmoe"
    rep = convert(src, out, ConvertOptions(method="d2moe", bits=3.0, calibration=cal), progress=False)
    alloc = rep["allocation"]
    assert alloc["bits_per_expert_weight"] <= 3.0 and rep["method"]["base"] == "fisher"
    with resmoe_format.open(out) as r:
        assert r.version == (3, 0)
        kinds = {lay.base_kind for lay in r.layers}
        assert kinds <= {"weighted", "none"}
        for lay in r.layers:
            assert lay.permutations is None
            for m, b in lay.base.items():  # residuals over a Fisher base are low rank (or none); a matrix
                if b.encoding == "lowrank" and b.params["rank"] == 0:  # without a base is stored directly
                    continue
                assert all(res[m] is None or res[m].encoding == "lowrank" for res in lay.residuals)
        from resmoe_format.accounting import account
        acc = account(r)
        assert acc.expert_bytes == alloc["expert_bytes"]
    ref = _logits(out, "materialize")
    for mode in ("lazy", "fused"):
        assert (_logits(out, mode) - ref).abs().max() <= 0.05 * max(1.0, ref.abs().max()), mode


def test_bits_with_share_v_is_refused(tmp_path, small, capsys):
    src, cal = small
    assert convert_main([str(src), str(tmp_path / "x.rmoe"), "-q", "--method", "d2moe", "--calibration", cal,
                         "--bits", "3", "--share-v"]) == 2
    assert "not available with it yet" in capsys.readouterr().err


@pytest.mark.slow
def test_bits_keeps_the_fisher_base_where_experts_share_most_of_their_weights(tmp_path):
    """Experts that are one expert plus small noise: the allocator keeps the base and low-rank deltas."""
    from safetensors.torch import load_file, save_file

    src, cal = _source(tmp_path)
    f = src / "model.safetensors"
    t = load_file(f)
    g = torch.Generator().manual_seed(0)
    for key in [k for k in t if ".experts.0." in k]:
        for e in range(1, 4):
            w = t[key].float()
            t[key.replace(".experts.0.", f".experts.{e}.")] = (w + 0.05 * w.std() * torch.randn(w.shape, generator=g)
                                                               ).to(t[key].dtype)
    save_file(t, f, metadata={"format": "pt"})
    out = tmp_path / "b.rmoe"
    rep = convert(src, out, ConvertOptions(method="d2moe", bits=2.5, calibration=cal), progress=False)
    assert rep["allocation"]["bits_per_expert_weight"] <= 2.5
    with resmoe_format.open(out) as r:
        weighted = [lay for lay in r.layers if lay.base_kind == "weighted"]
        assert weighted
        assert any(ref is not None and ref.encoding == "lowrank" and ref.params["rank"] > 0
                   for lay in weighted for res in lay.residuals for ref in res.values())


def test_an_encoder_decoder_model_is_refused_before_any_work(tmp_path):
    src = build_checkpoint("switch", tmp_path / "switch", "fp32")
    (src / "tokenizer.json").write_text(tokenizer_json())
    cal = tmp_path / "cal.txt"
    cal.write_text(TEXT)
    out = tmp_path / "x.rmoe"
    with pytest.raises(ConversionError, match="decoder-only"):
        convert(src, out, ConvertOptions(method="d2moe", keep=0.5, calibration=str(cal)), progress=False)
    assert not out.exists()
