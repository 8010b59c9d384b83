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
from .base import Adapter, LayerLayout, is_expert_tensor

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
    """The adapter for this checkpoint, picked by ``config["architectures"][0]`` (``model_type`` when
    the config names no architecture).

    Raises :class:`UnsupportedArchitecture` (naming the supported architectures) for an unknown
    MoE architecture, and :class:`ConversionError` for a checkpoint without routed experts (a
    dense model such as Llama, or an MoE config over a checkpoint that holds no expert tensors).
    """
    if not isinstance(config, dict):
        raise ConversionError("config.json must be a JSON object")
    archs = config.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    cls = REGISTRY.get(name) if name else BY_MODEL_TYPE.get(model_type)
    label = name or model_type or "(config.json names no architecture)"
    if not any(is_expert_tensor(t) for t in tensors):
        raise ConversionError(f"{label} is not a Mixture-of-Experts checkpoint (it holds no expert tensors); "
                              f"supported MoE architectures: {', '.join(SUPPORTED)}")
    if cls is None:
        raise UnsupportedArchitecture(f"unsupported architecture {label}; supported: {', '.join(SUPPORTED)}")
    return cls(config, tensors)


__all__ = ["Adapter", "LayerLayout", "REGISTRY", "SUPPORTED", "adapter_for", "register"]
