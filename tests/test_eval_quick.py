"""benchmarks/eval.py --quick end to end on one fixture: rows of every family that can run here,
the reference's own row, EVAL.md with the computed targets, the plot; and its refusals."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import eval as ev  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet_warnings")


def runnable() -> tuple[str, ...]:
    """The families whose packages are installed here."""
    return tuple(f for f in ev.FAMILIES if ev.missing_requirements((f,), False) is None)


def test_missing_requirements_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("hqq", "llmcompressor") else real(name, *a))
    msg = ev.missing_requirements(("hqq", "gptq"), False)
    needs = msg.split(": run ")[0]
    assert needs.startswith("benchmarks/eval.py needs ") and "hqq" in needs and "llmcompressor" in needs
    assert '`pip install -e ".[bench]"` and `pip install --no-deps llmcompressor==0.14.0.1`' in msg


def test_unknown_family_and_fixture_are_refused(capsys):
    with pytest.raises(SystemExit):
        ev.main(["--families", "resmoe,gguf", "--report-only"])
    assert "unknown families ['gguf']" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_on_one_fixture(tmp_path):
    families = runnable()
    if "matplotlib" in (ev.missing_requirements((), True) or ""):
        pytest.skip("matplotlib is not installed")
    assert ev.main(["--quick", "--fixture", "mixtral_upcycled", "--families", ",".join(families),
                    "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "eval_mixtral_upcycled.json").read_text())["rows"]
    orig = rows[0]
    assert orig["family"] == "original" and orig["kld"] == 0 and orig["tokens"] == 8 * 256
    assert orig["bits_per_expert_weight"] == 16 and 2 < orig["ppl"] < 4
    expect = {f: 2 for f in families} | ({"llama.cpp": 3} if "llama.cpp" in families else {})  # + f32
    assert {f: sum(r["family"] == f for r in rows) for f in families} == expect
    for r in rows[1:]:
        assert r["tokens"] == orig["tokens"] and 0 < r["kld"] < 1 and 0.5 < r["same_top"] <= 1
        assert r["ppl"] < 1.5 * orig["ppl"] and 1.5 < r["bits_per_expert_weight"] < 33
        if r["family"] in ev.RMOE_FAMILIES:
            assert r["bits_per_expert_weight"] <= r["target_bits"] and not r["over_budget"]
    md = (tmp_path / "EVAL.md").read_text()
    assert "## Targets (computed from the rows below)" in md and "8 windows of 256 bytes" in md
    assert (tmp_path / "eval_mixtral_upcycled.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "eval.json").read_text())["targets"]
    # a run of other families keeps these rows (the original's is measured again)
    assert ev.main(["--quick", "--fixture", "mixtral_upcycled", "--families", "", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "eval_mixtral_upcycled.json").read_text())
    assert again["rows"][1:] == rows[1:] and len(again["kept_from"]) == 1
    assert "rows of the families not in that run" in (tmp_path / "EVAL.md").read_text()
