"""``--bits``: the allocator, the k-quant encoder (data-free and GPTQ), and resmoe-convert end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import resmoe_format
from converters.cli.convert import main as convert_main
from converters.convert import ConvertOptions, convert
from converters.encoders import kq_torch
from converters.encoders.bits import record_bytes
from converters.encoders.allocate import (BASE, DIRECT, RESIDUAL, LayerTable, MatrixTable, allocate, min_bytes,
                                          residual_form, total_bytes, total_error)
from converters.errors import ConversionError
from resmoe_format import accounting
from resmoe_format.codecs import kquant
from resmoe_format.restore import restore_matrix
from hf_models import build_checkpoint, tokenizer_json

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 3


# ---- allocator ------------------------------------------------------------------------------

def _table(index: int, experts: int, n: int, scale: float, base_helps: bool, rng) -> LayerTable:
    """Errors that fall with bytes as a real quantizer's do (x 4 per bit)."""
    db = np.array([kquant.nbytes(n, w, kquant.KqLayout()) for w in DIRECT])
    bits = np.array([1.6, 2, 3, 4, 5, 6, 8])
    direct = scale * n * 4.0 ** (-bits)[None, :] * rng.uniform(0.5, 2, (experts, 1))
    mt = MatrixTable("w", db, direct)
    mt.base_bytes = {w: kquant.nbytes(n, w, kquant.KqLayout()) for w in BASE}
    mt.residual_bytes = np.array([record_bytes((64, n // 64), w) for w in RESIDUAL])
    wbits = {"ternary": 1.6, "q2": 2, "q3": 3, "q4": 4, "q5": 5, "q6": 6}
    # a dense residual's error falls 4x per bit; a sparse or low-rank one also loses what it leaves out
    rel = np.array([1.0 if w is None else
                    4.0 ** -wbits[residual_form(w).width]
                    + (1 - (residual_form(w).density or residual_form(w).rank or 1.0)) ** 2
                    for w in RESIDUAL])
    share = 0.1 if base_helps else 1.0
    for w, bb in zip(BASE, (2, 3, 4, 6)):
        mt.residual_error[w] = scale * n * (share * rel[None, :] + 4.0 ** -bb * 0.01) \
            * rng.uniform(0.5, 2, (experts, 1))
    return LayerTable(index, experts * 2 * 32, [mt])


@pytest.mark.parametrize("base_helps", [True, False])
def test_allocation_fits_the_budget_and_error_falls_with_it(base_helps):
    rng = np.random.default_rng(0)
    tables = [_table(i, 8, 4096, 1.0 + i, base_helps, rng) for i in range(3)]
    weights = 3 * 8 * 4096
    errors = []
    for bits in (2.0, 2.5, 3.0, 4.0, 6.0):
        budget = int(bits * weights // 8)
        choices, _ = allocate(tables, budget)
        assert total_bytes(tables, choices) <= budget
        assert total_bytes(tables, choices) > 0.97 * budget  # the greedy pass spends what is left
        errors.append(total_error(choices))
        assert all(c.uses_base == base_helps for c in choices)
    assert errors == sorted(errors, reverse=True)


def test_allocation_below_the_cheapest_raises():
    rng = np.random.default_rng(1)
    tables = [_table(0, 4, 1024, 1.0, False, rng)]
    with pytest.raises(ValueError, match="no allocation fits"):
        allocate(tables, min_bytes(tables) - 1)
    choices, _ = allocate(tables, min_bytes(tables))
    assert total_bytes(tables, choices) == min_bytes(tables)


# ---- the torch quantizer ---------------------------------------------------------------------

@pytest.mark.parametrize("width", kquant.KQ_DTYPES)
def test_torch_quantizer_restores_what_the_file_restores(width):
    """The values the converter measures are bit for bit what a reader decodes from its parts."""
    x = torch.randn(24, 40)  # 960 values: groups and super-blocks end inside the matrix
    q = kq_torch.rtn(x, width, kquant.KqLayout(64, 4, 6))
    parts = q.parts(width, kquant.KqLayout(64, 4, 6))
    got = kquant.values_of(parts, x.numel(), width, kquant.KqLayout(64, 4, 6)).reshape(x.shape)
    assert np.array_equal(got, q.values.numpy())


@pytest.mark.parametrize("axis", [1, 0])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(axis):
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    k = 64 if axis == 1 else 32
    x = torch.randn(2000, k) @ torch.randn(k, k)
    h = x.T @ x / len(x)
    for width in ("q2", "q3", "q4"):
        r = kq_torch.rtn(w, width, kquant.KqLayout())
        g = kq_torch.gptq(w, h, axis, width, kquant.KqLayout())
        assert kq_torch.output_error(g.values - w, h, axis) < 0.9 * kq_torch.output_error(r.values - w, h, axis)
        codes = kquant.values_of(g.parts(width, kquant.KqLayout()), w.numel(), width, kquant.KqLayout())
        assert np.array_equal(codes.reshape(w.shape), g.values.numpy())


# ---- end to end ----------------------------------------------------------------------------------

def upcycled(src: Path, noise: float = 0.05) -> Path:
    """Make every expert of a saved mixtral checkpoint a permuted copy of expert 0 plus noise."""
    f = src / "model.safetensors"
    t = load_file(f)
    g = torch.Generator().manual_seed(0)
    perms = {e: torch.randperm(t[next(k for k in t if ".experts.0.w1." in k)].shape[0], generator=g)
             for e in range(1, 4)}  # one neuron permutation per expert, shared by its matrices
    for key in [k for k in t if ".experts.0." in k]:
        for e, perm in perms.items():
            base = t[key].float()
            base = base[:, perm] if ".w2." in key else base[perm]
            t[key.replace(".experts.0.", f".experts.{e}.")] = (
                base + noise * base.std() * torch.randn(base.shape, generator=g)).to(t[key].dtype)
    save_file(t, f, metadata={"format": "pt"})
    return src


@pytest.fixture(scope="module")
def upcycled_bf16(tmp_path_factory) -> Path:
    return upcycled(build_checkpoint("mixtral", tmp_path_factory.mktemp("up") / "ckpt", "bf16"))


def _check_file(out: Path, report: dict, bits: float) -> None:
    weights = report["allocation"]["expert_weights"]
    with resmoe_format.open(out) as r:
        acc = accounting.account(r)
        assert acc.expert_bytes * 8 / weights <= bits
        assert acc.expert_bytes == report["allocation"]["expert_bytes"]
        r.verify()
        assert r.version[0] == 3
        for lay in report["layers"]:
            for name, st in lay["matrices"].items():
                assert len(st["value_dtypes"]) == lay["num_experts"]
                for e, rel in enumerate(st["rel_error"]):
                    assert np.isfinite(rel) and rel < 1
                # the report's error is measured on what the file restores
                w = restore_matrix(r, lay["index"], 0, name).astype(np.float64)
                assert w.shape == tuple(st["shape"])


@pytest.mark.parametrize("method, dtype", [("resmoe", "bf16"), ("quant", "fp32"),
                                           pytest.param("resmoe", "fp32", marks=pytest.mark.slow),
                                           pytest.param("quant", "bf16", marks=pytest.mark.slow)])
def test_bits_end_to_end(tmp_path, dtype, method):
    src = build_checkpoint("mixtral", tmp_path / "src", dtype)
    out = tmp_path / "m.rmoe"
    report = convert(src, out, ConvertOptions(method=method, bits=4.0), progress=False)
    _check_file(out, report, 4.0)
    assert report["allocation"]["bits_per_expert_weight"] > 3.8  # the budget is spent, not wasted
    from resmoe_format.torch import load_model

    model = load_model(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits).all()


def test_base_is_kept_where_it_pays_and_beats_plain_quantization(tmp_path, upcycled_bf16):
    errs = {}
    for method in ("resmoe", "quant"):
        out = tmp_path / f"{method}.rmoe"
        report = convert(upcycled_bf16, out, ConvertOptions(method=method, bits=3.0), progress=False)
        _check_file(out, report, 3.0)
        errs[method] = report["summary"]["rel_error_mean"]
        if method == "resmoe":
            assert all(lay["base"] for lay in report["layers"])
            assert not any(w and "@" in w for lay in report["layers"] for st in lay["matrices"].values()
                           for w in st["value_dtypes"])  # sparse residuals only with --sparse-residuals
    assert errs["resmoe"] < 0.7 * errs["quant"]


@pytest.mark.slow
def test_base_is_dropped_where_it_does_not_pay(tmp_path):
    """Unrelated experts: resmoe --bits allocates as --method quant does, never worse."""
    src = build_checkpoint("mixtral", tmp_path / "src", "bf16")
    reports = {m: convert(src, tmp_path / f"{m}.rmoe", ConvertOptions(method=m, bits=3.0), progress=False)
               for m in ("resmoe", "quant")}
    assert reports["resmoe"]["allocation"]["predicted_error"] <= reports["quant"]["allocation"]["predicted_error"]


def test_calibrated_bits_runs_gptq_on_routed_inputs(tmp_path, upcycled_bf16):
    src = tmp_path / "src"
    src.mkdir()
    for f in upcycled_bf16.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "tokenizer.json").write_text(tokenizer_json())
    cal = tmp_path / "cal.txt"
    cal.write_text(TEXT)
    out = tmp_path / "m.rmoe"
    report = convert(src, out, ConvertOptions(bits=3.0, calibration=str(cal)), progress=False)
    _check_file(out, report, 3.0)
    assert report["method"]["calibration"] == "gptq"
    assert report["allocation"]["error_measure"].startswith("output")
    tokens = report["allocation"]["calibration"]
    assert set(tokens) == {"0", "1"} and all(v["tokens"] == len(TEXT) for v in tokens.values())
    st = report["layers"][0]["matrices"]["down"]
    assert len(st["output_error"]) == 4 and all(np.isfinite(st["output_error"]))


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    src = build_checkpoint("mixtral", tmp_path_factory.mktemp("small") / "ckpt", "bf16")
    (src / "tokenizer.json").write_text(tokenizer_json())
    return src


@pytest.mark.parametrize("args, message", [
    (["--bits", "3", "--keep", "0.25"], "do not combine it with --keep"),
    (["--bits", "0.5"], "below what the cheapest encoding reaches"),
    (["--bits", "16"], "not below the source's 16 bits"),
    (["--bits", "nan"], "positive number"),
    (["--method", "quant"], "--method quant quantizes to a bit budget"),
    (["--method", "prune", "--bits", "3"], "--bits applies to --method resmoe, quant and d2moe"),
    (["--bits", "3", "--value-dtype", "int8"], "do not combine it with --value-dtype"),
    (["--bits", "3", "--residual", "svd"], "do not combine it with --residual"),
    (["--calibration", "CAL"], "give --bits too"),
    (["--sparse-residuals"], "--sparse-residuals is a choice of the --bits allocator"),
    (["--sparse-residuals", "--bits", "3", "--method", "quant"], "--sparse-residuals is a choice of the --bits"),
    (["--lowrank-residuals"], "--lowrank-residuals is a choice of the --bits allocator"),
])
def test_bad_bits_flags(tmp_path, small, capsys, args, message):
    out = tmp_path / "m.rmoe"
    args = [str(tmp_path / "cal.txt") if a == "CAL" else a for a in args]
    (tmp_path / "cal.txt").write_text(TEXT)
    assert convert_main([str(small), str(out), "-q", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cal.txt"]


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"  \n\n", "the file is empty"),
    (b"abc\x00def" * 100, "binary file"),
    (b"\xff\xfe" + b"a" * 500, "not UTF-8 text"),
    (b"short text", "yields 10 tokens; one expert needs at least"),
])
def test_bad_calibration_file(tmp_path, small, capsys, content, message):
    cal = tmp_path / "cal.txt"
    cal.write_bytes(content)
    out = tmp_path / "m.rmoe"
    assert convert_main([str(small), str(out), "-q", "--bits", "3", "--calibration", str(cal)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_calibration_needs_a_tokenizer(tmp_path):
    src = build_checkpoint("mixtral", tmp_path / "src", "bf16")
    cal = tmp_path / "cal.txt"
    cal.write_text(TEXT)
    with pytest.raises(ConversionError, match="no tokenizer.json"):
        convert(src, tmp_path / "m.rmoe", ConvertOptions(bits=3.0, calibration=str(cal)), progress=False)
    assert not (tmp_path / "m.rmoe").exists()


def test_report_lists_every_choice(tmp_path, small):
    out, rep = tmp_path / "m.rmoe", tmp_path / "r.json"
    assert convert_main([str(small), str(out), "-q", "--bits", "2.5", "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    a = report["allocation"]
    assert a["bits_per_expert_weight"] <= 2.5 and a["layout"] == {"scheme": "kquant", "group": 64, "super": 4,
                                                                   "scale_bits": 6}
    for lay in report["layers"]:
        for st in lay["matrices"].values():
            assert all(w in DIRECT or w is None for w in st["value_dtypes"])
            assert st["base"] in (None, *BASE)


def test_calibration_without_transformers_is_refused_before_any_work(tmp_path, small, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    cal = tmp_path / "cal.txt"
    cal.write_text(TEXT)
    with pytest.raises(ConversionError, match=r"--calibration runs the source model in transformers: pip install"):
        convert(small, tmp_path / "m.rmoe", ConvertOptions(bits=3.0, calibration=str(cal)), progress=False)
    assert not (tmp_path / "m.rmoe").exists()


# ---- sparse residuals: a bitmap of the largest entries, values at a low width ----------------------

@pytest.mark.parametrize("label", [lab for lab in RESIDUAL if lab and "@" in lab and "@r" not in lab])
@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_residual_measured_is_what_the_record_restores(label, weighted):
    from resmoe_format import codecs
    from converters.encoders.bits import record_bytes, residual_values, sparse_record

    g = torch.Generator().manual_seed(3)
    r = torch.randn(3, 24, 40, generator=g)  # 960 values: not whole groups or super-blocks
    imp = torch.rand(3, 24, 40, generator=g) + 0.1 if weighted else None
    measured = residual_values(r, label, imp)
    for e in range(3):
        rec, restored = sparse_record(r[e], label, None if imp is None else imp[e], (24, 40))
        assert rec.encoding == "bitmap" and rec.nbytes == record_bytes((24, 40), label)
        decoded = codecs.decode(rec)
        assert np.array_equal(decoded, restored.numpy()) and np.array_equal(decoded, measured[e].numpy())
        density = float(label.split("@")[1])
        assert rec.params["nnz"] == round(density * 960) == int((decoded != 0).sum())
        # the kept entries are the largest (importance-weighted) ones
        score = (r[e] ** 2 if imp is None else r[e] ** 2 * imp[e]).reshape(-1)
        mask = np.unpackbits(rec.parts["mask"], bitorder="little")[:960].astype(bool)
        assert float(score[torch.from_numpy(mask)].min()) >= float(score[torch.from_numpy(~mask)].max())


def _source_matrix(src: Path, layer: int, expert: int, name: str) -> np.ndarray:
    from converters.architectures import adapter_for
    from converters.checkpoint import Checkpoint
    from converters.disassemble import expert_matrices

    with Checkpoint(src) as ck:
        lay = next(lay for lay in adapter_for(ck.config, ck.tensors).moe_layers() if lay.index == layer)
        return expert_matrices(lay, ck.get)[expert][name].double().numpy()


def _check_sparse_choices(out: Path, report: dict, src: Path) -> None:
    """Sparse residuals were chosen, are stored as bitmaps, and every report error is what the file restores."""
    chosen = [w for lay in report["layers"] for st in lay["matrices"].values() for w in st["value_dtypes"]]
    assert any(w and "@" in w for w in chosen)
    with resmoe_format.open(out) as r:
        encodings = {ref.encoding for lay in r.layers for res in lay.residuals for ref in res.values()
                     if ref is not None}
        assert "bitmap" in encodings
        _check_report_errors(r, report, src)


def _check_report_errors(r, report: dict, src: Path) -> None:
    """Every error in the report is the one the file restores (against the source's own matrices)."""
    for lay in report["layers"]:
        for name, st in lay["matrices"].items():
            for e, rel in enumerate(st["rel_error"]):
                got = restore_matrix(r, lay["index"], e, name, original_order=True).astype(np.float64)
                truth = _source_matrix(src, lay["index"], e, name)
                assert rel == pytest.approx(np.linalg.norm(truth - got) / np.linalg.norm(truth), rel=1e-6)


@pytest.mark.slow
def test_sparse_residuals_are_chosen_where_they_pay(tmp_path, upcycled_bf16):
    out = tmp_path / "m.rmoe"
    report = convert(upcycled_bf16, out, ConvertOptions(bits=3.0, sparse_residuals=True), progress=False)
    _check_file(out, report, 3.0)
    _check_sparse_choices(out, report, upcycled_bf16)


@pytest.mark.parametrize("label", [lab for lab in RESIDUAL if lab and "@r" in lab])
def test_lowrank_residual_measured_is_what_the_record_restores(label):
    from resmoe_format import codecs
    from converters.encoders.allocate import rank_of
    from converters.encoders.bits import lowrank_record, record_bytes, residual_values

    g = torch.Generator().manual_seed(4)
    r = torch.randn(3, 24, 40, generator=g)
    measured = residual_values(r, label, None)
    k = rank_of((24, 40), residual_form(label).rank)
    for e in range(3):
        rec, restored = lowrank_record(r[e], label)
        assert rec.encoding == "lowrank" and rec.params["rank"] == k and rec.nbytes == record_bytes((24, 40), label)
        assert np.array_equal(codecs.decode(rec), restored.numpy())
        # the allocator's measurement is the same factors multiplied in torch: equal to float32 rounding
        np.testing.assert_allclose(restored.numpy(), measured[e].numpy(), rtol=0, atol=1e-5)
        # and it is the truncated SVD, up to the factors' quantization
        u, s, vh = torch.linalg.svd(r[e].double())
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert np.linalg.norm(restored.numpy() - best.numpy()) < 0.5 * np.linalg.norm(best.numpy())


@pytest.mark.slow
def test_lowrank_residuals_are_stored_as_chosen(tmp_path, upcycled_bf16):
    out = tmp_path / "m.rmoe"
    report = convert(upcycled_bf16, out, ConvertOptions(bits=2.0, lowrank_residuals=True), progress=False)
    _check_file(out, report, 2.0)
    chosen = [w for lay in report["layers"] for st in lay["matrices"].values() for w in st["value_dtypes"]]
    assert any(w and "@r" in w for w in chosen), chosen
    with resmoe_format.open(out) as r:
        assert "lowrank" in {ref.encoding for lay in r.layers for res in lay.residuals for ref in res.values()
                             if ref is not None}
        _check_report_errors(r, report, upcycled_bf16)
