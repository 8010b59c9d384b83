"""resmoe-inspect: every byte attributed, parts add up to the file size."""
import json
import subprocess
import sys

import numpy as np
import pytest

import resmoe_format
from resmoe_format import MatrixSpec, MoELayer, SourceSpec, Writer, codecs
from resmoe_format.accounting import CATEGORIES, EXPERT_CATEGORIES, account
from resmoe_format.demo import build
from converters.cli.inspect import main as inspect_main

from builders import write_lossless_file


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build(tmp_path_factory.mktemp("acc") / "demo.rmoe", layers=2, experts=8, hidden=32, inter=48)


@pytest.mark.parametrize("kind", ["demo", "lossless"])
def test_categories_add_up_to_the_file_size(demo, tmp_path, kind):
    path = demo if kind == "demo" else tmp_path / "l.rmoe"
    if kind == "lossless":
        write_lossless_file(path, "bf16")
    with resmoe_format.open(path) as r:
        acc = account(r)
    assert set(acc.bytes) == set(CATEGORIES)
    assert sum(acc.bytes.values()) == path.stat().st_size == acc.file_size
    assert all(v >= 0 for v in acc.bytes.values())


def test_accounting_matches_hand_computation(tmp_path):
    """One layer, 2 experts, known encodings: each category is what the spec's formulas give."""
    m, n, E = 8, 6, 2
    x = np.zeros((m, n), np.float32)
    x[0, :3] = 1.0  # 3 nonzeros
    layer = MoELayer(0, m, [MatrixSpec("w", (m, n), "bf16", 0)], "barycenter",
                     {"w": codecs.encode(np.ones((m, n)), "dense", "bf16")},
                     [{"w": codecs.encode(x, "csr16", "bf16")}, {"w": codecs.encode(x, "bitmap", "int8")}],
                     [np.arange(m), np.arange(m)[::-1]],
                     [SourceSpec(f"e{k}", "bf16", (m, n), k, ["w"]) for k in range(E)])
    with Writer(tmp_path / "h.rmoe", {"architecture": "t"}) as w:
        w.add_passthrough("p", np.zeros(5, np.float32))
        w.add_file("config.json", b"{}")
        w.add_layer(layer)
    with resmoe_format.open(tmp_path / "h.rmoe") as r:
        acc = account(r)
        n_tensors = len(r.tensor_names)
        assert acc.bytes["header"] == r.header.data_start
    assert acc.bytes["barycenters"] == m * n * 2
    assert acc.bytes["permutations"] == 2 * m * 2  # u16
    assert acc.bytes["residual_values"] == 3 * 2 + 3 * 1  # csr bf16 + bitmap int8
    assert acc.bytes["residual_indices"] == (3 * 2 + (m + 1) * 4) + (m * n + 7) // 8  # csr idx+ptr, bitmap
    assert acc.bytes["scales"] == m * 4  # per-row fp32 scales of the int8 residual
    assert acc.bytes["checksums"] == 4 * (n_tensors - 1)
    assert acc.bytes["passthrough"] == 20 and acc.bytes["embedded_files"] == 2
    assert acc.expert_weights == E * m * n and acc.source_expert_bytes == E * m * n * 2
    assert acc.bits_per_expert_weight("barycenters") == pytest.approx(16 / E)


def test_inspect_json_cli(demo, capsys):
    assert inspect_main([str(demo), "--json", "--verify"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sum(doc["bytes"].values()) == doc["file_size"] == demo.stat().st_size
    assert doc["source_bits_per_weight"] == 16.0
    assert 0 < doc["expert_bits_per_weight"] < 16
    assert len(doc["layers"]) == 2


def test_inspect_table_cli(demo, capsys):
    assert inspect_main([str(demo), "--layers"]) == 0
    out = capsys.readouterr().out
    assert f"{demo.stat().st_size:,}" in out and "residual values" in out and "per compressed layer" in out


def test_inspect_rejects_bad_file_with_one_clear_line(tmp_path):
    bad = tmp_path / "bad.rmoe"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    proc = subprocess.run([sys.executable, "-m", "converters.cli.inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("resmoe-inspect: invalid .rmoe file:") and "Traceback" not in proc.stderr


def test_k_quant_parts_have_their_own_categories(tmp_path):
    """Codes, group scales and super-block scales are counted apart (spec 8); expert bytes include them."""
    from resmoe_format.codecs import KqLayout, kquant

    m, n, layout = 8, 10, KqLayout(16, 2, 6)
    x = np.zeros((m, n), np.float32)
    x[0, :3] = 1.0
    base = codecs.encode(np.arange(m * n, dtype=np.float32).reshape(m, n), "dense", "q4", layout)
    layer = MoELayer(0, m, [MatrixSpec("w", (m, n), "bf16", 0)], "barycenter", {"w": base},
                     [{"w": codecs.encode(x, "csr16", "ternary", layout)}, {"w": codecs.encode(x, "dense", "int8")}],
                     None, [SourceSpec(f"e{k}", "bf16", (m, n), k, ["w"]) for k in range(2)])
    with Writer(tmp_path / "k.rmoe", {"architecture": "t"}) as w:
        w.add_layer(layer)
    with resmoe_format.open(tmp_path / "k.rmoe") as r:
        acc = account(r)
    b = acc.bytes
    assert sum(b.values()) == acc.file_size == (tmp_path / "k.rmoe").stat().st_size
    base_sizes, res_sizes = kquant.part_nbytes(m * n, "q4", layout), kquant.part_nbytes(3, "ternary", layout)
    assert b["barycenter_codes"] == base_sizes["codes"] == 40 and b["barycenters"] == 0
    assert b["residual_codes"] == res_sizes["codes"] == 1 and b["residual_values"] == m * n  # the int8 expert
    assert b["group_scales"] == base_sizes["group_scales"] + res_sizes["group_scales"] == 8 + 2
    assert b["superblock_scales"] == base_sizes["super_scales"] + res_sizes["super_scales"] == 12 + 4
    assert b["scales"] == m * 4 and b["residual_indices"] == 3 * 2 + (m + 1) * 4
    records = [base] + [e for res in layer.residuals for e in res.values()]
    assert acc.expert_bytes == sum(b[c] for c in EXPERT_CATEGORIES) == sum(e.nbytes for e in records)
    assert set(acc.to_json()["layers"][0]["bytes"]) == set(EXPERT_CATEGORIES)


def test_inspect_shows_the_k_quant_categories(tmp_path, capsys):
    from test_kquant import write_kquant_file

    path, _ = write_kquant_file(tmp_path / "k.rmoe")
    assert inspect_main([str(path), "--json", "--verify"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == "3.0" and sum(doc["bytes"].values()) == doc["file_size"]
    assert all(doc["bytes"][c] > 0 for c in ("barycenter_codes", "residual_codes", "group_scales", "superblock_scales"))
    assert inspect_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "k-quant group scales" in out and "k-quant super-block scales" in out and "residual k-quant codes" in out
