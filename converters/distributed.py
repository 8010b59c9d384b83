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

Calibrated conversions (``--calibration`` with ``--bits``, ``--method d2moe``): rank 0 first runs the
calibration, which is sequential through the decoder layers (the forward pass, and d2moe's Fisher backward
pass), and writes each compressed layer's statistics as a checksummed record ``cal-00003.safetensors``
(:mod:`.workfiles`) as soon as that layer's are complete; after a barrier each rank reads only its layers'.
``--bits`` runs its two passes layer-parallel: each rank measures its layers and writes each table as a
record ``table-00003.safetensors`` (resmoe's barycenter and permutations in ``base-00003.safetensors``);
after a barrier every rank reads all tables and runs the one allocation (deterministic: the same tables in
layer order give the same choices), then encodes its layers into parts.
``--resume`` reuses verified records as it reuses parts, and the calibration passes run only as far as the
layers still missing their work need.

The bytes depend on the number of intra-op threads on real-sized layers (BLAS splits long reductions among
them), so the ranks of ``--workers`` keep the single-process run's count; under torchrun (which sets
``OMP_NUM_THREADS=1``) set ``OMP_NUM_THREADS`` to that count for the same bytes.

Launch: ``resmoe-convert ... --workers N`` starts N local ranks (torch.multiprocessing); under
``torchrun`` (``RANK``/``WORLD_SIZE`` set) every process is a rank and the work directory must be on a
filesystem all nodes share. The process group is gloo for CPU tensors and NCCL for CUDA ones.
"""
from __future__ import annotations

import contextlib
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
from collections.abc import Callable
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
from . import workfiles
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
    """What a part's (and a work record's) bytes depend on: the source files (path, size, modification time), the
    config, every flag that changes the output, the calibration text's tokens, the device type and the writer's
    version."""
    from resmoe_format import __version__

    files = sorted({i.file for i in plan.ckpt.tensors.values()})
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    flags = {k: v for k, v in asdict(plan.options).items() if k not in ("device", "max_shard_size")}
    doc = {"files": stats, "config": hashlib.sha256(json.dumps(plan.ckpt.config, sort_keys=True).encode()).hexdigest(),
           "flags": flags, "device": plan.device.type, "writer": __version__,
           "calibration": None if plan.calibration_ids is None else hashlib.sha256(plan.calibration_ids.tobytes())
           .hexdigest()}
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
    the same order, a tensor named by several records given as one array (shared again); a layer with
    extensions or with tensors shared across experts (``--share-v``) is written whole."""
    spec = r.layers[0]
    arrays: dict[str, Any] = {}

    def get(name: str):
        if name not in arrays:
            arrays[name] = r.tensor(name).copy()
        return arrays[name]

    def enc(ref, m: str) -> Encoded:
        return Encoded(ref.encoding, spec.matrix(m).shape2d, ref.value_dtype,
                       {p: get(t) for p, t in ref.tensors.items()}, dict(ref.params), ref.quant)

    seen: set[str] = set()
    shared = False  # a tensor several experts' records name (--share-v): written once, so the layer at once
    for res in spec.residuals:
        names = {t for ref in res.values() if ref is not None for t in ref.tensors.values()}
        shared = shared or bool(names & seen)
        seen |= names

    def experts():
        for res in spec.residuals:
            if not shared:
                arrays.clear()
            yield {m: (enc(ref, m) if ref is not None else None) for m, ref in res.items()}
            if not shared:
                r.release()

    base = {m: enc(ref, m) for m, ref in spec.base.items()}
    perms = None if spec.permutations is None else [get(p) for p in spec.permutations]
    layer = MoELayer(spec.index, spec.num_neurons, list(spec.matrices), spec.base_kind, base, [], perms,
                     list(spec.sources), spec.prefix,
                     base_channels=None if spec.base_channels is None else get(spec.base_channels))
    if spec.extensions or shared:
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


def run_rank(src: str | Path, out: str | Path, options: ConvertOptions, config: str | Path | None = None,
             progress: bool = False, resume: bool = False) -> dict[str, Any] | None:
    """This process's share of a distributed conversion (torch.distributed initialised from the environment
    when ``WORLD_SIZE`` > 1, else a single rank); rank 0 writes ``out`` and returns the report."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
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
        key = part_key(plan)
        t0 = time.perf_counter()
        if rank == 0:
            check_paths(plan.inputs, dirs=[work], force=True)
            prepare_work(work, resume)
            for name in plan.passthrough:  # refused before any layer work, as a single-process run does
                check_finite(name, plan.ckpt.get(name))
            plan.ckpt.release()
            if plan.calibration_ids is not None:
                calibrate_work(plan, work, key, resume, progress)
        t_cal = time.perf_counter() - t0
        _barrier(group)
        mine = [plan.layouts[i] for i in balance([layer_bytes(lay) for lay in plan.layouts], world)[rank]]
        sections = None
        if plan.bits:
            sections = _bits(plan, work, key, mine, resume, group, progress, t0)
        elif plan.options.method == "d2moe":
            _d2moe(plan, work, key, mine, resume, progress)

            def sections(tokens):
                return {"calibration": {"calibration_seconds": t_cal, "tokens": tokens}}
        else:
            for lay in _bar(plan, mine, world, progress):
                if not _finished(work, key, lay, resume):
                    check_layer(plan, lay)
                    _write_part(work, key, lay, lambda pw, lay=lay: convert_layer(plan, lay, pw))
        _barrier(group)
        if rank != 0:
            return None
        report = assemble(plan, work, key, progress, sections)
        shutil.rmtree(work, ignore_errors=True)
        return report
    finally:
        plan.ckpt.close()


def _bar(plan: Plan, layouts, world: int, progress: bool, desc: str | None = None):
    return tqdm(layouts, desc=f"rank 0 of {world}: {desc or plan.options.method}", unit="layer", disable=not progress)


def check_layer(plan: Plan, lay) -> None:
    """Refuse NaN or Inf in a layer's experts before any work on it (a single-process run checks every tensor
    before it writes anything)."""
    for s in lay.sources:
        check_finite(s.name, plan.ckpt.get(s.name))


def _finished(work: Path, key: str, lay, resume: bool, remove: bool = True) -> bool:
    """Whether layer ``lay``'s part is there, complete and verified (``resume`` only: a fresh work directory has
    none); a damaged one is removed unless not ``remove``."""
    path = part_path(work, lay.index)
    if not (resume and path.exists()):
        return False
    try:
        open_part(path, key, lay.index).close()
        return True
    except RmoeFormatError:
        if remove:
            path.unlink(missing_ok=True)
        return False


def _write_part(work: Path, key: str, lay, make, tokens: int | None = None) -> None:
    """Layer ``lay``'s part, its layer written and its report entry returned by ``make(writer)``; ``tokens``: its
    calibration token count, for the report."""
    with part_writer(part_path(work, lay.index), lay.index, key) as pw:
        pw.method["part"]["report"] = make(pw)
        if tokens is not None:
            pw.method["part"]["tokens"] = tokens


def calibrate_work(plan: Plan, work: Path, key: str, resume: bool, progress: bool) -> None:
    """Rank 0: the calibration stage, sequential through the decoder layers (one forward pass, and d2moe's
    Fisher backward pass), writing each compressed layer's statistics as a record (:mod:`.workfiles`) as soon
    as they are complete, so that one layer's are held at a time. With ``resume``, a layer whose verified
    record is there, or whose work is already done (its part, and for --bits its table too), is not
    recorded again; the passes then run only as far as the other layers need (a layer's statistics do not
    depend on which others are recorded)."""
    from .encoders import calibrate, fisher

    def needed(lay) -> bool:
        if not resume:
            return True
        if workfiles.valid(workfiles.record_path(work, workfiles.CAL, lay.index), workfiles.CAL, key, lay.index):
            return False
        table = not plan.bits or workfiles.table_done(work, key, lay.index)[0]
        return not (table and _finished(work, key, lay, resume, remove=False))

    need = [lay for lay in plan.layouts if needed(lay)]
    if not need:
        return
    for lay in need:  # the model runs on them
        check_layer(plan, lay)
        plan.ckpt.release()
    if plan.options.method == "d2moe":
        fisher.collect(plan.ckpt, plan.moe_layouts, need, plan.calibration_ids, plan.device, progress,
                       plan.options.allow_unrouted_experts,
                       done=lambda lay, st: workfiles.save_calibration(work, key, lay, st.inputs, st))
    else:
        calibrate.collect(plan.ckpt, plan.moe_layouts, need, plan.calibration_ids, plan.device, progress,
                          recorded=lambda lay, inputs: workfiles.save_calibration(work, key, lay, inputs))
    plan.ckpt.release()


def _bits(plan: Plan, work: Path, key: str, mine, resume: bool, group: bool, progress: bool, t0: float):
    """--bits on this rank: pass 1 (a table record per layer of ``mine``), a barrier, the allocation over every
    layer's table (each rank runs it: the same tables in layer order give the same choices), pass 2 (a part per
    layer of ``mine``). The report's sections from the tables and parts (rank 0)."""
    from .convert import load_experts
    from .quantized import allocate_bits, allocation_report, bits_converter, encode_layer, release_layer

    conv = bits_converter(plan)

    def calibrated(lay) -> int | None:
        """Give ``conv`` layer ``lay``'s calibration statistics alone; its token count (None without)."""
        if plan.calibration_ids is None:
            return None
        st = workfiles.load_calibration(work, key, lay, plan.device)
        conv.inputs = {lay.index: st.inputs}
        if st.base is not None:
            conv.fisher_bases = {lay.index: st.base}
        return st.inputs.tokens

    for lay in tqdm(mine, desc="measuring", unit="layer", disable=not progress):
        if resume:  # the table is reused; so is its base, unless the part that needs it must be encoded again
            table, base = workfiles.table_done(work, key, lay.index)
            if table and (base or _finished(work, key, lay, resume, remove=False)):
                continue
        check_layer(plan, lay)
        tokens = calibrated(lay)
        table = conv.analyze(lay, load_experts(plan, lay))
        workfiles.save_table(work, key, table, conv._bases.pop(lay.index, None), tokens)
        release_layer(plan)
    _barrier(group)
    loaded = [workfiles.load_table(work, key, lay.index) for lay in plan.layouts]
    tables = [t for t, _ in loaded]
    choices, lam = allocate_bits(plan, tables)
    t_measure = time.perf_counter() - t0
    ours = {lay.index for lay in mine}
    for lay, choice in zip(plan.layouts, choices):
        if lay.index not in ours or _finished(work, key, lay, resume):
            continue
        calibrated(lay)
        base = workfiles.load_base(work, key, lay.index, plan.device)
        if base is not None:
            conv._bases[lay.index] = base
        _write_part(work, key, lay, lambda pw, lay=lay, choice=choice: encode_layer(plan, conv, lay, choice, pw))
        conv._bases.pop(lay.index, None)
    tokens = {str(lay.index): {"tokens": n} for lay, (_, n) in zip(plan.layouts, loaded)} \
        if plan.calibration_ids is not None else None
    return lambda _: {"allocation": allocation_report(plan, tables, choices, lam, t_measure, tokens)}


def _d2moe(plan: Plan, work: Path, key: str, mine, resume: bool, progress: bool) -> None:
    """--method d2moe on this rank: a part per layer of ``mine`` from its calibration record."""
    from .delta import d2moe_layer
    from .quantized import expert_kind

    kind = expert_kind(plan)
    for lay in tqdm(mine, desc="d2moe", unit="layer", disable=not progress):
        if _finished(work, key, lay, resume):
            continue
        check_layer(plan, lay)
        st = workfiles.load_calibration(work, key, lay, plan.device)
        _write_part(work, key, lay, lambda pw, lay=lay, st=st: d2moe_layer(plan, lay, st, kind, pw), st.inputs.tokens)
        del st


def assemble(plan: Plan, work: Path, key: str, progress: bool = False,
             sections: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Rank 0: the output from the checkpoint's files and passthrough tensors and the parts, in layer order.
    ``sections(tokens)``: the report's sections after the layers (``allocation``, ``calibration``), given the
    parts' calibration token counts by layer."""
    t0 = time.perf_counter()
    report = new_report(plan)
    tokens: dict[str, Any] = {}
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
                if "tokens" in r.schema.method["part"]:
                    tokens[str(lay.index)] = {"tokens": r.schema.method["part"]["tokens"]}
        if sections is not None:
            report.update(sections(tokens))
    return finish_report(plan, report, w, t0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, args: tuple, result: str, threads: int) -> None:
    """One local rank started by :func:`convert_workers` (a child process), with ``threads`` intra-op threads:
    those of the single-process run, not a share of the cores. The bytes depend on the thread count: BLAS
    splits the reduction of a long product (a Gram X^T X over the calibration tokens) among its threads, and
    ATen's parallel sums and LAPACK's SVD round differently with another count, so a rank with fewer
    threads would write other bytes on real-sized layers (tiny test layers stay below the sizes that split).
    The cores are oversubscribed by the number of ranks instead."""
    import warnings

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(threads)
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


@contextlib.contextmanager
def _passive_waits():
    """Spawned ranks inherit ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy: N ranks of the
    single-process thread count oversubscribe the cores, and OpenMP threads that spin at every barrier
    while another rank holds the core slow each parallel region many times over. The policy changes no
    result, only how idle threads wait."""
    before = os.environ.get("OMP_WAIT_POLICY")
    if before is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_WAIT_POLICY", None)


def convert_workers(src: str | Path, out: str | Path, options: ConvertOptions, config: str | Path | None = None,
                    workers: int = 2, progress: bool = False, resume: bool = False) -> dict[str, Any]:
    """``resmoe-convert --workers N``: N local ranks (spawned processes, gloo/NCCL on localhost); the report.

    A rank that fails or dies ends the run with a ConversionError naming it; nothing is written at
    ``out``, and the finished parts stay for ``--resume``."""
    import torch
    import torch.multiprocessing as mp

    if workers < 1:
        raise ConversionError(f"--workers must be at least 1, got {workers}")
    Plan(src, out, options, config, check=False).ckpt.close()  # every check that needs no weights, here and now
    if workers == 1:
        return run_rank(src, out, options, config, progress, resume)
    from resmoe_format.publish import scratch_path

    with scratch_path(out) as result, _passive_waits():
        try:
            mp.start_processes(_spawned, (workers, _free_port(), (src, out, options, config, progress, resume),
                                          str(result), torch.get_num_threads()), nprocs=workers, join=True,
                               start_method="spawn")
        except mp.ProcessExitedException as e:
            how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with status {e.exit_code}"
            raise ConversionError(f"rank {e.error_index} of {workers} {how}; nothing was written to {out} "
                                  f"(rerun with --resume to reuse the layers finished in {parts_dir(out)})") from None
        except mp.ProcessRaisedException as e:
            raise ConversionError(f"rank {e.error_index} of {workers} failed: {str(e).strip().splitlines()[-1]}; "
                                  f"nothing was written to {out}") from None
        return json.loads(result.read_text())


__all__ = ["run_rank", "convert_workers", "parts_dir", "balance", "in_torchrun", "part_key", "assemble"]
