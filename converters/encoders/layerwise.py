"""The source checkpoint's decoder run one layer at a time, as GPTQ tools calibrate large models.

The transformers model is built on the meta device. Its embeddings get their weights and every
calibration window runs up to the first decoder layer, which records the window's hidden states and
what the model passes each decoder layer (masks, rotary tables, positions). Then each layer in turn
gets its weights from the checkpoint (experts through the runtime's expert kinds), runs on every
window, and goes back to meta. At most one decoder layer's weights are in memory at a time; the
hidden states of all windows live in an unnamed temporary file (:class:`Spill`), which the system
reclaims even when the process is killed.
"""
from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConversionError


class Spill:
    """A float32 (rows, width) array in an unnamed temporary file, read and written by row range.

    Plain file reads and writes (not a memory map), so the rows count in the page cache rather
    than in the process's resident memory; the file never appears in a directory, so nothing is
    left behind, even by a killed process.
    """

    def __init__(self, rows: int, width: int):
        self.shape = (rows, width)
        self._row = width * 4
        self._f = tempfile.TemporaryFile(prefix="resmoe-")
        self._f.truncate(rows * self._row)

    def write(self, start: int, a: np.ndarray) -> None:
        """Rows ``start:start + len(a)``."""
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim != 2 or a.shape[1] != self.shape[1] or not 0 <= start <= self.shape[0] - a.shape[0]:
            raise ValueError(f"rows {start}:{start + a.shape[0]} of width {a.shape[1:]} do not fit {self.shape}")
        os.pwrite(self._f.fileno(), memoryview(a).cast("B"), start * self._row)

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` as a new writable array."""
        stop = self.shape[0] if stop is None else min(stop, self.shape[0])
        out = np.empty((max(0, stop - start), self.shape[1]), np.float32)
        view, at = memoryview(out).cast("B"), start * self._row
        while view.nbytes:
            n = os.preadv(self._f.fileno(), [view], at)
            if n <= 0:
                raise OSError(f"short read from a spill file at byte {at}")
            view, at = view[n:], at + n
        return out


def model_class(config: dict):
    """The transformers config object and model class a checkpoint's config.json names."""
    import transformers

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None:
        raise ConversionError(f"--calibration: transformers has no model class {arch!r} to run the source model")
    try:
        return transformers.AutoConfig.for_model(**config), cls
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"--calibration: transformers cannot build a config for {arch!r}: {e}") from None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module path and list of a decoder-only model's layers (ConversionError otherwise)."""
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or getattr(model.config, "is_encoder_decoder", False):
        raise ConversionError(f"--calibration runs decoder-only models one layer at a time; "
                              f"{type(model).__name__} has no single list of decoder layers")
    return next(n for n, m in model.named_modules() if m is layers), layers


class _Stop(Exception):
    """Ends a forward pass once the recording layers have what they need."""


class LayerwiseModel:
    """A source checkpoint's model whose decoder layers are given weights one at a time.

    ``ckpt`` is a :class:`converters.checkpoint.Checkpoint`; ``moe_layouts`` are all of its MoE
    layers (compressed or not: every layer a window passes through needs its experts).
    """

    def __init__(self, ckpt, moe_layouts, device: torch.device):
        from resmoe_format.torch.kinds import kind_for
        from resmoe_format.torch.load import CheckpointNames, meta_model

        config, cls = model_class(ckpt.config)
        self.ckpt, self.device = ckpt, device
        self.model = meta_model(cls, config, torch.float32).eval()
        self.kind = kind_for(config)
        self.names = CheckpointNames(self.model)
        self.layers_path, self.layers = decoder_layers(self.model)
        base = self.model.base_model_prefix if self.model.base_model is not self.model else ""
        experts = {s.name for lay in moe_layouts for s in lay.sources}
        self.outer: list[tuple[str, str]] = []  # (checkpoint name, parameter) of embeddings, final norm
        self.head: list[tuple[str, str]] = []  # the language-model head's own tensors (absent when tied)
        self.own: dict[int, list[tuple[str, str]]] = {i: [] for i in range(len(self.layers))}
        for name in ckpt.tensors:
            if name in experts:
                continue
            key = self.names(name)
            if key not in self.names.meta:
                continue  # a tensor the model does not hold (a saved rotary table, a tied head)
            i = self.layer_of(key)
            if i is not None:
                self.own[i].append((name, key))
            elif key.startswith(f"{base}.") or not base:
                self.outer.append((name, key))
            else:
                self.head.append((name, key))
        self.moe: dict[int, list[tuple[Any, str]]] = {}
        for lay in moe_layouts:
            path = self.names.module(lay.prefix)
            i = self.layer_of(path + ".")
            if i is None:
                raise ConversionError(f"--calibration: experts module {path!r} (layer {lay.index}) is not inside "
                                      f"a decoder layer of {type(self.model).__name__}")
            self.moe.setdefault(i, []).append((lay, path))

    def layer_of(self, key: str) -> int | None:
        """The decoder layer a parameter path lies in, or None."""
        head = f"{self.layers_path}."
        if not key.startswith(head):
            return None
        i = key[len(head):].split(".", 1)[0]
        return int(i) if i.isdigit() and int(i) < len(self.layers) else None

    def _set(self, pairs: list[tuple[str, str]]) -> None:
        from resmoe_format.torch.load import set_tensor

        for name, key in pairs:
            want = self.names.meta[key]
            t = self.ckpt.get(name)
            if tuple(t.shape) != tuple(want.shape):
                raise ConversionError(f"--calibration: tensor {name} has shape {list(t.shape)}, the model's {key} "
                                      f"{list(want.shape)}")
            dtype = torch.float32 if want.is_floating_point() else want.dtype
            set_tensor(self.model, key, t.to(self.device, dtype, copy=True))

    def _check_loaded(self, roots: list[nn.Module], what: str) -> None:
        from resmoe_format.torch.load import init_meta_buffers

        for root in roots:
            init_meta_buffers(self.model, root, self.device)
            left = [n for n, p in root.named_parameters() if p.is_meta]
            if left:
                raise ConversionError(f"--calibration: the checkpoint does not provide {what}'s {left[0]}")

    def load_layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` with its weights from the checkpoint, in float32 on the device."""
        from resmoe_format.torch.load import set_tensor

        from ..disassemble import expert_matrices

        self._set(self.own[i])
        for lay, path in self.moe.get(i, []):
            module = self.model.get_submodule(path)
            for name in self.kind.dense_parameters(module):
                set_tensor(module, name, torch.empty(module.get_parameter(name).shape, dtype=torch.float32,
                                                     device=self.device))
            for e, mats in enumerate(expert_matrices(lay, self.ckpt.get)):
                self.kind.write_dense(module, e, {m: t.float().numpy() for m, t in mats.items()}, torch.float32,
                                      self.device)
        layer = self.layers[i]
        self._check_loaded([layer], f"decoder layer {i}")
        return layer

    def drop_layer(self, i: int) -> None:
        """Give decoder layer ``i``'s memory back (its tensors return to meta)."""
        self.layers[i].to("meta")
        self.ckpt.release()

    @contextmanager
    def _recording(self, record: Callable[..., Any], upto: int) -> Iterator[None]:
        for i in range(upto + 1):
            self.layers[i].forward = functools.partial(record, i)
        try:
            yield
        finally:
            for i in range(upto + 1):
                del self.layers[i].forward

    def embed(self, ids: np.ndarray, window: int, upto: int) -> tuple[Spill, dict]:
        """Every window's input to the first decoder layer, spilled (T, hidden), and what the model
        passes decoder layers 0..``upto`` for each window length: {(layer, length): (args, kwargs)}."""
        self._set(self.outer)
        self._check_loaded([m for m in self.model.base_model.children() if m is not self.layers], "the embeddings")
        hidden = Spill(ids.size, self.model.config.hidden_size)
        calls: dict[tuple[int, int], tuple[tuple, dict]] = {}
        start = 0

        def record(i, h, *args, **kwargs):
            n = h.shape[1]
            if i == 0:
                hidden.write(start, h[0].detach().float().cpu().numpy())
            calls.setdefault((i, n), (args, kwargs))
            if i == upto or all((j, n) in calls for j in range(upto + 1)):
                raise _Stop
            return h

        with self._recording(record, upto), torch.no_grad():
            for start in range(0, ids.size, window):
                try:
                    self.model.base_model(input_ids=torch.from_numpy(ids[start:start + window])[None].to(self.device),
                                          use_cache=False)
                except _Stop:
                    pass
        return hidden, calls

    def load_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The final norm and language-model head (tied to the embeddings where the config says so), loaded
        after :meth:`embed`: a function from the last decoder layer's output to logits."""
        self._set(self.head)
        self.model.tie_weights()
        head = self.model.get_output_embeddings()
        norm = getattr(self.model.base_model, "norm", None)
        if head is None or norm is None:
            raise ConversionError(f"--calibration: {type(self.model).__name__} has no final norm and output "
                                  f"embeddings to compute the language-model loss with")
        self._check_loaded([head, norm], "the language-model head")
        return lambda h: head(norm(h))

    def run_layer(self, layer: nn.Module, i: int, hidden: Spill, calls: dict, window: int) -> None:
        """Decoder layer ``i`` on every window of ``hidden``, its outputs written back in place."""
        with torch.no_grad():
            for start in range(0, hidden.shape[0], window):
                x = torch.from_numpy(hidden.read(start, start + window))[None].to(self.device)
                args, kwargs = calls[(i, x.shape[1])]
                out = layer(x, *args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                hidden.write(start, out[0].float().cpu().numpy())
