"""Package boundaries: resmoe_format needs neither converters nor torch to read a file."""
import subprocess
import sys
from pathlib import Path

import pytest


def test_reading_needs_no_torch_and_no_converters(tmp_path):
    code = f"""
import sys
import resmoe_format
from resmoe_format import restore
from resmoe_format.accounting import account
from resmoe_format.demo import build
p = build({str(tmp_path / 'd.rmoe')!r}, layers=1, experts=2, hidden=8, inter=8)
with resmoe_format.open(p) as r:
    r.verify(); account(r); list(restore.restore_all(r, True))
bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'converters'))]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_resmoe_format_source_never_imports_converters():
    import pathlib

    import resmoe_format

    root = pathlib.Path(resmoe_format.__file__).parent
    for f in root.rglob("*.py"):
        text = f.read_text()
        assert "import converters" not in text and "from converters" not in text, f


def test_console_scripts_are_installed():
    from importlib.metadata import entry_points

    names = {e.name for e in entry_points(group="console_scripts")}
    assert {"resmoe-convert", "resmoe-inspect", "resmoe-restore", "resmoe-export"} <= names


def test_every_script_in_pyproject_is_a_main_function():
    """pyproject's [project.scripts] (what `pip install` makes commands of) name importable main functions."""
    import importlib
    import tomllib

    root = Path(__file__).resolve().parent.parent
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"resmoe-convert", "resmoe-inspect", "resmoe-restore", "resmoe-export", "resmoe-generate"} <= set(scripts)
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_export_rejects_unsupported_target(tmp_path, capsys):
    from converters.cli.export import main

    assert main([str(tmp_path / "x.rmoe"), "--to", "tflite", str(tmp_path / "o")]) == 2
    assert "supported: gguf, gguf-rmoe, onnx, safetensors, rmoe, compressed-tensors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_spec_worked_example_matches_spec(tmp_path):
    """spec/FORMAT.md section 9 is the printed output of spec/worked_example.py."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "spec" / "worked_example.py"), str(tmp_path / "we.rmoe"),
         "--check", str(root / "spec" / "FORMAT.md")],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def test_readme_figures_are_the_results_files_figures():
    """Every figure block in README.md is what benchmarks/readme_figures.py copies from benchmarks/results."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "readme_figures.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_minimal_install_reads_verifies_inspects_and_restores_without_torch(tmp_path):
    """`pip install <repo>` (no extras) in a fresh venv: no torch; the reader, resmoe-inspect and resmoe-restore
    work on a file. Skips when the package registry cannot be reached."""
    import json
    import os

    root = Path(__file__).resolve().parent.parent
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_ = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = subprocess.run([str(bin_ / "pip"), "install", "--quiet", str(root)], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    if pip.returncode and any(s in pip.stdout + pip.stderr for s in (
            "NewConnectionError", "Temporary failure in name resolution", "No matching distribution found",
            "Network is unreachable", "ConnectTimeout")):
        pytest.skip("the package registry cannot be reached: " + pip.stderr.strip().splitlines()[-1])
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    listed = subprocess.run([str(bin_ / "pip"), "list", "--format", "json"], capture_output=True, text=True,
                            env=env, check=True)
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"resmoe", "numpy", "safetensors", "ml-dtypes"} <= names
    assert not names & {"torch", "scipy", "transformers", "gguf", "onnx"}, names
    code = f"""
import sys
import numpy as np
import resmoe_format
from resmoe_format import restore
from resmoe_format.demo import build
from safetensors.numpy import load_file
p = build({str(tmp_path / 'd.rmoe')!r}, layers=2, experts=3, hidden=8, inter=8)
with resmoe_format.open(p) as r:
    r.verify(records=True)
    want = dict(restore.restore_all(r, True))
got = load_file({str(tmp_path / 'out' / 'model.safetensors')!r}) if len(sys.argv) > 1 else None
if got is not None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        assert np.array_equal(np.asarray(got[k]).view(np.uint8), np.asarray(want[k]).view(np.uint8)), k
assert "torch" not in sys.modules
"""
    run = dict(capture_output=True, text=True, env=env, cwd=tmp_path)
    out = subprocess.run([str(bin_ / "python"), "-c", code], **run)
    assert out.returncode == 0, out.stderr
    f = str(tmp_path / "d.rmoe")
    for cmd in (["resmoe-inspect", f], ["resmoe-inspect", f, "--verify", "--json"],
                ["resmoe-restore", f, str(tmp_path / "out"), "--original-order"]):
        out = subprocess.run([str(bin_ / cmd[0]), *cmd[1:]], **run)
        assert out.returncode == 0, (cmd, out.stdout, out.stderr)
    assert json.loads(subprocess.run([str(bin_ / "resmoe-inspect"), f, "--verify", "--json"], **run).stdout)[
        "verified"] == "records"
    out = subprocess.run([str(bin_ / "python"), "-c", code, "restored"], **run)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([str(bin_ / "resmoe-convert"), "x", "y.rmoe"], **run)
    assert out.returncode == 2 and "pip install 'resmoe[convert]'" in out.stderr, out.stderr
