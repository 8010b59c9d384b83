"""Path safety for the command-line tools: every input and output is resolved before any work.

A run is refused (a :class:`PathError`, one line) when an output is an input or lies inside an
input directory (symbolic and hard links followed), when two outputs are the same path, when an
output's directory does not exist or is not writable, when a file output is an existing
directory, and when a directory output is a non-empty directory (unless ``force``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from .errors import ConversionError

PathLike = str | os.PathLike


class PathError(ConversionError):
    """An input or output path is unsafe or unusable: nothing was done."""


def _forms(p: PathLike) -> set[str]:
    """The names a path may stand for: itself with its directory resolved, and its final target."""
    p = os.path.abspath(os.fspath(p))
    return {os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p)), os.path.realpath(p)}


def _inside(child: str, parent: str) -> bool:
    return child != parent and child.startswith(parent.rstrip(os.sep) + os.sep)


def _same_inode(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class _Inputs:
    """Input files and input directory trees, with every name each may go by."""

    def __init__(self, paths: Iterable[PathLike]):
        self.paths = [Path(p) for p in paths]
        self.forms = [(p, _forms(p)) for p in self.paths]

    def clash(self, out: PathLike) -> str | None:
        """Why writing ``out`` would touch an input, or None."""
        outs = _forms(out)
        for p, forms in self.forms:
            if outs & forms or _same_inode(out, p):
                return f"is the input {p}"
            if os.path.isdir(p) and any(_inside(o, f) for o in outs for f in forms):
                return f"lies inside the input directory {p}"
        return None


def checkpoint_inputs(src: PathLike, config: PathLike | None = None) -> list[Path]:
    """Everything ``resmoe-convert`` reads from a checkpoint: a directory SRC (the whole tree and
    its files, wherever they link to), or a file SRC with its config.json, index and side files;
    and ``config``."""
    from .checkpoint import SIDE_FILES

    src = Path(src)
    out = [src]
    if src.is_dir():  # its entries too: links (a hub snapshot's links to blobs) and hard links lead outside it
        with os.scandir(src) as it:
            out += [Path(e.path) for e in it if not e.is_dir(follow_symlinks=False)]
    else:
        root = src.parent
        out += [root / n for n in ("config.json", "model.safetensors.index.json", *SIDE_FILES)
                if (root / n).exists()]
    if config is not None:
        out.append(Path(config))
    return out


def rmoe_inputs(path: PathLike) -> list[Path]:
    """Everything reading a .rmoe input touches: the file, or a sharded file's index and every shard
    (spec 11: the index or any shard opens the set)."""
    from resmoe_format.shards import input_paths

    return input_paths(path)


def _check_parent(out: Path, what: str) -> None:
    parent = out.parent  # Path("x").parent is Path(".")
    if not parent.exists():
        raise PathError(f"{what} {out}: directory {parent} does not exist")
    if not parent.is_dir():
        raise PathError(f"{what} {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PathError(f"{what} {out}: directory {parent} is not writable")


def check_paths(inputs: Iterable[PathLike], files: Sequence[PathLike] = (), dirs: Sequence[PathLike] = (),
                force: bool = False, forceable: bool = True) -> None:
    """Refuse unsafe or unusable outputs before any work (see the module docstring).

    ``files``: file outputs (``None`` entries are skipped); ``dirs``: directory outputs, which
    must not exist, be empty, or (with ``force``) be writable directories; ``forceable``: whether
    the command has a ``--force`` to suggest.
    """
    ins = _Inputs(inputs)
    seen: list[tuple[Path, set[str]]] = []
    for kind, outs in (("output", files), ("output directory", dirs)):
        for raw in outs:
            if raw is None:
                continue
            out = Path(raw)
            why = ins.clash(out)
            if why:
                link = f" (a link to {os.path.realpath(out)})" if out.is_symlink() else ""
                raise PathError(f"{kind} {out}{link} {why}; refusing to overwrite an input")
            forms = _forms(out)
            for prev, pforms in seen:
                if forms & pforms or _same_inode(out, prev):
                    raise PathError(f"{kind} {out} is named twice (also as {prev}); give each output its own path")
            seen.append((out, forms))
            if kind == "output":
                if out.is_dir():
                    raise PathError(f"output {out} is an existing directory; give a file name")
                _check_parent(out, kind)
            elif out.exists() or out.is_symlink():
                if not out.is_dir():
                    raise PathError(f"output directory {out} exists and is not a directory")
                if any(out.iterdir()):
                    if not force:
                        raise PathError(f"output directory {out} is not empty; " + (
                            "pass --force to write into it" if forceable else "give a new or empty directory"))
                    if not os.access(out, os.W_OK | os.X_OK):
                        raise PathError(f"output directory {out} is not writable")
                else:
                    _check_parent(Path(os.path.realpath(out)), kind)
            else:
                _check_parent(out, kind)


def check_written(outdir: PathLike, names: Iterable[str], inputs: Iterable[PathLike]) -> None:
    """Refuse writing any of ``names`` (relative paths) into ``outdir`` when one is an input or an
    existing directory (``--force`` into a non-empty directory)."""
    ins = _Inputs(inputs)
    for rel in names:
        target = Path(outdir) / rel
        why = ins.clash(target)
        if why:
            raise PathError(f"{target} {why}; refusing to overwrite an input")
        if target.is_dir():
            raise PathError(f"{target} is an existing directory; cannot write the file {rel} there")


__all__ = ["PathError", "check_paths", "check_written", "checkpoint_inputs", "rmoe_inputs"]
