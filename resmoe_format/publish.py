"""Atomic publishing of output files and directories: the one implementation every writer uses.

An output is written under a hidden temporary name beside its target, ``.NAME.partial-XXXXXXXX``,
fsynced, renamed over the target and the directory fsynced; on any failure the temporary is
removed and the target is untouched. So a target path holds either its old content (or
nothing) or the complete new file. A process killed outright (SIGKILL, power loss) can leave a
stray temporary, under a hidden name that can never be taken for an output. New files and
directories get the user's umask (mode ``0o666 & ~umask``, ``0o777 & ~umask`` for directories),
since the kernel applies it when they are created.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

PARTIAL = ".partial-"
_PARTIAL_NAME = re.compile(r"^\.(.+)\.(?:partial|spill)-[A-Za-z0-9_]+$")


def temp_name(target: str | os.PathLike) -> Path:
    """A fresh hidden name beside ``target`` (nothing is created)."""
    target = Path(target)
    return target.parent / f".{target.name}{PARTIAL}{secrets.token_hex(4)}"


def _create(target: Path, make) -> Path:
    for _ in range(100):
        tmp = temp_name(target)
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


def create_temp(target: str | os.PathLike) -> Path:
    """Create an empty hidden temporary file beside ``target`` (mode ``0o666 & ~umask``)."""
    return _create(Path(target), lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or directory by path (a directory that cannot be opened is skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """fsync the finished file ``tmp``, rename it over ``target`` and fsync the directory."""
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(Path(target).parent)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary path beside ``target`` to write; published to ``target`` if the block
    succeeds, removed if it raises."""
    target = Path(target)
    tmp = create_temp(target)
    try:
        yield tmp
        publish(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(target: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file open for writing, published to ``target`` when the block succeeds."""
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_open(target) as f:
        f.write(data)


@contextmanager
def scratch_path(beside: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary file beside ``beside``, always removed afterwards (never published)."""
    tmp = create_temp(beside)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def scratch_dir(beside: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary directory beside ``beside``, always removed with its content afterwards."""
    tmp = _create(Path(beside), lambda p: os.mkdir(p, 0o777))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary directory beside ``target`` to fill; renamed to ``target`` (which must
    not exist, or be an empty directory) if the block succeeds, removed with its content if it
    raises. Files put in it should be fsynced (e.g. written with :func:`atomic_path`)."""
    target = Path(target)
    tmp = _create(target, lambda p: os.mkdir(p, 0o777))
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def user_path(name: str | os.PathLike) -> str:
    """The path a user asked for, given a path that may be one of this module's temporaries."""
    p = Path(name)
    m = _PARTIAL_NAME.match(p.name)
    if m:
        return str(p.parent / m.group(1))
    for parent in p.parents:  # a file inside a temporary directory
        m = _PARTIAL_NAME.match(parent.name)
        if m:
            return str(parent.parent / m.group(1) / p.relative_to(parent))
    return str(name)


__all__ = ["atomic_path", "atomic_open", "atomic_dir", "scratch_path", "scratch_dir", "create_temp", "publish",
           "write_bytes", "fsync_path", "temp_name", "user_path", "PARTIAL"]
