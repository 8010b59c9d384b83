"""Architecture adapters: the converter's side of the architecture records
(:mod:`resmoe_format.architectures`), one registered class per family, in the style of
llama.cpp's ``convert_hf_to_gguf.py``::

    @register(MIXTRAL)
    class Mixtral(PerExpertAdapter): ...

The record says where the experts are and how the checkpoint stores them; the adapter adds
which layers are MoE layers for a given config. :func:`adapter_for` picks the adapter from
``config.json`` (``architectures``, else ``model_type``).
"""
from __future__ import annotations

from collections.abc import Mapping

from resmoe_format.architectures import Family, family_for

from ..checkpoint import TensorInfo
from ..errors import ConversionError, UnsupportedArchitecture
from .base import Adapter, LayerLayout, is_expert_tensor

#: Hugging Face architecture name -> adapter class
REGISTRY: dict[str, type[Adapter]] = {}
#: family name (``Family.name``) -> adapter class
ADAPTERS: dict[str, type[Adapter]] = {}


def register(fam: Family):
    """Class decorator: the adapter of this architecture record."""
    def deco(cls: type[Adapter]) -> type[Adapter]:
        cls.family = fam
        ADAPTERS[fam.name] = cls
        REGISTRY.update(dict.fromkeys(fam.architectures, cls))
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
    fam = family_for(config)
    cls = ADAPTERS.get(fam.name) if fam is not None else None
    label = name or model_type or "(config.json names no architecture)"
    if not any(is_expert_tensor(t) for t in tensors):
        raise ConversionError(f"{label} is not a Mixture-of-Experts checkpoint (it holds no expert tensors); "
                              f"supported MoE architectures: {', '.join(SUPPORTED)}")
    if cls is None:
        raise UnsupportedArchitecture(f"unsupported architecture {label}; supported: {', '.join(SUPPORTED)}")
    return cls(config, tensors)


__all__ = ["Adapter", "LayerLayout", "ADAPTERS", "REGISTRY", "SUPPORTED", "adapter_for", "register"]
