"""Layer-parallel conversion (--workers, torchrun) and --resume: the output is byte for byte the
single-process run's; a rank that dies leaves no output, and --resume finishes the job."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from converters import distributed
from converters.convert import ConvertOptions, convert
from converters.distributed import balance, convert_workers, parts_dir
from converters.errors import ConversionError
from converters.example import write_mixtral_checkpoint
from converters.paths import PathError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dist")
    write_mixtral_checkpoint(d / "src", layers=4, hidden=32, inter=128, experts=4, vocab=128)
    convert(d / "src", d / "one.rmoe", ConvertOptions(), progress=False)
    return {"src": d / "src", "one": d / "one.rmoe"}


def test_balance_by_size():
    assert balance([5, 1, 4, 2, 3], 2) == [[0, 1, 3], [2, 4]]  # 5+2+1 and 4+3
    assert balance([1, 1], 3) == [[0], [1], []]
    assert balance([], 2) == [[], []]


def test_parts_pipeline_resumes_and_gives_the_same_bytes(single, tmp_path, monkeypatch):
    """One rank in-process: what every rank runs. A damaged part and a half-written one are ignored."""
    out = tmp_path / "o.rmoe"
    assert convert_workers(single["src"], out, ConvertOptions(), workers=1)["summary"]["file_bytes"] \
        == single["one"].stat().st_size
    assert out.read_bytes() == single["one"].read_bytes() and not parts_dir(out).exists()
    # a killed run's leftovers: layer 0 complete, layer 1 truncated, layer 2 half-written (hidden temporary)
    out.unlink()
    work = parts_dir(out)
    calls = []
    real, real_assemble = distributed.convert_layer, distributed.assemble
    monkeypatch.setattr(distributed, "convert_layer", lambda plan, lay, w: calls.append(lay.index) or
                        real(plan, lay, w))
    monkeypatch.setattr(distributed, "assemble", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        convert_workers(single["src"], out, ConvertOptions(), workers=1)
    monkeypatch.undo()
    assert sorted(p.name for p in work.iterdir()) == [f"layer-0000{i}.rmoe" for i in range(4)] and not out.exists()
    data = (work / "layer-00001.rmoe").read_bytes()
    (work / "layer-00001.rmoe").write_bytes(data[:len(data) // 2])
    (work / "layer-00002.rmoe").rename(work / ".layer-00002.rmoe.partial-1234abcd")
    (work / "layer-00003.rmoe").unlink()
    with pytest.raises(PathError, match="rerun with --resume"):
        convert_workers(single["src"], out, ConvertOptions(), workers=1)
    calls.clear()
    monkeypatch.setattr(distributed, "convert_layer", lambda plan, lay, w: calls.append(lay.index) or
                        real(plan, lay, w))
    convert_workers(single["src"], out, ConvertOptions(), workers=1, resume=True)
    assert calls == [1, 2, 3]
    assert out.read_bytes() == single["one"].read_bytes() and not work.exists()
    # parts made with other flags are not reused
    monkeypatch.setattr(distributed, "assemble", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        convert_workers(single["src"], out, ConvertOptions(), workers=1)
    monkeypatch.setattr(distributed, "assemble", real_assemble)
    calls.clear()
    convert_workers(single["src"], out, ConvertOptions(keep=0.4), workers=1, resume=True)
    assert calls == [0, 1, 2, 3]
    assert out.read_bytes() == (convert(single["src"], tmp_path / "k.rmoe", ConvertOptions(keep=0.4), progress=False)
                                and (tmp_path / "k.rmoe").read_bytes())


def test_bits_is_refused_with_workers(single, tmp_path):
    with pytest.raises(ConversionError, match="--bits allocates one budget"):
        convert_workers(single["src"], tmp_path / "o.rmoe", ConvertOptions(bits=3.0), workers=1)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converters.cli.convert", *args, "-q"], env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_two_ranks_give_the_same_bytes(single, tmp_path):
    """--workers 2: two spawned ranks on gloo."""
    report = convert_workers(single["src"], tmp_path / "w.rmoe", ConvertOptions(), workers=2)
    assert (tmp_path / "w.rmoe").read_bytes() == single["one"].read_bytes()
    assert [lay["index"] for lay in report["layers"]] == [0, 1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == ["w.rmoe"]


@pytest.mark.slow
def test_torchrun_sharded_gives_the_same_bytes(single, tmp_path):
    """torchrun --nproc-per-node 2 with --max-shard-size: the same shards and index."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    convert(single["src"], tmp_path / "a" / "m.rmoe", ConvertOptions(max_shard_size="40KB"), progress=False)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                        "converters.cli.convert", str(single["src"]), str(tmp_path / "b" / "m.rmoe"), "-q",
                        "--max-shard-size", "40KB"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    made = sorted(os.listdir(tmp_path / "a"))
    assert len(made) > 2 and sorted(os.listdir(tmp_path / "b")) == made
    for n in made:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def _ranks(pid: int) -> list[int]:
    """The spawned rank processes of a resmoe-convert --workers process."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids if "resource_tracker" not in Path(f"/proc/{k}/cmdline").read_text()]


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_and_resume_finishes_it(single, tmp_path):
    out = tmp_path / "o.rmoe"
    p = subprocess.Popen([sys.executable, "-m", "converters.cli.convert", str(single["src"]), str(out), "-q",
                          "--workers", "2"], env=ENV, stderr=subprocess.PIPE, text=True)
    work = parts_dir(out)
    deadline = time.monotonic() + 120
    while not (work.is_dir() and any(n.startswith("layer-") for n in os.listdir(work))):
        assert p.poll() is None and time.monotonic() < deadline, "no part appeared"
        time.sleep(0.01)
    os.kill(_ranks(p.pid)[-1], signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert "was killed by SIGKILL; nothing was written" in err and "--resume" in err
    assert not out.exists() and any(n.startswith("layer-") for n in os.listdir(work))
    r = run_cli(str(single["src"]), str(out), "--workers", "2", "--resume")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == single["one"].read_bytes() and not work.exists()
    assert sorted(os.listdir(tmp_path)) == ["o.rmoe"]
