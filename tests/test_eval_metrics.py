"""benchmarks/kld.py: held-out windows, perplexity and KL divergence against a cached reference."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import kld  # noqa: E402


def test_heldout_windows_cover_the_whole_file():
    ids = np.frombuffer(kld.HELDOUT.read_bytes(), dtype=np.uint8)
    w = kld.heldout_windows()
    assert len(w) == 1024 and all(len(x) == kld.SEQ + 1 for x in w[:-1]) and len(w[-1]) == kld.SEQ
    # consecutive windows share one id: inputs tile the file, targets are every id but the first
    assert np.array_equal(np.concatenate([x[:-1] for x in w] + [w[-1][-1:]]), ids)
    assert sum(len(x) - 1 for x in w) == ids.size - 1
    assert len(kld.heldout_windows(8)) == 8


def windows_and_logits(rng, n=5, seq=kld.SEQ, vocab=12):
    wins = [rng.integers(0, vocab, seq + 1) for _ in range(n - 1)] + [rng.integers(0, vocab, seq)]
    return wins, [rng.normal(size=(len(w) - 1, vocab)).astype(np.float32) * 3 for w in wins]


def test_reference_scores_itself_exactly_and_a_uniform_model_analytically(tmp_path):
    rng = np.random.default_rng(0)
    wins, logits = windows_and_logits(rng)
    ref = kld.Reference(tmp_path / "ref.npy", wins, enumerate(logits))
    nll = -sum(kld.log_softmax(z)[np.arange(len(z)), w[1:]].sum() for z, w in zip(logits, wins))
    n = sum(len(w) - 1 for w in wins)
    assert ref.result["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-12)
    same = ref.score(reversed(list(enumerate(logits))))  # any order
    assert same["ppl"] == pytest.approx(ref.result["ppl"], rel=1e-6)
    assert abs(same["kld"]) < 1e-6 and same["same_top"] == 1.0 and same["tokens"] == n
    vocab = logits[0].shape[1]
    flat = ref.score((i, np.zeros_like(z)) for i, z in enumerate(logits))
    assert flat["ppl"] == pytest.approx(vocab, rel=1e-9)
    # KL(p || uniform) = log V - H(p), averaged over positions
    lp = [kld.log_softmax(z) for z in logits]
    expect = np.mean(np.concatenate([math.log(vocab) + (np.exp(x) * x).sum(-1) for x in lp]))
    assert flat["kld"] == pytest.approx(expect, rel=1e-5)


def test_score_refuses_missing_windows_and_wrong_shapes(tmp_path):
    rng = np.random.default_rng(1)
    wins, logits = windows_and_logits(rng)
    ref = kld.Reference(tmp_path / "ref.npy", wins, enumerate(logits))
    with pytest.raises(ValueError, match="cover 4 of 5"):
        ref.score(list(enumerate(logits))[:4])
    with pytest.raises(ValueError, match="window 0"):
        ref.score([(0, logits[0][:, :-1])])
    with pytest.raises(ValueError, match="cover"):
        kld.Reference(tmp_path / "ref2.npy", wins, list(enumerate(logits))[1:])
