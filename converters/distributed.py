"""Layer-parallel, resumable conversion on torch.distributed.

Every rank builds the same :class:`~converters.convert.Plan` and takes a share of the compressed
layers, balanced by their source bytes (largest first, each to the least loaded rank). A rank
writes each finished layer as a *part*, a one-layer ``.rmoe`` file (CRC-32 of every tensor, published
atomically: a half-written part is only a hidden temporary) in the work directory ``OUT.rmoe.parts/``
beside the output, named ``layer-00003.rmoe`` and keyed by a hash of the source and the flags. Rank 0
then streams the embedded files, the passthrough tensors and the parts, in layer order, through the
same writer a single-process run uses, so the output is byte for byte that run's for any number of
ranks; it publishes the file atomically and removes the work directory. A failed run keeps the work
directory; ``--resume`` reuses every part that is complete, verified and made from the same source and
flags, and computes only the rest.

Launch: ``resmoe-convert ... --workers N`` starts N local ranks (torch.multiprocessing); under
``torchrun`` (``RANK``/``WORLD_SIZE`` set) every process is a rank and the work directory must be on a
filesystem all nodes share. The process group is gloo for CPU tensors and NCCL for CUDA ones.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

import resmoe_format
from resmoe_format import MoELayer, Writer
from resmoe_format.codecs import Encoded
from resmoe_format.container import Reader
from resmoe_format.errors import RmoeFormatError
from resmoe_format.publish import PARTIAL
from resmoe_format.shards import open_writer

from .convert import (ConvertOptions, Plan, check_finite, convert_layer, finish_report, new_report,
                      write_head)
from .errors import ConversionError
from .paths import PathError, check_paths

PARTS = ".parts"
#: How long a rank waits for the others at a barrier (the slowest rank's layers): seconds, overridable by
#: the environment variable RESMOE_DIST_TIMEOUT. A rank that dies is noticed by the launcher at once.
DEFAULT_TIMEOUT = 7 * 24 * 3600
_PART = re.compile(r"^layer-(\d+)\.rmoe$")


def parts_dir(out: str | os.PathLike) -> Path:
    """The work directory of ``out``: ``OUT.rmoe.parts`` beside it."""
    out = Path(out)
    return out.parent / f"{out.name}{PARTS}"


def part_path(work: Path, index: int) -> Path:
    return work / f"layer-{index:05d}.rmoe"


def in_torchrun() -> bool:
    """Whether this process is one rank of a torchrun (or other env:// launched) job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def layer_bytes(lay) -> int:
    """A layer's expert bytes in the checkpoint: the measure ranks are balanced by."""
    from resmoe_format.dtypes import by_name

    n = 0
    for m in lay.matrices:
        numel = 1
        for d in m.shape:
            numel *= d
        n += numel * by_name(m.dtype).itemsize
    return n * lay.num_experts


def balance(sizes: list[int], ranks: int) -> list[list[int]]:
    """Positions of ``sizes`` per rank: largest first, each to the least loaded rank (ties: the lower
    position, the lower rank), every list in ascending order."""
    load = [0] * ranks
    out: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        load[r] += sizes[i]
        out[r].append(i)
    return [sorted(x) for x in out]


def part_key(plan: Plan) -> str:
    """What a part's bytes depend on: the source files (path, size, modification time), the config,
    every flag that changes the output, the device type and the writer's version."""
    from resmoe_format import __version__

    files = sorted({i.file for i in plan.ckpt.tensors.values()})
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    flags = {k: v for k, v in asdict(plan.options).items() if k not in ("device", "max_shard_size")}
    doc = {"files": stats, "config": hashlib.sha256(json.dumps(plan.ckpt.config, sort_keys=True).encode()).hexdigest(),
           "flags": flags, "device": plan.device.type, "writer": __version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def part_writer(path: Path, index: int, key: str) -> Writer:
    """The writer of one finished layer's part: a one-layer .rmoe file carrying the key; its report entry
    goes into ``writer.method["part"]["report"]`` before it is closed."""
    return Writer(path, {"part_of": "resmoe-convert"}, {"part": {"key": key, "layer": index, "report": None}})


def open_part(path: Path, key: str, index: int) -> Reader:
    """A part, open; RmoeFormatError unless it is a complete, verified part of layer ``index`` made with
    ``key``."""
    r = resmoe_format.open(path, shard_only=True)
    try:
        meta = r.schema.method.get("part")
        if not isinstance(meta, dict) or meta.get("key") != key or meta.get("layer") != index \
                or [lay.index for lay in r.layers] != [index] or not isinstance(meta.get("report"), dict):
            raise RmoeFormatError(f"{path}: not a part of layer {index} of this conversion")
        r.verify(records=False)
    except BaseException:
        r.close()
        raise
    return r


def stream_part(r: Reader, w) -> None:
    """Write a part's layer into ``w`` expert by expert (:meth:`Writer.add_layer_stream`): the same parts in
    the same order, a tensor named by several records of an expert given as one array (shared again)."""
    spec = r.layers[0]
    arrays: dict[str, Any] = {}

    def get(name: str):
        if name not in arrays:
            arrays[name] = r.tensor(name).copy()
        return arrays[name]

    def enc(ref, m: str) -> Encoded:
        return Encoded(ref.encoding, spec.matrix(m).shape2d, ref.value_dtype,
                       {p: get(t) for p, t in ref.tensors.items()}, dict(ref.params), ref.quant)

    def experts():
        for res in spec.residuals:
            arrays.clear()
            yield {m: (enc(ref, m) if ref is not None else None) for m, ref in res.items()}
            r.release()

    base = {m: enc(ref, m) for m, ref in spec.base.items()}
    perms = None if spec.permutations is None else [get(p) for p in spec.permutations]
    layer = MoELayer(spec.index, spec.num_neurons, list(spec.matrices), spec.base_kind, base, [], perms,
                     list(spec.sources), spec.prefix)
    if spec.extensions:
        layer.residuals = list(experts())
        layer.extensions = {k: ({**v, "tensors": {p: get(t) for p, t in v["tensors"].items()}} if "tensors" in v
                                else dict(v)) for k, v in spec.extensions.items()}
        w.add_layer(layer)
        return
    ck = r.schema.checksum["tensor"]
    w.add_layer_stream(layer, experts(), sum(t.nbytes for n, t in r.header.tensors.items() if n != ck))


def prepare_work(work: Path, resume: bool) -> None:
    """Create the work directory, or (``resume``) clear the hidden temporaries a killed run left in it.
    Without ``resume`` an existing work directory with parts is refused."""
    if work.exists() and not work.is_dir():
        raise PathError(f"work directory {work} exists and is not a directory")
    if work.is_dir():
        names = os.listdir(work)
        if names and not resume:
            raise PathError(f"work directory {work} holds the parts of an earlier run: rerun with --resume to reuse "
                            f"them, or remove it")
        for n in names:
            if PARTIAL in n and n.startswith("."):
                (work / n).unlink(missing_ok=True)
    else:
        work.mkdir()


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("RESMOE_DIST_TIMEOUT", DEFAULT_TIMEOUT)))


def _device(options: ConvertOptions, local_rank: int) -> ConvertOptions:
    """A rank's device: with ``auto`` or ``cuda`` and GPUs present, GPU ``local_rank`` modulo their number."""
    import torch

    if options.device in ("auto", "cuda") and torch.cuda.is_available():
        options = ConvertOptions(**{**asdict(options), "device": f"cuda:{local_rank % torch.cuda.device_count()}"})
    return options


def check_distributable(options: ConvertOptions) -> None:
    """Refuse what the layer-parallel path does not run: ``--bits`` (one allocation over all layers)."""
    if options.bits is not None:
        raise ConversionError("--bits allocates one budget over all layers; it does not run with --workers, "
                              "--resume or torchrun yet")


def run_rank(src: str | Path, out: str | Path, options: ConvertOptions, config: str | Path | None = None,
             progress: bool = False, resume: bool = False) -> dict[str, Any] | None:
    """This process's share of a distributed conversion (torch.distributed initialised from the environment
    when ``WORLD_SIZE`` > 1, else a single rank); rank 0 writes ``out`` and returns the report."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    check_distributable(options)
    group = world > 1
    if group and not dist.is_initialized():
        if torch.cuda.is_available():  # NCCL for CUDA tensors (each rank on its own GPU), gloo for CPU ones
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", timeout=_timeout())
    try:
        return _run(src, out, _device(options, local), config, progress, resume, rank, world, group)
    finally:
        if group and dist.is_initialized():
            dist.destroy_process_group()


def _barrier(group: bool) -> None:
    if group:
        import torch.distributed as dist

        dist.barrier()


def _run(src, out, options, config, progress, resume, rank, world, group) -> dict[str, Any] | None:
    plan = Plan(src, out, options, config, progress and rank == 0, check=False)
    work = parts_dir(out)
    try:
        if rank == 0:
            check_paths(plan.inputs, dirs=[work], force=True)
            prepare_work(work, resume)
            for name in plan.passthrough:  # refused before any layer work, as a single-process run does
                check_finite(name, plan.ckpt.get(name))
            plan.ckpt.release()
        _barrier(group)
        key = part_key(plan)
        mine = [plan.layouts[i] for i in balance([layer_bytes(lay) for lay in plan.layouts], world)[rank]]
        bar = tqdm(mine, desc=f"rank 0 of {world}: {plan.options.method}", unit="layer", disable=not progress)
        for lay in bar:
            path = part_path(work, lay.index)
            if resume and path.exists():
                try:
                    open_part(path, key, lay.index).close()
                    continue
                except RmoeFormatError:
                    path.unlink()
            for s in lay.sources:
                check_finite(s.name, plan.ckpt.get(s.name))
            with part_writer(path, lay.index, key) as pw:
                pw.method["part"]["report"] = convert_layer(plan, lay, pw)
        _barrier(group)
        if rank != 0:
            return None
        report = assemble(plan, work, key, progress)
        shutil.rmtree(work, ignore_errors=True)
        return report
    finally:
        plan.ckpt.close()


def assemble(plan: Plan, work: Path, key: str, progress: bool = False) -> dict[str, Any]:
    """Rank 0: the output from the checkpoint's files and passthrough tensors and the parts, in layer order."""
    t0 = time.perf_counter()
    report = new_report(plan)
    with open_writer(plan.out, report["model"], report["method"], plan.max_shard_size) as w:
        write_head(plan, w, progress)
        for lay in tqdm(plan.layouts, desc="assembling", unit="layer", disable=not progress):
            path = part_path(work, lay.index)
            try:
                r = open_part(path, key, lay.index)
            except RmoeFormatError as e:
                raise ConversionError(f"layer {lay.index}: its part is missing or damaged ({e}); rerun with "
                                      f"--resume") from None
            with r:
                stream_part(r, w)
                report["layers"].append(r.schema.method["part"]["report"])
    return finish_report(plan, report, w, t0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, args: tuple, result: str) -> None:
    """One local rank started by :func:`convert_workers` (a child process)."""
    import warnings

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from .cli.common import run_cli

    report: dict[str, Any] | None = None

    def body() -> int:
        nonlocal report
        report = run_rank(*args)
        return 0

    with warnings.catch_warnings():
        code = run_cli(f"resmoe-convert: rank {rank}", body)
    if code:
        sys.exit(code)
    if report is not None:
        Path(result).write_text(json.dumps(report))


def convert_workers(src: str | Path, out: str | Path, options: ConvertOptions, config: str | Path | None = None,
                    workers: int = 2, progress: bool = False, resume: bool = False) -> dict[str, Any]:
    """``resmoe-convert --workers N``: N local ranks (spawned processes, gloo/NCCL on localhost); the report.

    A rank that fails or dies ends the run with a ConversionError naming it; nothing is written at
    ``out``, and the finished parts stay for ``--resume``."""
    import torch.multiprocessing as mp

    if workers < 1:
        raise ConversionError(f"--workers must be at least 1, got {workers}")
    check_distributable(options)
    Plan(src, out, options, config, check=False).ckpt.close()  # every check that needs no weights, here and now
    if workers == 1:
        return run_rank(src, out, options, config, progress, resume)
    from resmoe_format.publish import scratch_path

    with scratch_path(out) as result:
        try:
            mp.start_processes(_spawned, (workers, _free_port(), (src, out, options, config, progress, resume),
                                          str(result)), nprocs=workers, join=True, start_method="spawn")
        except mp.ProcessExitedException as e:
            how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with status {e.exit_code}"
            raise ConversionError(f"rank {e.error_index} of {workers} {how}; nothing was written to {out} "
                                  f"(rerun with --resume to reuse the layers finished in {parts_dir(out)})") from None
        except mp.ProcessRaisedException as e:
            raise ConversionError(f"rank {e.error_index} of {workers} failed: {str(e).strip().splitlines()[-1]}; "
                                  f"nothing was written to {out}") from None
        return json.loads(result.read_text())


__all__ = ["run_rank", "convert_workers", "parts_dir", "balance", "in_torchrun", "part_key", "assemble"]
