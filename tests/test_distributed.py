"""Layer-parallel conversion (--workers, torchrun) and --resume: the output is byte for byte the
single-process run's; a rank that dies leaves no output, and --resume finishes the job."""
from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from converters import distributed
from converters.convert import ConvertOptions, convert
from converters.distributed import balance, convert_workers, parts_dir
from converters.errors import ConversionError
from converters.example import write_mixtral_checkpoint
from converters.paths import PathError
from hf_models import build_checkpoint, tokenizer_json

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


def _kill_a_rank_then_resume(src: Path, out: Path, flags: list[str], first: str) -> None:
    """``resmoe-convert SRC OUT --workers 2 FLAGS``: SIGKILL a rank once a work file named ``first``* appears; the
    run fails naming it and writes nothing; ``--resume`` then succeeds and leaves no work directory."""
    p = subprocess.Popen([sys.executable, "-m", "converters.cli.convert", str(src), str(out), "-q",
                          "--workers", "2", *flags], env=ENV, stderr=subprocess.PIPE, text=True)
    work = parts_dir(out)
    deadline = time.monotonic() + 240
    while not (work.is_dir() and any(n.startswith(first) for n in os.listdir(work))):
        assert p.poll() is None and time.monotonic() < deadline, f"no {first}* file appeared"
        time.sleep(0.01)
    os.kill(_ranks(p.pid)[-1], signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert "was killed by SIGKILL; nothing was written" in err and "--resume" in err
    assert not out.exists() and any(n.startswith(first) for n in os.listdir(work))
    r = run_cli(str(src), str(out), "--workers", "2", "--resume", *flags)
    assert r.returncode == 0, r.stderr
    assert not work.exists()


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_and_resume_finishes_it(single, tmp_path):
    out = tmp_path / "o.rmoe"
    _kill_a_rank_then_resume(single["src"], out, [], "layer-")
    assert out.read_bytes() == single["one"].read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["o.rmoe"]

# ---- --bits and calibrated methods: calibration records, --bits tables, one allocation ----------------------

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n" * 12)


@pytest.fixture(scope="module")
def cal_src(tmp_path_factory) -> dict[str, Path]:
    """A tiny three-layer mixtral with a tokenizer, and calibration text (as tests/test_d2moe.py builds them)."""
    d = tmp_path_factory.mktemp("cal")
    src = build_checkpoint("mixtral", d / "src", "bf16", num_layers=3)
    (src / "tokenizer.json").write_text(tokenizer_json())
    (d / "cal.txt").write_text(TEXT)
    return {"src": src, "cal": d / "cal.txt"}


def _timeless(report: dict) -> dict:
    """A report without its timings and output path (what may differ between runs)."""
    r = json.loads(json.dumps(report))
    for k in ("seconds", "output"):
        r.pop(k)
    for lay in r["layers"]:
        lay.pop("seconds")
    r.get("allocation", {}).pop("measure_seconds", None)
    r.get("calibration", {}).pop("calibration_seconds", None)
    return r


def _same_as_single(cal_src, tmp_path, options: ConvertOptions, workers: int) -> dict:
    """Convert with one process and with ``workers`` ranks: the same bytes and the same report; the report."""
    one = convert(cal_src["src"], tmp_path / "one.rmoe", options, progress=False)
    got = convert_workers(cal_src["src"], tmp_path / "w.rmoe", options, workers=workers)
    assert filecmp.cmp(tmp_path / "one.rmoe", tmp_path / "w.rmoe", shallow=False)
    assert _timeless(got) == _timeless(one)
    assert sorted(os.listdir(tmp_path)) == ["one.rmoe", "w.rmoe"]
    return got


@pytest.mark.parametrize("method, calibrated", [("quant", False), pytest.param("quant", True, marks=pytest.mark.slow),
                                                pytest.param("resmoe", False, marks=pytest.mark.slow),
                                                pytest.param("resmoe", True, marks=pytest.mark.slow)])
def test_bits_two_ranks_give_the_same_bytes_and_report(cal_src, tmp_path, method, calibrated):
    """--bits 3 (and --calibration): tables from both ranks, one allocation, the single process's bytes."""
    o = ConvertOptions(method=method, bits=3.0, calibration=str(cal_src["cal"]) if calibrated else None)
    rep = _same_as_single(cal_src, tmp_path, o, 2)
    assert rep["allocation"]["bits_per_expert_weight"] <= 3.0
    assert (rep["allocation"]["calibration"] is not None) == calibrated


@pytest.mark.slow
def test_d2moe_two_ranks_give_the_same_bytes_and_report(cal_src, tmp_path):
    rep = _same_as_single(cal_src, tmp_path, ConvertOptions(method="d2moe", keep=0.5,
                                                            calibration=str(cal_src["cal"])), 2)
    assert list(rep["calibration"]["tokens"]) == ["0", "1", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [{"residual_keep": 0.3}, {"keep": 0.6, "share_v": True, "prune_base": 0.25},
                                   {"bits": 3.0}, {"bits": 3.0, "method": "resmoe"}])
def test_calibrated_three_ranks_give_the_same_bytes_and_report(cal_src, tmp_path, flags):
    """d2moe (--residual-keep, --share-v with --prune-base, --bits) and resmoe --bits --calibration on 3 ranks."""
    _same_as_single(cal_src, tmp_path, ConvertOptions(**{"method": "d2moe", **flags},
                                                      calibration=str(cal_src["cal"])), 3)


def test_bits_records_resume_recomputing_only_what_is_damaged(cal_src, tmp_path, monkeypatch):
    """One rank in-process: a damaged calibration record is recorded again (only its layer's), a damaged table
    measured again, a missing part encoded again, a half-written record ignored; the same bytes."""
    from converters import quantized
    from converters.encoders import calibrate
    from converters.encoders.bits import BitsConverter

    o = ConvertOptions(method="quant", bits=3.0, calibration=str(cal_src["cal"]))
    ref = tmp_path / "ref.rmoe"
    convert(cal_src["src"], ref, o, progress=False)
    out, work = tmp_path / "o.rmoe", parts_dir(tmp_path / "o.rmoe")
    calls: dict[str, list] = {"calibrate": [], "analyze": [], "encode": []}
    real_collect, real_analyze, real_encode = calibrate.collect, BitsConverter.analyze, quantized.encode_layer
    monkeypatch.setattr(calibrate, "collect", lambda ckpt, moe, layouts, *a, **k: calls["calibrate"].append(
        [lay.index for lay in layouts]) or real_collect(ckpt, moe, layouts, *a, **k))
    monkeypatch.setattr(BitsConverter, "analyze", lambda self, lay, ex: calls["analyze"].append(lay.index) or
                        real_analyze(self, lay, ex))
    monkeypatch.setattr(quantized, "encode_layer", lambda plan, conv, lay, *a: calls["encode"].append(lay.index) or
                        real_encode(plan, conv, lay, *a))
    real_assemble = distributed.assemble
    monkeypatch.setattr(distributed, "assemble", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        convert_workers(cal_src["src"], out, o, workers=1)
    monkeypatch.setattr(distributed, "assemble", real_assemble)
    assert calls == {"calibrate": [[0, 1, 2]], "analyze": [0, 1, 2], "encode": [0, 1, 2]}
    assert sorted(os.listdir(work)) == sorted(f"{k}-0000{i}.{x}" for i in range(3) for k, x in
                                              (("cal", "safetensors"), ("table", "safetensors"), ("layer", "rmoe")))
    cal1 = work / "cal-00001.safetensors"
    cal1.write_bytes(cal1.read_bytes()[:-100])  # truncated: recorded again, as its part is gone too
    (work / "layer-00001.rmoe").unlink()
    table2 = work / "table-00002.safetensors"
    data = bytearray(table2.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in a tensor: fails its CRC-32, measured again; its part is kept
    table2.write_bytes(bytes(data))
    (work / "cal-00000.safetensors").rename(work / ".cal-00000.safetensors.partial-1234abcd")  # its work is done
    for v in calls.values():
        v.clear()
    rep = convert_workers(cal_src["src"], out, o, workers=1, resume=True)
    assert calls == {"calibrate": [[1]], "analyze": [2], "encode": [1]}
    assert filecmp.cmp(out, ref, shallow=False) and not work.exists()
    assert list(rep["allocation"]["calibration"]) == ["0", "1", "2"]


def test_a_record_of_another_run_or_layer_is_not_used(tmp_path):
    """A record of other flags, another layer or another kind fails its check; a missing one names its layer."""
    from converters import workfiles

    work = tmp_path / "w"
    work.mkdir()
    p = workfiles.record_path(work, workfiles.TABLE, 0)
    workfiles.save_record(p, workfiles.TABLE, "k1", 0, {"a": np.zeros(3)}, {})
    assert workfiles.valid(p, workfiles.TABLE, "k1", 0)
    assert not workfiles.valid(p, workfiles.TABLE, "k2", 0) and not workfiles.valid(p, workfiles.TABLE, "k1", 1)
    assert not workfiles.valid(p, workfiles.CAL, "k1", 0)
    with pytest.raises(ConversionError, match="layer 1: its rate–distortion table is missing or damaged"):
        workfiles.load_table(work, "k1", 1)


@pytest.mark.slow
def test_a_killed_rank_of_a_bits_run_and_resume_give_the_same_bytes(cal_src, tmp_path):
    """--bits 3 --calibration on 2 ranks: SIGKILL a rank once a table record is written; --resume finishes it."""
    ref = tmp_path / "ref.rmoe"
    flags = ["--method", "quant", "--bits", "3", "--calibration", str(cal_src["cal"])]
    convert(cal_src["src"], ref, ConvertOptions(method="quant", bits=3.0, calibration=str(cal_src["cal"])),
            progress=False)
    out = tmp_path / "o.rmoe"
    _kill_a_rank_then_resume(cal_src["src"], out, flags, "table-")
    assert filecmp.cmp(out, ref, shallow=False)
    assert sorted(os.listdir(tmp_path)) == ["o.rmoe", "ref.rmoe"]
