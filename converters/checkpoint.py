"""A Hugging Face safetensors checkpoint opened for streaming: single file, directory or shards.

Tensors are read lazily through ``safetensors.safe_open`` (mmap), one at a time, so
converting never holds more than the layer at hand. Every inconsistency between the
index, the shards and the config is a :class:`ConversionError` naming the file or tensor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from resmoe_format.dtypes import BY_ST

from .errors import ConversionError

INDEX = "model.safetensors.index.json"
#: Side files embedded in the .rmoe so that a restore gives a loadable checkpoint.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
              "added_tokens.json", "preprocessor_config.json")


@dataclass(frozen=True)
class TensorInfo:
    """What the header says of one tensor: resmoe dtype name, shape and the file holding it."""

    dtype: str
    shape: tuple[int, ...]
    file: Path


def _dtype_name(code: str) -> str:
    d = BY_ST.get(code)
    return d.name if d is not None else code.lower()


class Checkpoint:
    """``Checkpoint(src, config=None)``: ``src`` is a ``*.safetensors`` file or a directory."""

    def __init__(self, src: str | Path, config: str | Path | None = None):
        src = Path(src)
        if not src.exists():
            raise ConversionError(f"{src}: no such file or directory")
        self.root = src if src.is_dir() else src.parent
        self._handles: dict[Path, Any] = {}
        cfg_path = Path(config) if config is not None else self.root / "config.json"
        if not cfg_path.is_file():
            raise ConversionError(f"{cfg_path}: config.json not found (pass --config FILE)")
        try:
            self.config: dict = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{cfg_path}: not a readable JSON config ({e})") from None
        if not isinstance(self.config, dict):
            raise ConversionError(f"{cfg_path}: the config must be a JSON object")
        self._config_bytes = cfg_path.read_bytes()
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._scan(src)
        except BaseException:
            self.close()
            raise
        if not self.tensors:
            raise ConversionError(f"{src}: the checkpoint holds no tensors")

    # ------------------------------------------------------------------------------------
    def _scan(self, src: Path) -> None:
        if src.is_file():
            self._read_shard(src, None)
            return
        index = src / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError):
                raise ConversionError(f"{index}: not a valid safetensors index (no weight_map)") from None
            shards: dict[str, set[str]] = {}
            for name, shard in weight_map.items():
                if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                    raise ConversionError(f"{index}: tensor {name} maps to a bad shard name {shard!r}")
                shards.setdefault(shard, set()).add(name)
            for shard, names in sorted(shards.items()):
                path = src / shard
                if not path.is_file():
                    raise ConversionError(f"shard {shard} listed in {INDEX} is missing from {src}")
                self._read_shard(path, names, weight_map)
            return
        files = sorted(src.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{src}: no model.safetensors and no {INDEX}")
        if len(files) > 1 and not (src / "model.safetensors").is_file():
            raise ConversionError(f"{src}: {len(files)} safetensors files but no {INDEX} to say how they fit")
        self._read_shard(src / "model.safetensors" if len(files) > 1 else files[0], None)

    def _read_shard(self, path: Path, expected: set[str] | None, weight_map: dict | None = None) -> None:
        try:
            h = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ConversionError(f"{path.name}: not a valid safetensors file ({e})") from None
        self._handles[path] = h
        names = set(h.keys())
        for name in sorted(names):
            try:
                sl = h.get_slice(name)
                info = TensorInfo(_dtype_name(sl.get_dtype()), tuple(int(x) for x in sl.get_shape()), path)
            except Exception as e:
                raise ConversionError(f"{path.name}: cannot read the header entry of tensor {name} ({e})") from None
            if name in self.tensors:
                raise ConversionError(f"tensor {name} is in both {self.tensors[name].file.name} and {path.name}")
            self.tensors[name] = info
        if expected is not None:
            extra = sorted(names - expected)
            if extra:
                elsewhere = (weight_map or {}).get(extra[0])
                where = f"lists it under {elsewhere}" if elsewhere else "does not list it"
                raise ConversionError(f"shard {path.name} holds {extra[0]}, but {INDEX} {where}")
            missing = sorted(expected - names)
            if missing:
                raise ConversionError(f"tensor {missing[0]} is listed in {INDEX} under {path.name} but the shard "
                                      f"does not hold it")

    # ------------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (read through mmap; nothing else is loaded)."""
        info = self.tensors.get(name)
        if info is None:
            raise ConversionError(f"the checkpoint has no tensor {name}")
        try:
            h = self._handles.get(info.file)
            if h is None:
                h = self._handles[info.file] = safe_open(str(info.file), framework="pt")
            return h.get_tensor(name)
        except Exception as e:
            raise ConversionError(f"{info.file.name}: cannot read tensor {name} ({e})") from None

    def files(self) -> dict[str, bytes]:
        """config.json and the tokenizer/generation side files, by relative path."""
        out = {"config.json": self._config_bytes}
        for name in SIDE_FILES:
            p = self.root / name
            if p.is_file():
                out[name] = p.read_bytes()
        return out

    def release(self) -> None:
        """Unmap the shards (reopened on the next :meth:`get`), so the file pages read so far
        stop counting against this process: streaming stays at about one layer's memory."""
        self._handles.clear()

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
