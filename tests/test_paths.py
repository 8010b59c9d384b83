"""Files a command must never destroy: every CLI resolves its paths first and refuses, with one
line and exit status 2, an output that is or lies inside an input, an output named twice, an
output whose directory is missing, a file output that is a directory and a non-empty output
directory without --force; the inputs stay byte-identical and nothing new appears. Also: a
failed restore leaves nothing, created files get the user's umask, no errno text reaches a user."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from converters.cli.common import os_error_line, run_cli
from converters.cli.convert import main as convert_main
from converters.cli.export import main as export_main
from converters.cli.restore import main as restore_main
from converters.convert import ConvertOptions, convert
from hf_models import build_checkpoint
from resmoe_format import publish


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("made")
    src = build_checkpoint("mixtral", d / "src", "bf16")
    convert(src, d / "tiny.rmoe", ConvertOptions(keep=0.5), progress=False)
    return src, d / "tiny.rmoe"


@pytest.fixture
def work(made, tmp_path, monkeypatch) -> Path:
    """tmp_path holding ``src/`` (a checkpoint) and ``tiny.rmoe``; the current directory."""
    shutil.copytree(made[0], tmp_path / "src")
    shutil.copy(made[1], tmp_path / "tiny.rmoe")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too): a file's SHA-256, or 'dir'."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(main, args: list[str], root: Path, capsys, match: str) -> None:
    before = snapshot(root)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "Errno" not in err, err
    assert snapshot(root) == before  # every input byte-identical, nothing new (not even a temporary)


# --- the cases of issue 11 (each exited 0 and overwrote an input) ----------------------------------

def test_convert_output_inside_the_source_directory(work, capsys):
    refused(convert_main, ["src", "src/config.json", "-q"], work, capsys,
            "output src/config.json lies inside the input directory src")


def test_library_convert_checks_the_same_paths(work):
    """convert() refuses what the CLI refuses, for callers that never go through resmoe-convert."""
    from converters.paths import PathError

    before = snapshot(work)
    for out, match in (("src/config.json", "lies inside the input directory"), ("nodir/x.rmoe", "does not exist")):
        with pytest.raises(PathError, match=match):
            convert(Path("src"), Path(out), ConvertOptions(), progress=False)
    assert snapshot(work) == before


def test_report_over_the_source_weights(work, capsys):
    refused(convert_main, ["src", "out.rmoe", "-q", "--report", "src/model.safetensors"], work, capsys,
            "output src/model.safetensors lies inside the input directory src")


def test_report_over_the_output(work, capsys):
    refused(convert_main, ["src", "out.rmoe", "-q", "--report", "out.rmoe"], work, capsys, "out.rmoe is named twice")
    refused(convert_main, ["src", "out.rmoe", "-q", "--report", "./sub/../out.rmoe"], work, capsys, "named twice")


@pytest.mark.parametrize("target", ["onnx", "gguf", "gguf-rmoe", "rmoe"])
def test_export_over_its_input(work, capsys, target):
    refused(export_main, ["tiny.rmoe", "--to", target, "tiny.rmoe"], work, capsys,
            "output tiny.rmoe is the input tiny.rmoe")


def test_onnx_data_file_over_the_input(work, capsys):
    os.rename("tiny.rmoe", "m.onnx.data")
    refused(export_main, ["m.onnx.data", "--to", "onnx", "m.onnx"], work, capsys, "is the input m.onnx.data")


@pytest.mark.parametrize("main", [restore_main, lambda a: export_main([a[0], "--to", "safetensors", *a[1:]])])
def test_restore_into_the_source_checkpoint(work, capsys, main):
    refused(main, ["tiny.rmoe", "src"], work, capsys, "output directory src is not empty; pass --force")


def test_report_in_a_missing_directory_fails_before_converting(work, capsys):
    refused(convert_main, ["src", "out.rmoe", "-q", "--report", "nodir/r.json"], work, capsys,
            "directory nodir does not exist")


def test_output_is_an_existing_directory(work, capsys):
    (work / "existing_dir").mkdir()
    refused(convert_main, ["src", "existing_dir/", "-q"], work, capsys, "output existing_dir is an existing directory")
    refused(export_main, ["tiny.rmoe", "--to", "gguf-rmoe", "existing_dir"], work, capsys, "is an existing directory")


def test_restore_to_a_file(work, capsys):
    refused(restore_main, ["tiny.rmoe", "src/config.json"], work, capsys,
            "output directory src/config.json exists and is not a directory")


# --- links, file sources, hard links -------------------------------------------------------------

def test_file_source_config_and_side_files(work, capsys):
    (work / "src" / "tokenizer.json").write_text("{}")
    for out in ("src/config.json", "src/tokenizer.json", "src/model.safetensors"):
        refused(convert_main, ["src/model.safetensors", out, "-q"], work, capsys, f"output {out} is the input {out}")
    os.rename("src/config.json", "cfg.json")
    refused(convert_main, ["src/model.safetensors", "o.rmoe", "--config", "cfg.json", "--report", "cfg.json", "-q"],
            work, capsys, "output cfg.json is the input cfg.json")


def test_symbolic_and_hard_links(work, capsys):
    os.symlink("src/model.safetensors", "link.safetensors")
    refused(convert_main, ["src", "link.safetensors", "-q"], work, capsys, "(a link to ")
    os.symlink("src", "srclink")
    refused(convert_main, ["srclink", "src/out.rmoe", "-q"], work, capsys, "lies inside the input directory srclink")
    os.link("src/model.safetensors", "hard.safetensors")
    refused(convert_main, ["src", "hard.safetensors", "-q"], work, capsys, "is the input src")
    os.link("tiny.rmoe", "hard.rmoe")
    refused(export_main, ["tiny.rmoe", "--to", "gguf-rmoe", "hard.rmoe"], work, capsys, "is the input tiny.rmoe")


def test_linked_shard_of_a_directory_source(work, capsys):
    """A hub snapshot's files are links to blobs elsewhere: the blobs are inputs too."""
    blobs = work / "blobs"
    blobs.mkdir()
    os.rename("src/model.safetensors", blobs / "abc")
    os.symlink(blobs / "abc", "src/model.safetensors")
    refused(convert_main, ["src", "blobs/abc", "-q"], work, capsys, "is the input src/model.safetensors")


# --- restore: --force, empty directories, failures -------------------------------------------------

def test_restore_force_replaces_files_and_keeps_the_rest(work, capsys):
    (work / "out").mkdir()
    (work / "out" / "notes.txt").write_text("mine")
    (work / "out" / "config.json").write_text("old")
    assert restore_main(["tiny.rmoe", "out", "--force"]) == 0
    assert (work / "out" / "notes.txt").read_text() == "mine"
    assert (work / "out" / "config.json").read_bytes() == (work / "src" / "config.json").read_bytes()
    assert (work / "out" / "model.safetensors").is_file()
    assert not [p for p in (work / "out").iterdir() if p.name.startswith(".")]


def test_restore_force_never_writes_over_its_input(work, capsys):
    (work / "d").mkdir()
    os.rename("tiny.rmoe", "d/model.safetensors")
    refused(restore_main, ["d/model.safetensors", "d", "--force"], work, capsys,
            "d/model.safetensors is the input d/model.safetensors")


def test_restore_into_an_empty_directory(work):
    (work / "empty").mkdir()
    assert restore_main(["tiny.rmoe", "empty"]) == 0
    assert sorted(p.name for p in (work / "empty").iterdir()) == ["config.json", "generation_config.json",
                                                                  "model.safetensors"]


def test_failed_restore_leaves_nothing(work, capsys):
    bad = work / "bad.rmoe"
    data = bytearray((work / "tiny.rmoe").read_bytes())
    data[-100] ^= 0xFF  # a tensor byte: fails its checksum during the restore
    bad.write_bytes(bytes(data))
    refused(restore_main, ["bad.rmoe", "out"], work, capsys, "crc32 mismatch")
    refused(restore_main, ["missing.rmoe", "out"], work, capsys, "missing.rmoe")
    refused(restore_main, ["tiny.rmoe", "nodir/out"], work, capsys, "directory nodir does not exist")


# --- umask -----------------------------------------------------------------------------------------

@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_created_files_get_the_umask(work, umask, monkeypatch):
    from converters.exporters import onnx_export

    class Program:  # what torch.onnx.export returns, without the slow tracing
        def save(self, path, external_data=None):
            Path(path).write_bytes(b"onnx")
            Path(f"{path}.data").write_bytes(b"data")

    monkeypatch.setattr(onnx_export, "_export", lambda *a: Program())
    assert convert_main(["src", "o.rmoe", "-q", "--report", "r.json"]) == 0
    assert restore_main(["o.rmoe", "restored"]) == 0
    assert export_main(["o.rmoe", "--to", "gguf-rmoe", "o.gguf"]) == 0
    assert export_main(["o.rmoe", "--to", "gguf", "f.gguf"]) == 0
    assert export_main(["o.rmoe", "--to", "onnx", "m.onnx"]) == 0
    with publish.atomic_path(work / "a.bin") as p:
        p.write_bytes(b"x")
    files = ["o.rmoe", "r.json", "o.gguf", "f.gguf", "m.onnx", "m.onnx.data", "a.bin", "restored/model.safetensors",
             "restored/config.json"]
    for f in files:
        assert (work / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert (work / "restored").stat().st_mode & 0o777 == 0o777 & ~umask


# --- publish helper and messages -------------------------------------------------------------------

def test_publish_removes_the_temporary_on_failure(tmp_path):
    (tmp_path / "t").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with publish.atomic_open(tmp_path / "t") as f:
            f.write(b"new")
            raise RuntimeError
    with pytest.raises(RuntimeError):
        with publish.atomic_dir(tmp_path / "d") as d:
            (d / "x").write_bytes(b"x")
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"] and (tmp_path / "t").read_bytes() == b"old"
    publish.write_bytes(tmp_path / "t", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"] and (tmp_path / "t").read_bytes() == b"new"


def test_os_errors_name_the_users_path_without_errno(tmp_path, capsys):
    tmp = publish.temp_name(tmp_path / "out.rmoe")
    assert publish.user_path(tmp) == str(tmp_path / "out.rmoe")
    assert publish.user_path(tmp / "sub" / "x.json") == str(tmp_path / "out.rmoe" / "sub" / "x.json")
    e = IsADirectoryError(21, "Is a directory", str(tmp), None, str(tmp_path / "out"))
    assert os_error_line(e) == f"{tmp_path / 'out'}: Is a directory"

    def body():
        raise FileExistsError(17, "File exists", str(tmp))

    assert run_cli("prog", body) == 2
    assert capsys.readouterr().err == f"prog: error: {tmp_path / 'out.rmoe'}: File exists\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_output_directory(work, capsys):
    ro = work / "ro"
    ro.mkdir(mode=0o555)
    refused(convert_main, ["src", "ro/o.rmoe", "-q"], work, capsys, "directory ro is not writable")
    refused(restore_main, ["tiny.rmoe", "ro/out"], work, capsys, "directory ro is not writable")
