"""Package boundaries: resmoe_format needs neither converters nor torch to read a file."""
import subprocess
import sys
from pathlib import Path


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


def test_export_rejects_unsupported_target(tmp_path, capsys):
    from converters.cli.export import main

    assert main([str(tmp_path / "x.rmoe"), "--to", "tflite", str(tmp_path / "o")]) == 2
    assert "supported: gguf, gguf-rmoe, onnx, safetensors, rmoe" in capsys.readouterr().err
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
