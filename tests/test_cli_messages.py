"""What the command-line tools tell a user: bad flags refused before any work, budgets that save
nothing refused, warnings as one line each, and resmoe-inspect verifying checksums by default."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import resmoe_format
from builders import write_lossless_file
from converters.cli.convert import main as convert_main
from converters.cli.inspect import main as inspect_main
from converters.cli.warn import cli_warnings
from converters.convert import ConvertOptions, Plan, convert
from converters.encoders.methods import Encoder
from converters.example import write_mixtral_checkpoint
from hf_models import build_checkpoint


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    """4 experts, 24 neurons, hidden 16: a shared U holds rank 16 at most."""
    return build_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral") / "ckpt", "bf16")


@pytest.fixture(scope="module")
def tall(tmp_path_factory) -> Path:
    """64 neurons, hidden 16: --keep 0.9 buys more SVD rank (24) than one shared U stores (16)."""
    d = tmp_path_factory.mktemp("tall") / "ckpt"
    write_mixtral_checkpoint(d, layers=1, hidden=16, inter=64, experts=4, vocab=32)
    return d


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "COLUMNS": "200"})


def _one_line_per_warning(err: str, prog: str) -> list[str]:
    """The warning lines of ``err``, after checking none carries a source excerpt or repeats."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert not any("Warning:" in ln or ln.startswith(" ") or ".py:" in ln for ln in lines), err
    warned = [ln for ln in lines if ln.startswith(f"{prog}: warning: ")]
    assert len(warned) == len(set(warned)), err
    return warned


# ---------------------------------------------------------------------------------------------------
# bad flags: one line naming the flag, before the weights are read or any layer is encoded

@pytest.mark.parametrize("flags,match", [
    (["--rank", "100000", "--residual", "svd"], "--rank 100000: must be between 1 and 16"),
    (["--rank", "17", "--residual", "svd", "--residual-scope", "matrix"], "between 1 and 16"),
    (["--rank", "0", "--residual", "svd"], "--rank must be a positive integer"),
    (["--rank", "3", "--residual", "svd", "--keep", "0.5"], "not both"),
    (["--keep", "1"], "nothing is saved"),
    (["--residual-keep", "0.8"], "--residual-keep 0.8 keeps 104.9%"),  # 1/4 + 0.8, floored
    (["--method", "prune", "--residual-keep", "1"], "nothing is saved"),
    (["--method", "merge", "--value-dtype", "int8"], "--value-dtype does not apply"),
    (["--method", "merge", "--residual", "svd"], "--residual svd does not apply"),
    (["--method", "merge", "--delta-format", "csr16"], "--delta-format csr16 does not apply"),
    (["--method", "merge", "--residual-scope", "matrix"], "--residual-scope matrix does not apply"),
    (["--max-iter", "0"], "--max-iter must be at least 1"),
    (["--method", "prune", "--max-iter", "5"], "--method prune has none"),
    (["--device", "nope"], "--device"),
])
def test_bad_flag_refused_before_work(mixtral, tmp_path, capsys, monkeypatch, flags, match):
    def no_work(*_a, **_k):
        raise AssertionError("work started before the flags were checked")

    monkeypatch.setattr(Plan, "check_weights", no_work)  # the first read of any weight
    monkeypatch.setattr(Encoder, "encode", no_work)
    out = tmp_path / "out.rmoe"
    assert convert_main([str(mixtral), str(out), "-q", *flags]) == 2
    err = capsys.readouterr().err
    assert match in err and err.startswith("resmoe-convert: error: "), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_keep_that_saves_nothing_points_at_lossless(mixtral, tmp_path, capsys):
    assert convert_main([str(mixtral), str(tmp_path / "o.rmoe"), "-q", "--keep", "1"]) == 2
    assert "--lossless" in capsys.readouterr().err
    assert convert_main([str(mixtral), str(tmp_path / "o.rmoe"), "-q", "--method", "svd", "--keep", "1"]) == 2
    assert "--lossless" not in capsys.readouterr().err  # svd has no lossless mode: not suggested


def test_largest_rank_is_accepted_and_stored(mixtral, tmp_path):
    with pytest.warns(UserWarning, match="127.1% of their source size.*lower --rank"):  # rank 16 costs a dense expert
        convert(mixtral, tmp_path / "o.rmoe", ConvertOptions(residual="svd", rank=16), progress=False)
    with resmoe_format.open(tmp_path / "o.rmoe") as r:
        r.verify()
        assert {ref.params["rank"] for lay in r.layers for res in lay.residuals for ref in res.values()} == {16}


def test_budget_rank_beyond_shared_u_is_clamped_with_a_warning(tall, tmp_path):
    """Before: the budget's rank 24 reached the writer and failed mid-run as an invalid lowrank record."""
    with pytest.warns(UserWarning, match="buys SVD rank 24, but one shared U stores rank 16"):
        convert(tall, tmp_path / "o.rmoe", ConvertOptions(method="svd", keep=0.9), progress=False)
    with resmoe_format.open(tmp_path / "o.rmoe") as r:
        r.verify()


def test_merge_with_keep_warns_that_it_stores_one_expert(mixtral, tmp_path):
    with pytest.warns(UserWarning, match=r"merge stores the experts' average only \(1/4 = 25.0%"):
        rep = convert(mixtral, tmp_path / "o.rmoe", ConvertOptions(method="merge", keep=0.9), progress=False)
    assert rep["summary"]["keep"] == pytest.approx(0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no --keep, or --keep 1/E: nothing to warn about
        convert(mixtral, tmp_path / "p.rmoe", ConvertOptions(method="merge"), progress=False)
        convert(mixtral, tmp_path / "q.rmoe", ConvertOptions(method="merge", keep=0.25), progress=False)


def test_file_larger_than_source_warns(mixtral, tmp_path):
    with pytest.warns(UserWarning, match="nothing is saved"):
        rep = convert(mixtral, tmp_path / "o.rmoe", ConvertOptions(keep=0.95), progress=False)
    assert rep["summary"]["expert_bytes_fraction"] > 1


# ---------------------------------------------------------------------------------------------------
# warnings: each once, one line, no source excerpt; library noise silenced

def test_cli_warnings_one_line_once_and_noise_silenced(capsys):
    with cli_warnings("resmoe-x"):
        for _ in range(3):
            warnings.warn("first line\n  second line", UserWarning, stacklevel=1)
        warnings.warn("first line\n  second line", UserWarning, stacklevel=1)  # same text, another location
        warnings.warn("Sparse CSR tensor support is in beta state. If you miss ...", UserWarning, stacklevel=1)
        warnings.warn("The given NumPy array is not writable, and ...", UserWarning, stacklevel=1)
        warnings.warn("something else", FutureWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err.splitlines() == ["resmoe-x: warning: first line second line", "resmoe-x: warning: something else"]
    with pytest.warns(UserWarning, match="beta state"):  # filters are restored on exit
        warnings.warn("Sparse CSR tensor support is in beta state", UserWarning, stacklevel=1)


def test_read_only_array_to_torch_is_silent():
    """The reader's arrays are read-only mmap views; converting them must not print torch's warning
    (it prints once per process, so this runs in a fresh one)."""
    code = ("import numpy as np, torch\nfrom resmoe_format.torch.tensors import to_torch\n"
            "a = np.arange(6, dtype=np.float32); a.flags.writeable = False\n"
            "assert to_torch(a).tolist() == a.tolist() and to_torch(a, torch.float16).dtype == torch.float16\n")
    out = _run("-W", "error::UserWarning", "-c", code)
    assert out.returncode == 0, out.stderr


def test_export_cli_shows_the_tokenizer_warning_as_one_line(mixtral, tmp_path):
    assert convert_main([str(mixtral), str(tmp_path / "m.rmoe"), "-q"]) == 0
    out = _run("-m", "converters.cli.export", str(tmp_path / "m.rmoe"), "--to", "gguf", str(tmp_path / "m.gguf"))
    assert out.returncode == 0, out.stderr
    warned = _one_line_per_warning(out.stderr, "resmoe-export")
    assert len(warned) == 1 and "placeholder vocabulary" in warned[0], out.stderr


def test_convert_cli_warning_is_one_line(mixtral, tmp_path):
    out = _run("-m", "converters.cli.convert", str(mixtral), str(tmp_path / "m.rmoe"), "-q", "--method", "merge",
               "--keep", "0.9")
    assert out.returncode == 0, out.stderr
    warned = _one_line_per_warning(out.stderr, "resmoe-convert")
    assert len(warned) == 1 and "merge stores the experts' average only" in warned[0], out.stderr


# ---------------------------------------------------------------------------------------------------
# resmoe-inspect verifies checksums unless told not to, and says so

@pytest.fixture
def flipped(tmp_path) -> Path:
    good = tmp_path / "good.rmoe"
    write_lossless_file(good)
    with resmoe_format.open(good) as r:
        name = next(n for n in r.tensor_names if ".residual" in n or ".base." in n)
        t = r.header.tensors[name]
        at = r.header.data_start + t.begin + t.nbytes // 2
    raw = bytearray(good.read_bytes())
    raw[at] ^= 0x40
    bad = tmp_path / "bad.rmoe"
    bad.write_bytes(bytes(raw))
    return bad


def test_inspect_verifies_checksums_by_default(flipped, capsys):
    assert inspect_main([str(flipped.with_name("good.rmoe"))]) == 0
    assert "every tensor's CRC-32 is valid" in capsys.readouterr().out
    assert inspect_main([str(flipped)]) == 2
    err = capsys.readouterr().err
    assert "crc32 mismatch" in err and len(err.strip().splitlines()) == 1
    assert inspect_main([str(flipped), "--json"]) == 2


def test_inspect_no_verify_says_so(flipped, capsys):
    assert inspect_main([str(flipped), "--no-verify"]) == 0
    assert "checksums: NOT verified" in capsys.readouterr().out
    assert inspect_main([str(flipped), "--no-verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] == "none"
    assert inspect_main([str(flipped.with_name("good.rmoe")), "--json", "--verify"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] == "records"


def test_inspect_verify_and_no_verify_exclusive(flipped):
    with pytest.raises(SystemExit):
        inspect_main([str(flipped), "--verify", "--no-verify"])


@pytest.mark.parametrize("flags", [["--to", "gguf-rmoe", "--type", "q4_0"], ["--to", "gguf", "--variant", "lowrank"],
                                   ["--to", "onnx", "--original-order"]])
def test_export_flag_the_target_ignores_is_refused(tmp_path, capsys, flags):
    from converters.cli.export import main as export_main

    src = tmp_path / "m.rmoe"
    write_lossless_file(src)
    assert export_main([str(src), *flags[:2], str(tmp_path / "out"), *flags[2:]]) == 2
    err = capsys.readouterr().err
    assert f"{flags[2]} applies to --to" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.rmoe"]
