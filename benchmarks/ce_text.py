"""Write a training text for resmoe-tune-ce from the fixtures' TRAIN files only: Python standard-library ``.py``
files that :func:`train_fixtures.corpus` puts in the training set (never a held-out file, the ones heldout.txt is
cut from), in an order drawn from the seed, each UTF-8 file without NUL bytes taken whole until the text has
``--bytes`` bytes (the last file cut). Prints how many 64-byte pieces of the text occur in heldout.txt.

    python benchmarks/ce_text.py OUT.txt [--bytes 2000000] [--seed 0]

Not committed: the text is a function of the running interpreter's standard library (the one the fixtures were
trained on, train.json's python), the size and the seed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def training_text(n_bytes: int, seed: int = 0) -> bytes:
    """``n_bytes`` of training files (see the module docstring); ValueError if the train files hold fewer."""
    from train_fixtures import corpus

    train, held, _ = corpus()
    held_set = set(held)
    order = np.random.default_rng(seed).permutation(len(train))
    parts, size = [], 0
    for i in order:
        p = train[i]
        assert p not in held_set
        data = p.read_bytes()
        if b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        parts.append(data)
        size += len(data) + 1
        if size >= n_bytes:
            break
    text = b"\n".join(parts)
    if len(text) < n_bytes:
        raise ValueError(f"the training files hold {len(text)} usable bytes, fewer than {n_bytes}")
    text = text[:n_bytes]
    while True:  # a cut inside a multi-byte character: drop its start
        try:
            text.decode("utf-8")
            return text
        except UnicodeDecodeError:
            text = text[:-1]


def overlap(text: bytes, heldout: bytes, chunk: int = 64) -> tuple[int, int]:
    """(chunks of ``chunk`` bytes of ``text`` found in ``heldout``, chunks)."""
    starts = range(0, len(text) - chunk, chunk)
    return sum(text[i:i + chunk] in heldout for i in starts), len(starts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--bytes", type=int, default=2_000_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    text = training_text(a.bytes, a.seed)
    a.out.write_bytes(text)
    hit, n = overlap(text, (HERE / "fixtures" / "heldout.txt").read_bytes())
    print(f"{a.out}: {len(text)} bytes; {hit} of its {n} 64-byte pieces occur in heldout.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
