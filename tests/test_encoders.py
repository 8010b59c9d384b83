"""Encoders in isolation: budgets, pruning, SVD, and ResMoE vs the baselines on upcycled experts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from converters.encoders import get_encoder
from converters.encoders.budget import Budget
from converters.encoders.compress import prune, svd, top_mask
from converters.encoders.methods import EncoderOptions
from converters.errors import ConversionError
from resmoe_format import MatrixSpec

SPECS = [MatrixSpec("gate", (24, 16), "fp32", 0), MatrixSpec("up", (24, 16), "fp32", 0),
         MatrixSpec("down", (24, 16), "fp32", 0)]
P = 3 * 24 * 16


def upcycled(E=4, n=24, h=16, noise=0.05, seed=0, specs=SPECS):
    """Experts that are neuron-permuted copies of one base plus noise (as upcycled MoEs are)."""
    g = torch.Generator().manual_seed(seed)
    base = {m.name: torch.randn(m.shape, generator=g) for m in specs}
    out = []
    for _ in range(E):
        p = torch.randperm(n, generator=g)
        out.append({m.name: (base[m.name][p] if m.neuron_axis == 0 else base[m.name])
                    + noise * torch.randn(m.shape, generator=g) for m in specs})
    return out


def test_top_mask_exact_count_deterministic_ties_and_no_zeros():
    a = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.0, 0.0])
    assert top_mask(a, 3).tolist() == [True, False, True, True, False, False, False]
    assert int(top_mask(a, 100).sum()) == 5  # zeros are never kept
    assert not top_mask(a, 0).any()
    x = torch.randn(50, 40).abs()
    for k in (1, 17, 1999, 2000):
        assert int(top_mask(x, k).sum()) == k


def test_budget_semantics():
    b = Budget.of(0.25, None)
    assert b.residual_params(P, 8, P) == int((0.25 - 1 / 8) * P)  # F - 1/E of each expert
    assert b.residual_params(P, 8, 0) == int(0.25 * P)  # no base: F each
    assert Budget.of(None, 0.25).residual_params(P, 8, P) == int(0.25 * P)  # the paper's convention
    assert Budget.of(None, None).keep == 0.25
    with pytest.raises(ConversionError, match="below what the shared base"):
        Budget.of(0.1, None).residual_params(P, 8, P)
    with pytest.raises(ConversionError, match=r"^the default --keep 0.25 is below"):  # the user gave no --keep
        Budget.of(None, None).residual_params(P, 2, P)
    with pytest.raises(ConversionError, match=r"^--keep 0.25 is below"):
        Budget.of(0.25, None).residual_params(P, 2, P)
    assert Budget.of(0.125, None).residual_params(P, 8, P) == 0  # exactly the barycenter
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConversionError, match=r"\(0, 1\]"):
            Budget.of(bad, None)
    with pytest.raises(ConversionError, match="exactly one"):
        Budget(0.2, 0.2)


@pytest.mark.parametrize("scope", ["expert", "matrix"])
def test_prune_keeps_the_budget(scope):
    r = upcycled(E=1)[0]
    parts = prune(r, SPECS, 500, scope)
    kept = sum(p.params for p in parts.values())
    assert kept <= 500 and kept >= 500 - 3
    if scope == "expert":  # one threshold over the whole design matrix
        lo = min(float(p.values[p.mask].abs().min()) for p in parts.values())
        hi = max(float(r[m].abs()[~parts[m].mask].max()) for m in r)
        assert lo >= hi


def test_svd_expert_scope_shares_u_and_fits_budget():
    r = upcycled(E=1)[0]
    budget = 1000
    parts = svd(r, SPECS, budget, "expert")
    rank = budget // (24 + 48)
    assert parts["gate"].u.shape == (24, rank) and parts["gate"].owner
    assert parts["up"].shared_u == "gate" and parts["up"].u is parts["gate"].u
    assert sum(p.params for p in parts.values()) <= budget
    full = torch.cat([r[m] for m in ("gate", "up", "down")], 1).double()
    s = torch.linalg.svdvals(full)
    approx = torch.cat([parts[m].u @ parts[m].v for m in ("gate", "up", "down")], 1).double()
    # Eckart-Young: the error of the best rank-r approximation
    assert torch.allclose(torch.linalg.norm(full - approx), s[rank:].norm(), rtol=1e-4)
    per = svd(r, SPECS, budget, "matrix")
    assert all(p.shared_u is None for p in per.values())
    assert sum(p.params for p in per.values()) <= budget


def test_svd_keeps_bias_vectors_dense():
    specs = SPECS + [MatrixSpec("gate_bias", (24,), "fp32", 0), MatrixSpec("down_bias", (16,), "fp32", None)]
    r = upcycled(E=1, specs=specs)[0]
    parts = svd(r, specs, 800, "expert")
    assert parts["down_bias"].mask.all() and torch.equal(parts["down_bias"].values, r["down_bias"])
    assert sum(p.params for p in parts.values()) <= 800


def _error(method, experts, residual="prune", **kw):
    enc = get_encoder(method, EncoderOptions(Budget.of(kw.pop("keep", 0.25), None), residual, **kw))
    res, aligned = enc.encode([dict(e) for e in experts], SPECS, "fp32")  # encode consumes its input
    errs = []
    for k, a in enumerate(aligned):
        for m in SPECS:
            part = res.residuals[k][m.name]
            rec = res.base.get(m.name, torch.zeros(m.shape)).clone()
            if part is not None:
                rec += part.values if hasattr(part, "values") else part.u @ part.v
            errs.append(float(torch.linalg.norm(a[m.name] - rec) / torch.linalg.norm(a[m.name])))
    return float(np.mean(errs)), res


def test_resmoe_beats_vanilla_pruning_on_upcycled_experts():
    experts = upcycled(E=4, noise=0.05)
    e_resmoe, res = _error("resmoe", experts)
    e_prune, _ = _error("prune", experts)
    e_svd, _ = _error("svd", experts, residual="svd")
    e_merge, _ = _error("merge", experts)
    assert res.permutations is not None and all(sorted(p) == list(range(24)) for p in res.permutations)
    assert e_resmoe < 0.1 * e_prune, (e_resmoe, e_prune)
    assert e_resmoe < e_svd and e_resmoe < e_merge


def test_alignment_leaves_each_expert_function_unchanged():
    experts = upcycled(E=3)
    enc = get_encoder("resmoe", EncoderOptions(Budget.of(1.0, None)))
    res, aligned = enc.encode([dict(e) for e in experts], SPECS, "fp32")
    x = torch.randn(5, 16)

    def mlp(e):
        return (torch.nn.functional.silu(x @ e["gate"].T) * (x @ e["up"].T)) @ e["down"]

    for e, a, p in zip(experts, aligned, res.permutations):
        assert torch.equal(a["gate"], e["gate"][torch.from_numpy(p)])
        torch.testing.assert_close(mlp(a), mlp(e), rtol=1e-5, atol=1e-5)


def test_lossless_residuals_restore_bit_for_bit():
    from resmoe_format.restore import combine
    experts = [{k: v.to(torch.bfloat16).float() for k, v in e.items()} for e in upcycled(E=3)]
    enc = get_encoder("resmoe", EncoderOptions(Budget(residual_keep=1.0), lossless=True))
    res, aligned = enc.encode(experts, SPECS, "bf16")
    assert res.lossless
    for k, a in enumerate(aligned):
        for m in SPECS:
            got = combine(res.base[m.name].numpy(), res.residuals[k][m.name].values.numpy(), "bf16")
            assert np.array_equal(got.view(np.uint16), a[m.name].to(torch.bfloat16).view(torch.int16).numpy()
                                  .view(np.uint16))


def test_method_flag_conflicts():
    with pytest.raises(ConversionError, match="use --method svd for svd"):
        get_encoder("prune", EncoderOptions(Budget.of(0.5, None), "svd"))
    with pytest.raises(ConversionError, match="use --method prune for prune"):
        get_encoder("svd", EncoderOptions(Budget.of(0.5, None), "prune"))
    with pytest.raises(ConversionError, match="not available"):
        get_encoder("svd", EncoderOptions(Budget.of(0.5, None), "svd", lossless=True))
    with pytest.raises(ConversionError, match="unknown method"):
        get_encoder("nope", EncoderOptions(Budget.of(0.5, None)))
    with pytest.raises(ConversionError, match="residual-keep does not apply"):
        get_encoder("merge", EncoderOptions(Budget.of(None, 0.5))).residual_budget(SPECS, 4)
