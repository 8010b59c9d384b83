"""The calibration text of the evaluation: 64 KiB of the fixtures' training corpus, disjoint from heldout.txt.

``train_fixtures.py`` splits the running interpreter's standard-library ``.py`` files into train
and held-out files and writes the held-out ones to ``fixtures/heldout.txt``. This takes one
4 KiB slice (from the middle of the file, starting at a line) of each of 16 train files spread
evenly over the sorted list, so GPTQ and ``resmoe-convert --calibration`` see text of the kind the
model was trained on and never a byte of a held-out file.

    python benchmarks/calibration.py      (writes benchmarks/fixtures/calibration.txt)
"""
from __future__ import annotations

import sys
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
CALIBRATION = FIXTURES / "calibration.txt"
CAL_BYTES = 1 << 16
CHUNK = 4096


def sources(train_files: list[Path]) -> list[Path]:
    """The train files the slices come from: CAL_BYTES / CHUNK of those at least twice CHUNK long, evenly spaced."""
    big = [p for p in train_files if p.stat().st_size >= 2 * CHUNK]
    n = CAL_BYTES // CHUNK
    return [big[i * len(big) // n] for i in range(n)]


def calibration_text(train_files: list[Path]) -> bytes:
    """CAL_BYTES of text: per source file, CHUNK bytes starting at the first line that begins in its second half."""
    parts = []
    for p in sources(train_files):
        data = p.read_bytes()
        start = data.find(b"\n", len(data) // 2) + 1
        start = min(start, len(data) - CHUNK)
        parts.append(data[start:start + CHUNK])
    return b"".join(parts)


def main() -> int:
    from train_fixtures import corpus

    train, held, _ = corpus()
    if set(sources(train)) & set(held):
        raise SystemExit("a calibration source is a held-out file")
    CALIBRATION.write_bytes(calibration_text(train))
    print(f"wrote {CALIBRATION} ({CALIBRATION.stat().st_size} bytes from {len(sources(train))} train files)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main())
