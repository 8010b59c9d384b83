"""benchmarks/fixtures/calibration.txt: training-corpus text, disjoint from heldout.txt."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import calibration  # noqa: E402


def test_calibration_text_shares_no_piece_with_the_heldout_text():
    cal = calibration.CALIBRATION.read_bytes()
    held = (calibration.FIXTURES / "heldout.txt").read_bytes()
    assert len(cal) == calibration.CAL_BYTES
    cal.decode("utf-8")  # text, as --calibration requires
    shared = [i for i in range(0, len(cal) - 128, 64) if cal[i:i + 128] in held]
    assert not shared, f"{len(shared)} pieces of calibration.txt occur in heldout.txt, e.g. {cal[shared[0]:][:128]!r}"


def test_calibration_text_comes_from_train_files_only():
    """Regenerated from this interpreter's standard library when it is the one the fixtures were made from."""
    import train_fixtures

    train, held, _ = train_fixtures.corpus()
    heldout = b"\n".join(p.read_bytes() for p in held)[:train_fixtures.HELDOUT_BYTES]
    if heldout != (calibration.FIXTURES / "heldout.txt").read_bytes():
        pytest.skip("this interpreter's standard library is not the one the fixtures were made from")
    src = calibration.sources(train)
    assert len(set(src)) == len(src) == calibration.CAL_BYTES // calibration.CHUNK
    assert not set(src) & set(held)
    assert calibration.calibration_text(train) == calibration.CALIBRATION.read_bytes()
