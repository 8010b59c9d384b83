"""Held-out perplexity and mean KL divergence from a reference model's next-byte distribution.

The held-out text (``fixtures/heldout.txt``, 256 KiB) is cut into windows of SEQ + 1 byte ids:
each window is evaluated from an empty context on its first SEQ ids and predicts ids 1..SEQ
(the last window is one id shorter), 1024 windows in all. The reference is the original model
in float32 (torch); its log-probabilities are written once per fixture to a float32 ``.npy``
memory map (windows x SEQ x vocabulary: 277 MB for the fixtures) and every other row is scored
against it window by window, so no row holds more than one batch of logits.

Per row: perplexity per byte, mean KL(reference || row) over all predicted positions (the figure
``llama-perplexity --kl-divergence`` reports), and the fraction of positions whose most likely
next byte is the reference's ("same top").
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
HELDOUT = FIXTURES / "heldout.txt"
SEQ = 256


def heldout_windows(limit: int | None = None, path: Path = HELDOUT) -> list[np.ndarray]:
    """The held-out text as int64 windows of SEQ + 1 ids (the last may be shorter); the first ``limit``."""
    ids = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int64)
    windows = [ids[i:i + SEQ + 1] for i in range(0, ids.size - 1, SEQ)]
    return windows[:limit] if limit else windows


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def torch_logits(model, windows: list[np.ndarray], batch: int = 32) -> Iterator[tuple[int, np.ndarray]]:
    """(window index, float32 logits (tokens, vocab)) of a transformers model, ``batch`` equal-length windows a call."""
    import torch

    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_len.setdefault(len(w), []).append(i)
    with torch.no_grad():
        for n, idx in by_len.items():
            for s in range(0, len(idx), batch):
                part = idx[s:s + batch]
                x = torch.from_numpy(np.stack([windows[i][:-1] for i in part]))
                out = model(input_ids=x, use_cache=False).logits.float().numpy()
                yield from zip(part, out)


def llama_logits(path: Path, windows: list[np.ndarray], chunk: int = 128,
                 threads: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(window index, float32 logits) of a GGUF in llama.cpp, each window from an empty context; one child
    process (``converters.exporters.llama_eval``) per ``chunk`` windows keeps its reply small."""
    from converters.exporters.llama_eval import run_llama

    for s in range(0, len(windows), chunk):
        part = windows[s:s + chunk]
        res = run_llama(path, [w[:-1].tolist() for w in part], n_ctx=SEQ + 8, n_threads=threads)
        yield from zip(range(s, s + len(part)), res.logits)


class Reference:
    """The reference model's log-probabilities of every window, in a float32 ``.npy`` memory map at ``path``."""

    def __init__(self, path: Path, windows: list[np.ndarray], logits: Iterable[tuple[int, np.ndarray]]):
        self.windows = windows
        self.logp: np.ndarray | None = None
        nll, n, seen = 0.0, 0, set()
        for i, z in logits:
            if self.logp is None:
                self.logp = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                                      shape=(len(windows), SEQ, z.shape[-1]))
            lp = log_softmax(z)
            self.logp[i, :len(z)] = lp
            nll -= float(lp[np.arange(len(z)), windows[i][1:]].sum())
            n += len(z)
            seen.add(i)
        if seen != set(range(len(windows))):
            raise ValueError(f"reference logits cover {len(seen)} of {len(windows)} windows")
        self.logp.flush()
        #: the reference's own row
        self.result = {"ppl": math.exp(nll / n), "kld": 0.0, "same_top": 1.0, "tokens": n}

    def score(self, logits: Iterable[tuple[int, np.ndarray]]) -> dict:
        """{"ppl", "kld", "same_top", "tokens"} of a model's logits for every window, against this reference."""
        nll = kld = 0.0
        same = n = 0
        seen = set()
        for i, z in logits:
            w = self.windows[i]
            t = len(w) - 1
            if z.shape != (t, self.logp.shape[-1]):
                raise ValueError(f"window {i}: logits of shape {z.shape}, expected {(t, self.logp.shape[-1])}")
            lq = log_softmax(z)
            lp = self.logp[i, :t].astype(np.float64)
            nll -= float(lq[np.arange(t), w[1:]].sum())
            kld += float((np.exp(lp) * (lp - lq)).sum())
            same += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            n += t
            seen.add(i)
        if seen != set(range(len(self.windows))):
            raise ValueError(f"logits cover {len(seen)} of {len(self.windows)} windows")
        return {"ppl": math.exp(nll / n), "kld": kld / n, "same_top": same / n, "tokens": n}
