"""The exact-assignment Wasserstein barycenter against brute force, scipy and POT."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from converters.encoders import barycenter as bc
from converters.encoders.barycenter import (
    align,
    assignment,
    objective,
    pot_barycenter,
    wasserstein_barycenter,
)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def upcycled(rng: np.random.Generator, e: int, n: int, d: int, noise: float = 0.5):
    """One base design permuted per expert plus noise; returns (designs float32, true perms)."""
    base = rng.standard_normal((n, d)) / np.sqrt(d)
    perms = [rng.permutation(n) for _ in range(e)]
    designs = np.stack([base[p] + noise * rng.standard_normal((n, d)) / np.sqrt(d) for p in perms])
    return designs.astype(np.float32), perms


def plain(rng: np.random.Generator, e: int, n: int, d: int) -> np.ndarray:
    return (rng.standard_normal((e, n, d)) / np.sqrt(d)).astype(np.float32)


def matching_value(s: np.ndarray, col: np.ndarray) -> float:
    return float(s[np.arange(len(col)), col].sum())


def is_perm(p, n: int) -> bool:
    p = np.asarray(p)
    return p.dtype == np.int64 and p.shape == (n,) and np.array_equal(np.sort(p), np.arange(n))


# ---------------------------------------------------------------- assignment


@pytest.mark.parametrize("seed", range(40))
def test_assignment_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    # small integer values: many ties, and the argmax is often not a permutation
    s = rng.integers(0, 3, size=(n, n)).astype(np.float32) if seed % 2 else rng.standard_normal((n, n))
    col = assignment(torch.from_numpy(s))
    assert is_perm(col, n)
    best = max(matching_value(s, np.array(p)) for p in itertools.permutations(range(n)))
    assert matching_value(s, col) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_assignment_matches_scipy(seed):
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(100 + seed)
    s = rng.standard_normal((60, 60))
    _, ref = linear_sum_assignment(s, maximize=True)
    col = assignment(torch.from_numpy(s))
    assert is_perm(col, 60)
    assert matching_value(s, col) == pytest.approx(matching_value(s, ref), rel=1e-12)


def test_assignment_argmax_shortcut_skips_the_solver(monkeypatch):
    import scipy.optimize

    def boom(*a, **k):
        raise AssertionError("solver called although the row argmax is a permutation")

    monkeypatch.setattr(scipy.optimize, "linear_sum_assignment", boom)
    rng = np.random.default_rng(0)
    n = 50
    q = rng.permutation(n)
    s = 0.1 * rng.standard_normal((n, n)).astype(np.float32)
    s[np.arange(n), q] += 5.0
    col = assignment(torch.from_numpy(s))
    assert np.array_equal(col, q)
    # ties in a row do not matter: every row at its maximum is optimal
    t = np.zeros((4, 4), dtype=np.float32)
    t[np.arange(4), np.arange(4)] = 1.0
    t[0, 1] = 1.0                       # row 0 ties between columns 0 and 1, argmax picks 0
    assert np.array_equal(assignment(torch.from_numpy(t)), np.arange(4))


def test_assignment_calls_the_solver_when_needed():
    s = np.array([[3.0, 2.0], [3.0, 0.0]])   # both rows prefer column 0
    assert np.array_equal(assignment(torch.from_numpy(s)), [1, 0])


def test_assignment_rejects_bad_input():
    with pytest.raises(ValueError):
        assignment(torch.zeros(3, 4))
    bad = torch.zeros(3, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError):
        assignment(bad)
    assert assignment(torch.zeros(0, 0)).shape == (0,)


# ---------------------------------------------------------------- align


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_align_recovers_a_known_permutation(noise):
    rng = np.random.default_rng(7)
    n, d = 64, 32
    target = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    q = rng.permutation(n)
    design = target[torch.from_numpy(q)] + noise * torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    p = align(target, design)
    assert is_perm(p, n)
    assert np.array_equal(p, np.argsort(q))          # design[p] is target again
    if noise == 0.0:
        assert torch.equal(design[torch.from_numpy(p)], target)


def test_align_minimises_the_distance():
    rng = np.random.default_rng(3)
    t = torch.from_numpy(rng.standard_normal((6, 5)))
    w = torch.from_numpy(rng.standard_normal((6, 5)))
    p = align(t, w)
    best = min(float(((t - w[list(q)]) ** 2).sum()) for q in itertools.permutations(range(6)))
    assert float(((t - w[torch.from_numpy(p)]) ** 2).sum()) == pytest.approx(best, rel=1e-12)


# ---------------------------------------------------------------- barycenter vs POT

CASES = [  # kind, E, n, d, seed
    ("upcycled", 4, 16, 12, 0),
    ("upcycled", 8, 64, 48, 1),
    ("upcycled", 6, 32, 24, 2),
    ("random", 4, 16, 12, 3),
    ("random", 8, 32, 24, 4),
    ("random", 5, 64, 48, 5),
    ("random", 8, 64, 16, 6),
    ("random", 6, 24, 40, 7),
]


def make(kind, e, n, d, seed):
    rng = np.random.default_rng(seed)
    if kind == "upcycled":
        return upcycled(rng, e, n, d, noise=1.0)[0]
    return plain(rng, e, n, d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_objective_no_worse_than_pot(case, device):
    pytest.importorskip("ot")
    w = make(*case)
    e, n, _ = w.shape
    res = wasserstein_barycenter(torch.from_numpy(w).to(device))
    _, pot_obj = pot_barycenter(w.astype(np.float64))
    assert res.objective <= pot_obj * (1 + 1e-9) + 1e-12
    assert res.barycenter.device.type == device and res.barycenter.dtype == torch.float32
    assert res.barycenter.shape == w.shape[1:]
    assert len(res.permutations) == e and all(is_perm(p, n) for p in res.permutations)
    # the reported objective is the stated formula, in float64
    direct = np.mean([
        ((res.barycenter.cpu().double().numpy() - w[k].astype(np.float64)[p]) ** 2).sum(axis=1).mean()
        for k, p in enumerate(res.permutations)
    ])
    assert res.objective == pytest.approx(direct, rel=1e-12)
    assert res.objective == pytest.approx(objective(res.barycenter, torch.from_numpy(w).to(device),
                                                    res.permutations), rel=1e-12)
    # each permutation is an optimal alignment to the barycenter it comes with
    for k, p in enumerate(res.permutations):
        q = align(res.barycenter.cpu().double(), torch.from_numpy(w[k]).double())
        assert objective(res.barycenter.cpu(), torch.from_numpy(w[k:k + 1]), [p]) == pytest.approx(
            objective(res.barycenter.cpu(), torch.from_numpy(w[k:k + 1]), [q]), rel=1e-6)
    # history: non-increasing, ends at (or one step after) the returned objective
    assert res.iterations == len(res.history) >= 1
    assert all(b <= a * (1 + 1e-12) for a, b in zip(res.history, res.history[1:-1]))
    assert min(res.history) == res.objective


def test_upcycled_experts_are_aligned_to_the_same_base_rows():
    rng = np.random.default_rng(11)
    e, n, d = 8, 48, 40
    w, true = upcycled(rng, e, n, d, noise=0.5)
    res = wasserstein_barycenter(torch.from_numpy(w))
    base_rows = np.stack([true[k][p] for k, p in enumerate(res.permutations)])
    assert (base_rows == base_rows[0]).all()         # every aligned expert has base row i at row i
    # a fixed point: the barycenter is the mean of the aligned experts
    mean = np.mean([w[k][p] for k, p in enumerate(res.permutations)], axis=0)
    np.testing.assert_allclose(res.barycenter.numpy(), mean, rtol=1e-5, atol=1e-6)
    assert res.iterations == 2                       # align to expert 0, then confirm


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_and_device_independent(device):
    w = torch.from_numpy(make("random", 8, 48, 20, 9))
    a = wasserstein_barycenter(w.to(device))
    b = wasserstein_barycenter(w.to(device))
    assert torch.equal(a.barycenter, b.barycenter)
    assert all(np.array_equal(p, q) for p, q in zip(a.permutations, b.permutations))
    assert a.history == b.history
    ref = wasserstein_barycenter(w)
    assert all(np.array_equal(p, q) for p, q in zip(a.permutations, ref.permutations))
    assert a.objective == pytest.approx(ref.objective, rel=1e-6)


def test_uncached_path_matches_cached():
    w = torch.from_numpy(make("random", 6, 40, 24, 12))
    a = wasserstein_barycenter(w)
    b = wasserstein_barycenter(w, cache_bytes=0)
    assert all(np.array_equal(p, q) for p, q in zip(a.permutations, b.permutations))
    assert a.objective == pytest.approx(b.objective, rel=1e-9)
    assert a.iterations == b.iterations


def test_incremental_rounds_match_a_fresh_start(monkeypatch):
    """Rows recomputed only where the barycenter moved give what a full recomputation gives."""
    w = torch.from_numpy(make("random", 8, 64, 16, 6))
    res = wasserstein_barycenter(w)
    assert res.iterations >= 3                       # the incremental path ran
    for k, p in enumerate(res.permutations):
        assert np.array_equal(p, align(res.barycenter, w[k]))


def test_options_and_errors():
    w = torch.from_numpy(make("random", 4, 16, 8, 1))
    seen = []
    res = wasserstein_barycenter(w, progress=lambda it, obj: seen.append((it, obj)))
    assert [s[0] for s in seen] == list(range(1, res.iterations + 1))
    assert [s[1] for s in seen] == res.history
    one = wasserstein_barycenter(w, max_iter=1)
    assert one.iterations == 1
    assert torch.equal(one.barycenter, w[0])         # the start, with its optimal alignments
    assert np.array_equal(one.permutations[0], np.arange(16))
    other = wasserstein_barycenter(w, init=2, max_iter=1)
    assert torch.equal(other.barycenter, w[2])
    assert wasserstein_barycenter(w.double()).barycenter.dtype == torch.float32
    with pytest.raises(ValueError):
        wasserstein_barycenter(w, init=4)
    with pytest.raises(ValueError):
        wasserstein_barycenter(w, max_iter=0)
    with pytest.raises(ValueError):
        wasserstein_barycenter(w[0])
    with pytest.raises(ValueError):
        wasserstein_barycenter(w.to(torch.int32))
    bad = w.clone()
    bad[1, 2, 3] = float("inf")
    with pytest.raises(ValueError):
        wasserstein_barycenter(bad)


def test_single_expert_is_its_own_barycenter():
    w = torch.from_numpy(make("random", 1, 10, 6, 2))
    res = wasserstein_barycenter(w)
    assert torch.equal(res.barycenter, w[0])
    assert np.array_equal(res.permutations[0], np.arange(10))
    assert res.objective == 0.0


def test_module_exports():
    assert set(bc.__all__) >= {"BarycenterResult", "assignment", "align", "wasserstein_barycenter",
                               "pot_barycenter", "objective"}
