"""Build a transformers model from a .rmoe file, or patch one, in one of three modes.

- ``materialize``: dense experts restored (original neuron order) into the model's own
  experts parameters: the restored dense model, run by transformers' own code.
- ``lazy``: compressed layers become :class:`LazyExperts` (expert offloading: fused's products, each expert
  built from the mapped file on first use into a byte-bounded cache with routing-frequency eviction).
- ``fused``: compressed layers become :class:`FusedExperts` (no dense expert is ever built).

The model is built on the meta device from the embedded ``config.json``; only tensors that
are really needed are allocated, so lazy and fused never hold a dense copy of the experts.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import container
from ..architectures import check_layers
from ..container import Reader
from ..errors import RmoeRuntimeError
from ..memory import trim_heap
from ..restore import restore_expert
from .ce import CEExperts, check_n_ce
from .experts import ExpertCache, FusedExperts, LazyExperts, expert_file_bytes
from .kinds import ExpertKind, kind_for
from .tensors import DTYPE_NAMES as DTYPES
from .tensors import resolve_device, to_torch

MODES = ("materialize", "lazy", "fused")
_PROBE = "resmoe_probe"


def resolve_dtype(dtype, reader: Reader) -> torch.dtype:
    """The runtime dtype: ``dtype`` if given, else the source dtype recorded in the file."""
    if dtype is None:
        dtype = reader.model.get("source_dtype", "fp32")
        if dtype not in DTYPES:
            dtype = "fp32"  # mixed source dtypes
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise RmoeRuntimeError(f"dtype {dtype!r} is not available; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise RmoeRuntimeError(f"dtype {dtype} is not available; choose float32, bfloat16 or float16")
    return dtype


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RmoeRuntimeError("the torch runtime needs transformers >= 5: pip install 'resmoe[torch]'") from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise RmoeRuntimeError(f"the torch runtime needs transformers >= 5, not {transformers.__version__}")
    return transformers


def _config(reader: Reader):
    transformers = _transformers()
    cfg = reader.config()
    if cfg is None:
        raise RmoeRuntimeError(f"{reader.path} embeds no config.json: the runtime cannot build its model "
                               f"(patch_model() an already-built model instead)")
    model_type = cfg.get("model_type")
    try:
        config = transformers.AutoConfig.for_model(**cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise RmoeRuntimeError(f"transformers cannot build a config for model_type {model_type!r}: {e}") from None
    arch = reader.model.get("architecture")
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise RmoeRuntimeError(f"transformers {transformers.__version__} has no model class {arch!r}")
    kind_for(config)  # refuse an architecture the runtime has no experts kind for, before building anything
    return config, cls


class CheckpointNames:
    """Checkpoint tensor names to the model's parameter names, by transformers' own renaming rules."""

    def __init__(self, model):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        conv = get_model_conversion_mapping(model)
        self._ren = [c for c in conv if isinstance(c, WeightRenaming)]
        self._conv = [c for c in conv if isinstance(c, WeightConverter)]
        self._rename = rename_source_key
        self._prefix = model.base_model_prefix
        self.meta = model.state_dict()

    def __call__(self, name: str) -> str:
        return self._rename(name, self._ren, self._conv, self._prefix, self.meta)[0]

    def module(self, prefix: str) -> str:
        """The module path of a checkpoint module prefix (e.g. an experts module)."""
        return self._rename(f"{prefix}.{_PROBE}", self._ren, [], None, None)[0][:-len(_PROBE) - 1]


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def model_tensor_names(reader: Reader, names: list[str]) -> dict[str, str]:
    """Checkpoint tensor name -> the name transformers gives it in the model built from the
    embedded config (its conversion mapping renames some, e.g. Phi-MoE's router)."""
    config, cls = _config(reader)
    rename = CheckpointNames(meta_model(cls, config))
    return {n: rename(n) for n in names}


def set_tensor(model: nn.Module, path: str, value) -> None:
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if isinstance(value, nn.Module):
        setattr(owner, leaf, value)
    elif leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def _load_passthrough(model, reader: Reader, names: CheckpointNames, dtype: torch.dtype,
                      device: torch.device) -> set[str]:
    loaded = set()
    for src, arr in reader.passthrough_tensors():
        key = names(src)
        if key not in names.meta:
            raise RmoeRuntimeError(f"tensor {src}: the {type(model).__name__} built from the embedded config has no "
                                   f"parameter {key!r}")
        want = names.meta[key]
        if tuple(arr.shape) != tuple(want.shape):
            raise RmoeRuntimeError(f"tensor {src}: shape {list(arr.shape)} but the model's {key} is {list(want.shape)}")
        set_tensor(model, key, to_torch(arr, dtype if want.is_floating_point() else want.dtype, device, copy=True))
        loaded.add(key)
    reader.release()
    return loaded


def init_meta_buffers(model, root: nn.Module, device: torch.device) -> None:
    """Recompute the buffers under ``root`` still on meta (rotary tables, which no checkpoint holds)
    on ``device``, by the model's own initialisation."""
    for mod in root.modules():
        metas = [b for b, t in mod._buffers.items() if t is not None and t.is_meta]
        if metas:
            for b in metas:
                mod._buffers[b] = torch.empty_like(mod._buffers[b], device=device)
            with _quiet():
                model._init_weights(mod)


def meta_model(cls, config, dtype: torch.dtype | None = None):
    """``cls`` built from ``config`` on the meta device: the skeleton whose tensors are set one by one."""
    with torch.device("meta"), _quiet():
        return cls._from_config(config, **({} if dtype is None else {"dtype": dtype}))


def _finish(model, device: torch.device) -> None:
    """Tie weights, recompute non-persistent buffers (rotary tables) and check nothing stayed on meta."""
    model.tie_weights()
    init_meta_buffers(model, model, device)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise RmoeRuntimeError(f"the file does not provide {len(left)} tensor(s) the model needs: {left[:5]}")


def _materialize(kind: ExpertKind, module: nn.Module, reader: Reader, lay, dtype, device) -> nn.Module:
    for name in kind.dense_parameters(module):
        p = module.get_parameter(name)
        set_tensor(module, name, torch.empty(p.shape, dtype=dtype, device=device))
    for e in range(lay.num_experts):
        kind.write_dense(module, e, restore_expert(reader, lay.index, e, original_order=True), dtype, device)
        reader.release()
    return module


def _compressed_module(kind, reader, lay, mode, dtype, device, cache, original):
    if mode == "materialize":
        return _materialize(kind, original, reader, lay, dtype, device)
    if mode == "lazy":
        return LazyExperts(kind, reader, lay, cache, dtype, device)
    return FusedExperts(kind, reader, lay, dtype, device)


def resolve_n_ce(reader: Reader, config, kind: ExpertKind, n_ce: int | None) -> dict[int, int]:
    """Layer index -> the auxiliary experts it runs with: the file's n_ce (``n_ce`` None), 0 for the full top-k,
    or the file's own value again; checked against the model's top-k before anything is built."""
    ce_layers = {lay.index: lay.ce.n_ce for lay in reader.layers if lay.ce is not None}
    if n_ce is not None and (not isinstance(n_ce, int) or isinstance(n_ce, bool) or n_ce < 0):
        raise RmoeRuntimeError(f"n_ce={n_ce!r}: a non-negative integer (0: the full top-k) or None (the file's)")
    if not ce_layers:
        if n_ce:
            raise RmoeRuntimeError(f"n_ce={n_ce}: {reader.path} has no compressed experts (make them with "
                                   f"resmoe-tune-ce)")
        return {}
    for i, k in ce_layers.items():
        check_n_ce(config, kind, k, f"layer {i}: the file's n_ce")
        if n_ce not in (None, 0, k):
            raise RmoeRuntimeError(f"n_ce={n_ce}: layer {i}'s compressed experts were trained for n_ce={k}; load "
                                   f"with n_ce={k} (or None, the file's) or 0 (the full top-k)")
    return {i: (k if n_ce is None else n_ce) for i, k in ce_layers.items()}


def _with_ce(module: nn.Module, kind: ExpertKind, reader: Reader, lay, n_ce: int, device) -> nn.Module:
    """``module`` wrapped in :class:`CEExperts` with the layer's vectors (held in float32)."""
    vec = to_torch(reader.tensor(lay.ce.vectors), torch.float32, device, copy=True)
    return CEExperts(module, kind, vec, n_ce, lay.num_neurons, lay.hidden)


def _patch_layers(model, reader: Reader, names: CheckpointNames, kind: ExpertKind, mode: str, dtype, device,
                  cache_bytes: int | None, n_ce: int | None = None) -> None:
    layers = reader.layers
    check_layers(kind.family, layers, RmoeRuntimeError)
    ce = resolve_n_ce(reader, model.config, kind, n_ce)
    cache = None
    if mode == "lazy":
        sizes = [expert_file_bytes(reader, lay, e) for lay in layers for e in range(lay.num_experts)]
        one = max(sizes, default=0)
        if cache_bytes is None:
            cache_bytes = default_cache_bytes(sum(sizes))
        if cache_bytes < one:
            raise RmoeRuntimeError(f"cache_bytes={cache_bytes} is smaller than one expert ({one} bytes of records "
                                   "in the file)")
        cache = ExpertCache(cache_bytes)
    for lay in layers:
        path = names.module(lay.prefix)
        try:
            original = model.get_submodule(path)
        except AttributeError:
            raise RmoeRuntimeError(f"layer {lay.index}: the model has no experts module {path!r} "
                                   f"(checkpoint prefix {lay.prefix})") from None
        n_model = getattr(original, "num_experts", lay.num_experts)
        if n_model != lay.num_experts:
            raise RmoeRuntimeError(f"layer {lay.index}: the model's {path} has {n_model} experts, the file "
                                   f"{lay.num_experts}")
        new = _compressed_module(kind, reader, lay, mode, dtype, device, cache, original)
        if lay.index in ce:
            new = _with_ce(new, kind, reader, lay, ce[lay.index], device)
        if new is not original:
            set_tensor(model, path, new)
        del original
        reader.release()
        trim_heap()


def default_cache_bytes(experts: int) -> int:
    """Lazy mode's default cache: twice every expert's records (``experts`` bytes in the file: their in-memory
    form can be larger, a rice record held as a bitmap, row offsets), at most half of the memory available now
    (MemAvailable), so that a model larger than memory is offloaded rather than swapped."""
    want = 2 * experts
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return max(1, min(want, int(line.split()[1]) * 1024 // 2))
    except OSError:
        pass
    return max(1, want)


def cache_stats(model) -> dict | None:
    """Lazy mode's cache figures (:meth:`ExpertCache.stats`: hit rate, resident bytes, ...), None for other modes."""
    for m in model.modules():
        if isinstance(m, LazyExperts):
            return m.cache.stats()
    return None


def _keep_reader(model, reader: Reader, mode: str):
    """Lazy mode reads experts from the mapped file later; the other modes are done with it."""
    if mode == "lazy":
        model._resmoe_reader = reader
    else:
        reader.close()
    return model


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise RmoeRuntimeError(f"mode {mode!r}: choose one of {', '.join(MODES)}")


def load_model(path: str | os.PathLike, mode: str = "materialize", device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = None, cache_bytes: int | None = None,
               verify_checksums: bool = True, n_ce: int | None = None):
    """A transformers model built from the ``.rmoe`` file's embedded config, in eval mode.

    ``mode``: ``materialize`` | ``lazy`` | ``fused`` (module docstring). ``device``: ``cpu``,
    ``cuda[:N]`` or ``auto`` (CUDA when present). ``dtype`` defaults to the source dtype.
    ``cache_bytes`` bounds lazy mode's expert cache (default: :func:`default_cache_bytes`). Nothing is
    downloaded and no remote code runs. ``n_ce``: how many of each token's top-k experts the file's
    compressed experts (spec 4.5, version 6.0) replace: None, the file's; 0, none (the full top-k); the
    file's value is the only other one allowed (the vectors were trained for it).
    """
    _check_mode(mode)
    dev = resolve_device(device)
    reader = container.open(Path(path), verify_checksums)
    try:
        dt = resolve_dtype(dtype, reader)
        config, cls = _config(reader)
        kind = kind_for(config)
        model = meta_model(cls, config, dt)
        names = CheckpointNames(model)
        _load_passthrough(model, reader, names, dt, dev)
        _patch_layers(model, reader, names, kind, mode, dt, dev, cache_bytes, n_ce)
        _finish(model, dev)
    except BaseException:
        reader.close()
        raise
    return _keep_reader(model, reader, mode).eval()


def patch_model(model, path: str | os.PathLike, mode: str = "fused", cache_bytes: int | None = None,
                verify_checksums: bool = True, n_ce: int | None = None):
    """Swap an already-built transformers model's experts for the ``.rmoe`` file's, in place.

    The model keeps its own non-expert weights, device and dtype (those of its first floating
    parameter); every compressed layer's experts module is replaced (lazy, fused) or refilled
    with restored dense experts (materialize). Returns the model.
    """
    _check_mode(mode)
    _transformers()
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    dev = ref.device if ref is not None else torch.device("cpu")
    dt = ref.dtype if ref is not None else torch.float32
    reader = container.open(Path(path), verify_checksums)
    try:
        kind = kind_for(model.config)
        arch = reader.model.get("model_type")
        if arch is not None and arch != model.config.model_type:
            raise RmoeRuntimeError(f"{path} holds a {arch!r} model, not {model.config.model_type!r}")
        _patch_layers(model, reader, CheckpointNames(model), kind, mode, dt, dev, cache_bytes, n_ce)
    except BaseException:
        reader.close()
        raise
    return _keep_reader(model, reader, mode)
