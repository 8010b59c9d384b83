"""Crash safety: SIGKILL resmoe-convert, resmoe-restore and resmoe-export at random moments; the
target path must then be absent or the complete output of an uninterrupted run, the inputs must be
unchanged, and anything else left behind must be a hidden temporary (``.NAME.partial-*``).

Kill points: fractions of the uninterrupted run's measured wall time (stratified, seeded), and
moments just after the first output file appears (the publish window). The default run samples a few; the
full set (24 timed points per command) is marked slow."""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import resmoe_format
from converters.convert import ConvertOptions, convert
from converters.example import write_mixtral_checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@dataclass
class Command:
    name: str
    module: str
    args: list[str]  # {in} and {out} are replaced by the input and output directories
    target: str  # the output's name in the output directory


COMMANDS = {
    "convert": Command("convert", "converters.cli.convert", ["{in}/src", "{out}/o.rmoe", "-q"], "o.rmoe"),
    "restore": Command("restore", "converters.cli.restore", ["{in}/m.rmoe", "{out}/restored"], "restored"),
    "gguf-rmoe": Command("gguf-rmoe", "converters.cli.export", ["{in}/m.rmoe", "--to", "gguf-rmoe", "{out}/o.gguf"],
                         "o.gguf"),
    "gguf": Command("gguf", "converters.cli.export", ["{in}/m.rmoe", "--to", "gguf", "{out}/f.gguf"], "f.gguf"),
    "rmoe": Command("rmoe", "converters.cli.export", ["{in}/m.gguf", "--to", "rmoe", "{out}/back.rmoe"], "back.rmoe"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("crash_in")
    # the built-in example (no transformers: a fast set-up), sharded: index and shards are inputs
    write_mixtral_checkpoint(d / "src", layers=2, hidden=32, inter=64, experts=4, vocab=128, sharded=True)
    convert(d / "src", d / "m.rmoe", ConvertOptions(), progress=False)
    from resmoe_format.gguf_rmoe import rmoe_to_gguf

    rmoe_to_gguf(d / "m.rmoe", d / "m.gguf")
    return d


def digest(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's SHA-256, or 'dir'."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def start(cmd: Command, ind: Path, out: Path) -> subprocess.Popen:
    args = [a.replace("{in}", str(ind)).replace("{out}", str(out)) for a in cmd.args]
    return subprocess.Popen([sys.executable, "-m", cmd.module, *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def reference(cmd: Command, ind: Path, out: Path) -> tuple[float, dict[str, str]]:
    """An uninterrupted run: its wall time and its output's digest."""
    t0 = time.perf_counter()
    p = start(cmd, ind, out)
    _, err = p.communicate()
    elapsed = time.perf_counter() - t0
    assert p.returncode == 0, err.decode()
    return elapsed, digest_target(out / cmd.target)


def digest_target(target: Path) -> dict[str, str]:
    if target.is_dir():
        return digest(target)
    return {"": hashlib.sha256(target.read_bytes()).hexdigest()}


def kill_run(cmd: Command, ind: Path, out: Path, at: float | None, after_partial: float | None) -> str:
    """Run ``cmd`` and SIGKILL it ``at`` seconds after its start, or ``after_partial`` seconds after
    it creates its first file in the (empty) output directory: the hidden temporary, or the target
    itself for a writer that is not atomic. Returns what happened (for the failure message)."""
    p = start(cmd, ind, out)
    t0 = time.perf_counter()
    seen = None
    while p.poll() is None:
        now = time.perf_counter()
        if seen is None and after_partial is not None and os.listdir(out):
            seen = now
        if (at is not None and now - t0 >= at) or (seen is not None and now - seen >= after_partial):
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    p.wait()
    return f"{cmd.name}: returncode {p.returncode} after {time.perf_counter() - t0:.3f} s"


def check_outcome(cmd: Command, out: Path, want: dict[str, str], what: str) -> bool:
    """The target is absent or the complete output; strays are hidden temporaries. Cleans up.
    Returns whether the target existed."""
    target = out / cmd.target
    strays = [n for n in os.listdir(out) if n != cmd.target]
    bad = [n for n in strays if not re.match(rf"^\.{re.escape(cmd.target)}\.(partial|spill)-[A-Za-z0-9_]+$", n)]
    assert not bad, f"{what}: left {bad}"
    for n in strays:
        shutil.rmtree(out / n) if (out / n).is_dir() else (out / n).unlink()
    if not (target.exists() or target.is_symlink()):
        return False
    assert digest_target(target) == want, f"{what}: the target exists but differs from the uninterrupted output"
    if cmd.target.endswith(".rmoe"):
        with resmoe_format.open(target, verify_checksums=True) as r:
            r.verify()
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return True


def run_kills(name: str, inputs: Path, tmp_path: Path, timed: int, partial_delays: list[float], seed: int) -> None:
    cmd = COMMANDS[name]
    out = tmp_path / "out"
    out.mkdir()
    before = digest(inputs)
    elapsed, want = reference(cmd, inputs, out)
    shutil.rmtree(out / cmd.target) if (out / cmd.target).is_dir() else (out / cmd.target).unlink()
    rng = random.Random(seed)
    points = [((i + rng.random()) / timed * elapsed, None) for i in range(timed)]  # stratified over the run
    points += [(None, d) for d in partial_delays]
    outcomes = []
    for at, after in points:
        what = kill_run(cmd, inputs, out, at, after)
        outcomes.append(check_outcome(cmd, out, want, what))
        assert digest(inputs) == before, f"{what}: an input changed"
    print(f"{name}: run {elapsed:.2f} s; {len(points)} kills, target complete after {sum(outcomes)}")


def test_convert_killed_while_publishing(inputs, tmp_path):
    """The default run: convert killed as its temporary appears. No uninterrupted subprocess run:
    the reference is the fixture's m.rmoe, converted from the same input with the CLI's defaults,
    and the same input and flags give the same bytes."""
    cmd, out = COMMANDS["convert"], tmp_path / "out"
    out.mkdir()
    before = digest(inputs)
    want = {"": hashlib.sha256((inputs / "m.rmoe").read_bytes()).hexdigest()}
    what = kill_run(cmd, inputs, out, None, random.Random(11).random() * 0.01)
    check_outcome(cmd, out, want, what)
    assert digest(inputs) == before


@pytest.mark.parametrize("name", ["restore", "gguf-rmoe"])
def test_killed_at_random_moments(inputs, tmp_path, name):
    run_kills(name, inputs, tmp_path, timed=2, partial_delays=[0.0], seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_killed_at_random_moments_full(inputs, tmp_path, name):
    run_kills(name, inputs, tmp_path, timed=24, partial_delays=[0.0, 0.001, 0.003, 0.01, 0.03], seed=2)


@pytest.mark.slow
def test_sharded_convert_killed_at_random_moments(inputs, tmp_path):
    """--max-shard-size (spec 11.6): after a kill, either no shard and no index (hidden temporaries only), the
    complete set of an uninterrupted run, or (killed between the renames) complete shards without their index,
    which readers refuse."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["{in}/src", "{out}/o.rmoe", "-q", "--max-shard-size", "20KB"]
    cmd = Command("convert-sharded", "converters.cli.convert", args, "o.rmoe.index.json")
    t0 = time.perf_counter()
    p = start(cmd, inputs, out)
    _, err = p.communicate()
    elapsed = time.perf_counter() - t0
    assert p.returncode == 0, err.decode()
    want = digest(out)
    assert len(want) > 2
    shutil.rmtree(out)
    rng = random.Random(5)
    outcomes = []
    for at, after in [((i + rng.random()) / 8 * elapsed, None) for i in range(8)] + [(None, d) for d in (0.0, 0.002)]:
        out.mkdir()
        what = kill_run(cmd, inputs, out, at, after)
        got = {n: h for n, h in digest(out).items() if not re.match(r"^\..*\.(partial|spill)-[A-Za-z0-9_]+$", n)}
        assert all(want.get(n) == h for n, h in got.items()), f"{what}: {sorted(got)} differ from the uninterrupted run"
        if got and "o.rmoe.index.json" not in got:  # killed between the renames: the shards alone are refused
            with pytest.raises(resmoe_format.RmoeFormatError, match="its index .* is missing"):
                resmoe_format.open(out / sorted(got)[0])
        outcomes.append("complete" if got == want else "partial" if got else "none")
        shutil.rmtree(out)
    print(f"sharded convert: run {elapsed:.2f} s; outcomes {outcomes}")
