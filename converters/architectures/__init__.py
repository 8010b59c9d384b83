"""Architecture adapters, one registered class per Hugging Face architecture, in the style of
llama.cpp's ``convert_hf_to_gguf.py``::

    @register("MixtralForCausalLM")
    class Mixtral(Adapter): ...

:func:`adapter_for` picks the adapter from ``config.json`` (``architectures``, else
``model_type``).
"""
from __future__ import annotations

from collections.abc import Mapping

from ..checkpoint import TensorInfo
from ..errors import ConversionError, UnsupportedArchitecture
from .base import Adapter, LayerLayout

REGISTRY: dict[str, type[Adapter]] = {}
BY_MODEL_TYPE: dict[str, type[Adapter]] = {}


def register(*architectures: str):
    """Class decorator: handle these Hugging Face architecture names."""
    def deco(cls: type[Adapter]) -> type[Adapter]:
        cls.architectures = tuple(architectures)
        for a in architectures:
            REGISTRY[a] = cls
        for t in cls.model_types:
            BY_MODEL_TYPE[t] = cls
        return cls
    return deco


from . import deepseek, gpt_oss, mixtral, olmoe, qwen_moe, switch  # noqa: E402,F401  (registers)

SUPPORTED: tuple[str, ...] = tuple(sorted(REGISTRY))


def adapter_for(config: dict, tensors: Mapping[str, TensorInfo]) -> Adapter:
    """The adapter for this checkpoint, or a clear error naming the supported architectures."""
    archs = config.get("architectures") or []
    name = archs[0] if archs and isinstance(archs[0], str) else None
    cls = REGISTRY.get(name) if name else None
    if cls is None and not name:
        cls = BY_MODEL_TYPE.get(config.get("model_type"))
    if cls is None:
        label = name or config.get("model_type") or "(no architectures in config.json)"
        if not any("expert" in t for t in tensors):
            raise ConversionError(f"{label} is not a Mixture-of-Experts checkpoint (no expert tensors); "
                                  f"supported MoE architectures: {', '.join(SUPPORTED)}")
        raise UnsupportedArchitecture(f"unsupported architecture {label}; supported: {', '.join(SUPPORTED)}")
    return cls(config, tensors)


__all__ = ["Adapter", "LayerLayout", "REGISTRY", "SUPPORTED", "adapter_for", "register"]
