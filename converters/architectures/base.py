"""What an architecture adapter declares: where a model's MoE layers are; how each expert's
canonical matrices map onto the checkpoint's tensors comes from its architecture record.

Canonical layout (spec 4.14; the encoders, the runtime and the exporters rely on it): every
per-neuron 2-D matrix has the hidden (intermediate) neuron axis first, shape (n, hidden),
``neuron_axis`` 0; a source tensor stored the other way round (a ``down_proj`` of shape
(hidden, n)) says ``transpose``. 1-D biases indexed by neuron have ``neuron_axis`` 0, others ``None``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from resmoe_format import MatrixSpec, RmoeFormatError, SourceSpec, container
from resmoe_format.architectures import Family
from resmoe_format.dtypes import SOURCE_DTYPES
from resmoe_format.schema import LayerSpec

from ..checkpoint import TensorInfo
from ..errors import ConversionError


@dataclass
class LayerLayout:
    """One MoE layer of the source model, as the encoder and the writer need it."""

    index: int  # the model's layer number (Switch: encoder block b -> b, decoder block b -> num_layers + b)
    prefix: str  # module path of the experts, e.g. "model.layers.3.block_sparse_moe.experts"
    num_experts: int
    num_neurons: int
    matrices: list[MatrixSpec]
    sources: list[SourceSpec]

    def spec(self) -> LayerSpec:
        """A skeleton :class:`LayerSpec` of this layout (no base or residuals), for shape checks."""
        return LayerSpec(self.index, self.prefix, self.num_experts, self.num_neurons, self.matrices, "barycenter",
                         {}, None, [{} for _ in range(self.num_experts)], self.sources)

    def source_shape(self, src: SourceSpec) -> tuple[int, ...]:
        """The shape ``src``'s assembly rule gives (ConversionError if the rule does not fit the matrices)."""
        try:
            return container.source_shape(self.spec(), src)
        except RmoeFormatError as e:
            raise ConversionError(str(e)) from None


def is_expert_tensor(name: str) -> bool:
    """A routed expert's weight, by the naming every supported family uses (``...experts.*``;
    Qwen2's ``shared_expert`` and DeepSeek's ``shared_experts`` are not routed experts)."""
    return ".experts." in name


class Adapter:
    """Base class of the architecture adapters; subclasses implement :meth:`layouts`."""

    #: the architecture record (set by ``register``)
    family: ClassVar[Family]

    def __init__(self, config: dict, tensors: Mapping[str, TensorInfo]):
        self.config = config
        self.tensors = tensors

    # --- to implement ----------------------------------------------------------------
    def layouts(self) -> list[LayerLayout]:
        """Every MoE layer of the checkpoint (validated by :meth:`moe_layers`)."""
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        e = self.family.num_experts(self.config)
        if not isinstance(e, int) or e < 1:
            keys = " / ".join(self.family.experts_keys)
            raise ConversionError(f"config.json: {keys} = {e!r}; this is not a Mixture-of-Experts config")
        return e

    def moe_layers(self) -> list[LayerLayout]:
        """Every MoE layer, validated against the checkpoint, sorted by index."""
        layers = sorted(self.layouts(), key=lambda lay: lay.index)
        if not layers and not any(is_expert_tensor(n) for n in self.tensors):
            raise ConversionError(f"{self.label}: no expert tensors found; this is not a Mixture-of-Experts "
                                  f"checkpoint")
        for lay in layers:
            self.validate(lay)
        covered = {s.name for lay in layers for s in lay.sources}
        stray = sorted(n for n in self.tensors if is_expert_tensor(n) and n not in covered)
        if stray:
            more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
            raise ConversionError(f"tensor {stray[0]}{more} looks like an expert weight but no MoE layer that "
                                  f"config.json describes holds it (inconsistent checkpoint: check its layer and "
                                  f"expert counts)")
        return layers

    @property
    def label(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type") or type(self).__name__]
        return str(archs[0])

    def validate(self, lay: LayerLayout) -> None:
        """Every source tensor exists, in a float dtype, with the shape its assembly gives."""
        dts = {m.dtype for m in lay.matrices}
        if len(dts) != 1 or not dts <= set(SOURCE_DTYPES):
            hint = " (dequantize the checkpoint first)" if not dts <= set(SOURCE_DTYPES) else ""
            raise ConversionError(f"layer {lay.index}: expert weights must share one of {', '.join(SOURCE_DTYPES)}, "
                                  f"got {', '.join(sorted(dts))}{hint}")
        names = [m.name for m in lay.matrices]
        if len(set(names)) != len(names):
            raise ConversionError(f"layer {lay.index}: matrix names {names} are not unique")
        for s in lay.sources:
            info = self.tensors.get(s.name)
            if info is None:
                raise ConversionError(f"layer {lay.index}: tensor {s.name} is missing from the checkpoint "
                                      f"(inconsistent checkpoint)")
            if info.dtype != s.dtype:
                raise ConversionError(f"tensor {s.name}: dtype {info.dtype}, but the layer's experts are {s.dtype}")
            want = lay.source_shape(s)
            if tuple(info.shape) != want:
                raise ConversionError(f"tensor {s.name}: shape {list(info.shape)}, expected {list(want)} "
                                      f"(shape mismatch between experts of layer {lay.index})")
        given = {p for s in lay.sources for p in s.parts}
        if set(names) - given:
            raise ConversionError(f"layer {lay.index}: no source tensor provides matrix "
                                  f"{sorted(set(names) - given)[0]}")

    def info(self, name: str) -> TensorInfo | None:
        return self.tensors.get(name)

    def per_expert(self, index: int, prefix: str) -> LayerLayout | None:
        """A layer whose experts are separate Linear weights under ``prefix`` (Mixtral, Qwen, Switch,
        ...), named as the record's source rules say. None when the layer has no experts (a dense layer)."""
        rule = self.family.source[0]
        first = self.info(rule.tensor(prefix, 0))
        if first is None:
            return None
        n, h = first.shape if len(first.shape) == 2 else (0, 0)
        if rule.transpose:
            n, h = h, n
        E = self.num_experts
        if self.info(rule.tensor(prefix, E)) is not None:
            raise ConversionError(f"layer {index}: the checkpoint has more experts than config.json's "
                                  f"expert count {E}")
        mats = [MatrixSpec(m, (n, h), first.dtype, 0) for m in self.family.matrices]
        return self.layout(index, prefix, E, n, mats)

    def layout(self, index: int, prefix: str, num_experts: int, n: int, mats: list[MatrixSpec]) -> LayerLayout:
        """The layer with its sources as the record's rules give them."""
        lay = LayerLayout(index, prefix, num_experts, n, mats, [])
        try:
            lay.sources = self.family.source_specs(prefix, lay.spec())
        except RmoeFormatError as e:
            raise ConversionError(str(e)) from None
        return lay

    def num_layers(self, key: str = "num_hidden_layers") -> int:
        n = self.config.get(key)
        if not isinstance(n, int) or n < 0:
            raise ConversionError(f"config.json: {key} = {n!r} is not a layer count")
        return n

    def require(self, index: int, layout: LayerLayout | None, what: str) -> LayerLayout:
        """A layer the config says is an MoE layer must have expert tensors."""
        if layout is None:
            raise ConversionError(f"layer {index}: config.json makes it an MoE layer but the checkpoint has no "
                                  f"{what} tensors for it (inconsistent checkpoint)")
        return layout


class PerExpertAdapter(Adapter):
    """Experts as separate Linear weights (the record's rules) in every decoder layer that
    :meth:`is_sparse` says is an MoE layer."""

    def is_sparse(self, i: int) -> bool:
        return True

    def layouts(self) -> list[LayerLayout]:
        out = []
        for i in range(self.num_layers()):
            lay = self.per_expert(i, self.family.prefixes[0].format(i=i))
            if self.is_sparse(i):
                out.append(self.require(i, lay, "expert"))
            elif lay is not None:
                out.append(lay)
        return out
