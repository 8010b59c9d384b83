"""One record per architecture family: what the converter, the torch runtime and the exporters
need to know about a Hugging Face MoE family, stated once.

A :class:`Family` holds declarative facts only (no torch, no transformers): the Hugging Face
class names and ``model_type`` values it covers, the canonical expert matrices (spec 4.14:
neuron axis first), how the source checkpoint stores them (:class:`Stored` rules, relative to
the experts module ``prefix``), how transformers' experts module holds them, the runtime's
expert kind, and whether (and why not) it exports to llama.cpp's GGUF and to ONNX. The
converter's adapters (``converters.architectures``), the runtime's kinds
(``resmoe_format.torch.kinds``) and the GGUF classes (``converters.exporters.gguf_export``)
register against these records instead of keeping lists of their own::

    MIXTRAL = family(Family("Mixtral", ("MixtralForCausalLM",), ("mixtral",), ...))
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .container import source_shape
from .errors import RmoeFormatError
from .schema import LayerSpec, SourceSpec


@dataclass(frozen=True)
class Stored:
    """How one tensor holds canonical matrices: the assembly rule of spec 6.5 without the
    numbers. ``name`` is relative to the experts module; with ``{k}`` in it there is one tensor
    per expert, else one tensor stacks all experts on a new leading axis."""

    name: str
    parts: tuple[str, ...]
    transpose: bool = False
    join: str | None = None
    join_axis: int = 0

    @property
    def per_expert(self) -> bool:
        return "{k}" in self.name

    def describe(self) -> str:
        """The rule in words, as spec 4.14's table gives it."""
        how = (["transposed" if len(self.parts) == 1 else "each transposed"] if self.transpose else [])
        if len(self.parts) > 1:
            how.append(f"{'interleaved' if self.join == 'interleave' else 'concatenated'} on axis {self.join_axis}")
        if not self.per_expert:
            how.append("all experts stacked")
        return f"`{self.name}` = {', '.join(self.parts)}" + (f": {', '.join(how)}" if how else "")

    def tensor(self, prefix: str, expert: int | str) -> str:
        """The full tensor name under ``prefix`` (for expert ``expert`` when per expert)."""
        rel = self.name.format(k=expert) if self.per_expert else self.name
        return f"{prefix}.{rel}" if prefix else rel


@dataclass(frozen=True)
class Family:
    """One architecture family, as every part of the project needs it (module docstring)."""

    name: str  # display name, e.g. "Mixtral"
    architectures: tuple[str, ...]  # Hugging Face class names (config ``architectures``)
    model_types: tuple[str, ...]  # transformers ``model_type`` values
    prefixes: tuple[str, ...]  # experts module path(s) in the checkpoint; {i} is the layer, {b} a block
    matrices: tuple[str, ...]  # canonical 2-D matrices: the inputs, then the output (all (n, hidden))
    source: tuple[Stored, ...]  # how the checkpoint stores them
    kind: str  # the runtime's expert kind (resmoe_format.torch.kinds)
    module: tuple[Stored, ...] | None = None  # how transformers' experts module holds them; None: as source
    biases: tuple[str, ...] = ()  # optional 1-D biases: one per input (neuron axis 0), then the output's
    experts_keys: tuple[str, ...] = ("num_local_experts", "num_experts")  # config keys of E, first present wins
    gguf: str | None = None  # llama.cpp GGUF architecture name; None: not exported
    gguf_reason: str = ""  # why not, when gguf is None
    onnx: bool = True
    onnx_reason: str = ""  # why not, when onnx is False

    @property
    def module_layout(self) -> tuple[Stored, ...]:
        return self.source if self.module is None else self.module

    def num_experts(self, config: Mapping) -> object:
        """E from a config dict (the raw value: callers validate it)."""
        key = next((k for k in self.experts_keys if config.get(k) is not None), self.experts_keys[0])
        return config.get(key)

    def source_specs(self, prefix: str, lay: LayerSpec) -> list[SourceSpec]:
        """The layer's sources (spec 4.9) under ``prefix``: per-expert tensors expert by expert,
        then stacked ones; rules for matrices the layer does not have (absent biases) are left out."""
        have = {m.name for m in lay.matrices}
        rules = [r for r in self.source if set(r.parts) <= have]
        dtype = lay.matrices[0].dtype
        todo = [(r, k) for k in range(lay.num_experts) for r in rules if r.per_expert]
        todo += [(r, "all") for r in rules if not r.per_expert]
        out = []
        for r, k in todo:
            s = SourceSpec(r.tensor(prefix, k), dtype, (), k, list(r.parts), r.transpose, r.join, r.join_axis)
            s.shape = source_shape(lay, s)
            out.append(s)
        return out

    def layout_problem(self, lay: LayerSpec) -> str | None:
        """Why a layer of a file does not follow this family's layout rules (spec 4.14), or None."""
        mats = {m.name: m for m in lay.matrices}
        two_d = sorted(n for n, m in mats.items() if len(m.shape) == 2)
        want = f"matrices {', '.join(self.matrices)} of shape (num_neurons, hidden) with neuron_axis 0"
        if two_d != sorted(self.matrices):
            return f"layer {lay.index} has matrices {', '.join(two_d) or 'none'}; {self.name} needs {want}"
        shapes = {mats[m].shape for m in self.matrices}
        if len(shapes) != 1 or any(mats[m].neuron_axis != 0 for m in self.matrices) \
                or next(iter(shapes))[0] != lay.num_neurons:
            got = ", ".join(f"{m} {list(mats[m].shape)} axis {mats[m].neuron_axis}" for m in self.matrices)
            return f"layer {lay.index} has {got}; {self.name} needs {want}"
        one_d = {n for n, m in mats.items() if len(m.shape) == 1}
        if one_d and one_d != set(self.biases):
            return (f"layer {lay.index} has vectors {', '.join(sorted(one_d))}; {self.name} takes none or exactly "
                    f"{', '.join(self.biases) or 'none'}")
        for b in self.biases[:-1] if one_d else ():
            if mats[b].neuron_axis != 0:
                return f"layer {lay.index}: bias {b} must have neuron_axis 0"
        if not any(re.fullmatch(re.escape(p).replace(r"\{i\}", r"\d+").replace(r"\{b\}", r"\d+"), lay.prefix)
                   for p in self.prefixes):
            return (f"layer {lay.index}: prefix {lay.prefix!r} is not {self.name}'s experts module "
                    f"({' or '.join(self.prefixes)})")
        return None

    def match_expert_tensor(self, name: str) -> tuple[int, int, Stored] | None:
        """(layer, expert, rule) of a per-expert source tensor name of this family, else None."""
        for p in self.prefixes:
            if "{i}" not in p:
                continue
            for r in self.source:
                if not r.per_expert:
                    continue
                pat = re.escape(r.tensor(p, "{k}")).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{k\}", r"(?P<k>\d+)")
                m = re.fullmatch(pat, name)
                if m:
                    return int(m["i"]), int(m["k"]), r
        return None


FAMILIES: dict[str, Family] = {}
BY_ARCHITECTURE: dict[str, Family] = {}
BY_MODEL_TYPE: dict[str, Family] = {}


def family(f: Family) -> Family:
    """Register a family record (its names must be new)."""
    if f.name in FAMILIES or set(f.architectures) & set(BY_ARCHITECTURE) or set(f.model_types) & set(BY_MODEL_TYPE):
        raise ValueError(f"architecture family {f.name} registered twice")
    FAMILIES[f.name] = f
    BY_ARCHITECTURE.update(dict.fromkeys(f.architectures, f))
    BY_MODEL_TYPE.update(dict.fromkeys(f.model_types, f))
    return f


def family_for(config: Mapping) -> Family | None:
    """The family of a config dict: by ``architectures[0]``, or by ``model_type`` when it names no
    architecture; None when unknown."""
    archs = config.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if name is not None:
        return BY_ARCHITECTURE.get(name)
    t = config.get("model_type")
    return BY_MODEL_TYPE.get(t) if isinstance(t, str) else None


def spec_table() -> str:
    """The families as spec/FORMAT.md 4.14 lists them (a test checks the spec holds this text)."""
    rows = ["| architecture (`model_type`) | `prefix` | matrices: inputs; output | biases | stored as |",
            "|---|---|---|---|---|"]
    for f in FAMILIES.values():
        names = ", ".join(f"{a}" for a in f.architectures) + f" (`{'`, `'.join(f.model_types)}`)"
        prefixes = " or ".join(f"`{p}`" for p in f.prefixes)
        mats = f"{', '.join(f.matrices[:-1])}; {f.matrices[-1]}"
        biases = f"{', '.join(f.biases[:-1])}; {f.biases[-1]} (optional)" if f.biases else "none"
        rows.append(f"| {names} | {prefixes} | {mats} | {biases} | {'; '.join(r.describe() for r in f.source)} |")
    return "\n".join(rows)


def check_layers(f: Family, layers: Iterable[LayerSpec], error: type[Exception] = RmoeFormatError) -> None:
    """Raise ``error`` naming the first layer that breaks ``f``'s layout rules (spec 4.14)."""
    for lay in layers:
        problem = f.layout_problem(lay)
        if problem:
            raise error(f"{problem} (spec/FORMAT.md 4.14)")


# --- the families ---------------------------------------------------------------------------

GATED = ("gate", "up", "down")
#: transformers' stacked experts module (Mixtral, Qwen, OLMoE, DeepSeek): gate_up_proj (E, 2n, H)
#: holds gate then up, down_proj (E, H, n).
STACKED_GATE_UP = (Stored("gate_up_proj", ("gate", "up"), join="concat", join_axis=0),
                   Stored("down_proj", ("down",), transpose=True))


def _linear_experts(gate: str, up: str, down: str) -> tuple[Stored, ...]:
    """Experts as separate Linear layers ``{k}.{gate}.weight`` etc.: down stored (hidden, n)."""
    return (Stored(f"{{k}}.{gate}.weight", ("gate",)), Stored(f"{{k}}.{up}.weight", ("up",)),
            Stored(f"{{k}}.{down}.weight", ("down",), transpose=True))


_MIXTRAL_LAYOUT = dict(prefixes=("model.layers.{i}.block_sparse_moe.experts",), matrices=GATED,
                       source=_linear_experts("w1", "w3", "w2"), kind="swiglu", module=STACKED_GATE_UP)
_MLP_LAYOUT = dict(prefixes=("model.layers.{i}.mlp.experts",), matrices=GATED,
                   source=_linear_experts("gate_proj", "up_proj", "down_proj"), kind="swiglu",
                   module=STACKED_GATE_UP)

MIXTRAL = family(Family("Mixtral", ("MixtralForCausalLM",), ("mixtral",), **_MIXTRAL_LAYOUT, gguf="llama"))
#: llama.cpp loads a ``phimoe`` GGUF but computes another function: RMSNorm (with the bias) where Phi-MoE has
#: LayerNorm, and softmax top-k routing renormalised where Phi-MoE has sparsemixer's masked softmax (measured on a
#: tiny model in llama-cpp-python 0.3.36: logits 30% of the largest apart; 2.6e-4 once the torch model is patched to
#: both of llama.cpp's choices).
PHIMOE = family(Family("Phi-MoE", ("PhimoeForCausalLM",), ("phimoe",), **_MIXTRAL_LAYOUT,
                       gguf_reason="llama.cpp's phimoe runs RMSNorm where Phi-MoE has LayerNorm and softmax top-k "
                                   "routing where it has sparsemixer"))
QWEN2_MOE = family(Family("Qwen2-MoE", ("Qwen2MoeForCausalLM",), ("qwen2_moe",), **_MLP_LAYOUT, gguf="qwen2moe"))
QWEN3_MOE = family(Family("Qwen3-MoE", ("Qwen3MoeForCausalLM",), ("qwen3_moe",), **_MLP_LAYOUT, gguf="qwen3moe"))
OLMOE = family(Family("OLMoE", ("OlmoeForCausalLM",), ("olmoe",), **_MLP_LAYOUT, gguf="olmoe"))
DEEPSEEK_V2 = family(Family("DeepSeek-V2", ("DeepseekV2ForCausalLM",), ("deepseek_v2",), **_MLP_LAYOUT,
                            experts_keys=("n_routed_experts",), gguf="deepseek2"))
DEEPSEEK_V3 = family(Family("DeepSeek-V3", ("DeepseekV3ForCausalLM",), ("deepseek_v3",), **_MLP_LAYOUT,
                            experts_keys=("n_routed_experts",), gguf="deepseek2"))
#: Encoder block b's experts, then decoder block b's (layer index num_layers + b).
SWITCH = family(Family(
    "Switch Transformers",
    ("SwitchTransformersForConditionalGeneration", "SwitchTransformersEncoderModel", "SwitchTransformersModel"),
    ("switch_transformers",),
    prefixes=("encoder.block.{b}.layer.1.mlp.experts", "decoder.block.{b}.layer.2.mlp.experts"),
    matrices=("wi", "wo"),
    source=(Stored("expert_{k}.wi.weight", ("wi",)), Stored("expert_{k}.wo.weight", ("wo",), transpose=True)),
    kind="switch", gguf_reason="encoder-decoder; llama.cpp has no such architecture",
    onnx=False, onnx_reason="an encoder-decoder model"))
#: GPT-OSS stacks every expert in one tensor and interleaves gate and up (gate in the even
#: columns of gate_up_proj (E, H, 2n)); transformers' experts module holds them the same way.
GPT_OSS = family(Family(
    "GPT-OSS", ("GptOssForCausalLM",), ("gpt_oss",), prefixes=("model.layers.{i}.mlp.experts",), matrices=GATED,
    source=(Stored("gate_up_proj", ("gate", "up"), transpose=True, join="interleave", join_axis=1),
            Stored("down_proj", ("down",)),
            Stored("gate_up_proj_bias", ("gate_bias", "up_bias"), join="interleave", join_axis=0),
            Stored("down_proj_bias", ("down_bias",))),
    biases=("gate_bias", "up_bias", "down_bias"), kind="gpt_oss_glu", gguf="gpt-oss"))

__all__ = ["Family", "Stored", "FAMILIES", "BY_ARCHITECTURE", "BY_MODEL_TYPE", "family", "family_for",
           "check_layers"]
