"""benchmarks/targets.py and report.py: the issue's targets computed from rows, and EVAL.md from them."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import targets  # noqa: E402


def row(family, setting, bits, ppl, fixture="mixtral_upcycled"):
    return {"fixture": fixture, "family": family, "setting": setting, "bits_per_expert_weight": bits, "ppl": ppl,
            "kld": (ppl - 2.9) / 10 + 1e-4, "same_top": 0.9, "expert_bytes": int(bits * 1000), "tokens": 262143,
            "seconds_to_make": 1.0}


MIXTRAL = [row("original", "bf16 source", 16, 3.000), row("llama.cpp", "f32", 32, 3.0001),
           row("llama.cpp", "q2_k", 2.90, 3.079), row("llama.cpp", "q3_k_m", 3.79, 3.033),
           row("llama.cpp", "q4_k_m", 4.73, 3.006), row("llama.cpp", "q8_0", 8.5, 3.000),
           row("resmoe", "--bits 2.5", 2.49, 3.070), row("resmoe", "--bits 3", 2.98, 3.040),
           row("quant", "--bits 3", 2.99, 3.020), row("resmoe-cal", "--bits 4", 3.99, 3.0040),
           row("hqq", "2 bits", 2.3, 2.9)]  # a peer family never counts as .rmoe


def by_target(checks, text):
    return next(c for c in checks if text in c["target"])


def test_frontier_keeps_only_rows_nothing_beats():
    rs = [row("x", "a", 2, 5.0), row("x", "b", 3, 4.0), row("x", "c", 3.5, 4.5), row("x", "d", 4, 3.0),
          row("x", "e", 4, 3.5)]
    assert [r["setting"] for r in targets.frontier(rs)] == ["a", "b", "d"]
    assert targets.best(rs, ("x",), 3.6)["setting"] == "b"
    assert targets.best(rs, ("x",), 1.9) is None
    assert targets.fewest_bits(rs, ("x",), 4.2)["setting"] == "b"


def test_mixtral_targets_met_and_missed_with_margins():
    checks = targets.evaluate(MIXTRAL)
    q2 = by_target(checks, "<= 2.5 bits")
    assert q2["met"] is True and q2["margin"] == pytest.approx(3.079 - 3.070)
    q3 = by_target(checks, "<= 3.3 bits")
    assert q3["met"] is True and q3["ppl"] == 3.020  # the quant row counts as .rmoe
    orig = by_target(checks, "<= 4.2 bits")
    assert orig["met"] is False and orig["limit"] == pytest.approx(3.003)
    assert orig["margin"] == pytest.approx(3.003 - 3.004) and "missed by 0.0010" in orig["detail"]
    left = by_target(checks, "left of llama.cpp")
    # q2_k reached at 2.49 bits, q3_k_m at 2.99, q4_k_m (3.006) at 3.99: all left of their points, q2_k least
    assert left["met"] is True and left["fewest_bits_saved"] == pytest.approx(2.90 - 2.49)
    assert ("q3_k_m (3.79 bits, ppl 3.033): quant --bits 3 reaches 3.02 at 2.990 bits (0.800 bits fewer)"
            in left["detail"])
    by_kld = by_target(checks, "by mean KLD")  # test rows: KLD grows with ppl, so the same verdict
    assert by_kld["met"] is True and by_kld["fewest_bits_saved"] == pytest.approx(2.90 - 2.49)
    worse = [r for r in MIXTRAL if r["setting"] != "--bits 4"] + [row("resmoe-cal", "--bits 5", 4.8, 3.004)]
    left = by_target(targets.evaluate(worse), "left of llama.cpp")
    assert left["met"] is False and left["fewest_bits_saved"] == pytest.approx(4.73 - 4.8)
    assert "reaches 3.004 at 4.800 bits (0.070 bits more)" in left["detail"]


def test_mixtral_target_without_a_reference_row_is_not_checked():
    checks = targets.evaluate([r for r in MIXTRAL if r["setting"] != "q2_k"])
    assert by_target(checks, "<= 2.5 bits")["met"] is None
    assert "q2_k's: not checked" in targets.readme_lines(checks)[0]
    assert targets.readme_lines(checks)[0].startswith("`mixtral_upcycled`: 2 of 4 targets met: ")  # KLD check left out
    peers_only = targets.evaluate([r for r in MIXTRAL if r["family"] not in targets.RMOE])
    assert [c["met"] for c in peers_only] == [None] * 5 and peers_only[0]["detail"] == "no .rmoe row"


def test_qwen_no_worse_than_quant_and_kquants_at_fewer_bits():
    fx = "qwen3_moe_fine"
    rs = [row("original", "bf16 source", 16, 2.73, fx), row("llama.cpp", "q2_k", 3.25, 2.78, fx),
          row("quant", "--bits 2.5", 2.5, 2.90, fx), row("quant", "--bits 3", 3.0, 2.80, fx),
          row("resmoe", "--bits 2.25", 2.2, 3.5, fx),   # nothing at <= 2.2 bits to compare with
          row("resmoe", "--bits 2.5", 2.5, 2.91, fx),   # +0.34% over quant 2.5
          row("resmoe", "--bits 3.5", 3.4, 2.80, fx),   # vs q2_k 2.78: +0.72%
          row("resmoe-cal", "--bits 3", 2.95, 2.88, fx)]  # vs quant 2.5 (2.90): better
    checks = targets.evaluate(rs)
    data_free = by_target(checks, "every resmoe row")
    assert data_free["met"] is False and data_free["worst_excess"] == pytest.approx(2.80 / 2.78 - 1)
    assert "no quant or k-quant row" in data_free["detail"]
    cal = by_target(checks, "every resmoe-cal row")
    assert cal["met"] is True and cal["worst_excess"] == pytest.approx(2.88 / 2.90 - 1)


def test_markdown_lists_every_row_and_the_computed_targets():
    report = pytest.importorskip("report")
    prov = {"command": "python benchmarks/eval.py", "git_commit": "abc", "git_dirty": False, "date_utc": "now",
            "cpu": "cpu", "cpus": 2, "cpus_usable": 2, "torch_threads": 2, "python": "3.11", "platform": "linux",
            "versions": {"torch": "2.13"}}
    checks = targets.evaluate(MIXTRAL)
    md = report.markdown(MIXTRAL, checks, prov, {"eval_mixtral_upcycled.json": [prov]})
    assert "1024 windows of 256 bytes (262143 predicted bytes)" in md
    assert md.count("| mixtral_upcycled") == 0 and md.count("\n| ") == len(MIXTRAL) + 1
    assert "**MISSED**" in md and "**met**" in md and "| resmoe-cal | --bits 4 | 3.990 |" in md


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    import report

    report.plot(MIXTRAL, "mixtral_upcycled", tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
