"""How a benchmark result was made, recorded next to the result; and repeated timings.

Every script in ``benchmarks/`` calls :func:`collect` once at start, stores the dict under
``"provenance"`` in its JSON and appends :func:`markdown` to its ``.md``, so each results file
says which command, commit, CPU, thread count and library versions produced it.
:func:`repeat` and :func:`spread` give the median of several runs and their range.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUNS = 3  # timings are the median of at least this many runs

# distribution names for the import names a script may list
_DIST = {"ot": "pot", "llama_cpp": "llama-cpp-python", "torch": "torch", "numpy": "numpy", "scipy": "scipy",
         "transformers": "transformers", "gguf": "gguf", "matplotlib": "matplotlib"}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect(packages: Iterable[str] = ("numpy",), **extra: Any) -> dict:
    """Command line, git commit and dirtiness, CPU, threads, load, library versions, and ``extra``."""
    # the results of an earlier script of the same session are outputs, not code: they do not make the run dirty
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(_DIST.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    threads = None
    if "torch" in packages:
        import torch

        threads = torch.get_num_threads()
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT) if sys.argv and sys.argv[0] else "?"
    return {
        "command": shlex.join(["python", script, *sys.argv[1:]]),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads,
        "load_avg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "timing_runs": RUNS,
        **extra,
    }


def last_commit(path: Path) -> str | None:
    """The short hash of the last commit that changed ``path`` (None outside git)."""
    return _git("log", "-1", "--format=%h", "--", str(path)) or None


def markdown(prov: dict) -> str:
    """The provenance as a closing ``.md`` section."""
    commit = prov.get("git_commit") or "unknown"
    dirty = {True: " (working tree with uncommitted changes)", False: "", None: " (dirtiness unknown)"}
    vers = ", ".join(f"{k} {v}" for k, v in prov["versions"].items() if v is not None)
    lines = ["## How this was made", "",
             f"- Command: `{prov['command']}`",
             f"- Commit: `{commit}`{dirty[prov.get('git_dirty')]}, {prov['date_utc']}",
             f"- CPU: {prov['cpu']}, {prov['cpus_usable']} of {prov['cpus']} logical CPUs usable"
             + (f", torch threads {prov['torch_threads']}" if prov.get("torch_threads") else "")
             + (f"; 1-minute load average at start {prov['load_avg_1min_at_start']:.2f}"
                if prov.get("load_avg_1min_at_start") is not None else ""),
             f"- Python {prov['python']} on {prov['platform']}; {vers}"]
    skip = {"command", "git_commit", "git_dirty", "date_utc", "cpu", "cpus", "cpus_usable", "torch_threads",
            "load_avg_1min_at_start", "python", "platform", "versions", "timing_runs"}
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in prov.items() if k not in skip]
    if prov.get("timing_runs"):
        lines.append(f"- Timings: median of {prov['timing_runs']} runs unless a column says otherwise.")
    return "\n".join(lines) + "\n"


def repeat(fn: Callable[[], Any], runs: int = RUNS) -> tuple[list[float], Any]:
    """Run ``fn`` ``runs`` times: (seconds of each run, the last run's result)."""
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def within_noise(a: dict, b: dict) -> bool:
    """Whether two :func:`spread` results overlap (their min-max ranges intersect)."""
    return a["min"] <= b["max"] and b["min"] <= a["max"]
