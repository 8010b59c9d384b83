"""What one expert computes, per family of transformers experts modules.

Each kind is named by the architecture records (:mod:`resmoe_format.architectures`): a record
gives the canonical matrices (spec 4.14: neuron axis first, shape (n, hidden)), the inputs
first and the output last, its optional biases, and how transformers' experts module holds
them; the kind adds the nonlinearity between them and how the module passes its routing.

For a token x routed to expert e with weight w, every kind computes

    pre_m = x @ W_m.T + b_m        for m in inputs (b_m only where the kind has biases)
    h     = activate(pre)          (n,)
    y    += w * (h @ W_out + b_out)
"""
from __future__ import annotations

from typing import Callable, ClassVar

import numpy as np
import torch
from torch import nn

from ..architectures import BY_MODEL_TYPE, Family
from ..errors import RmoeRuntimeError
from ..restore import assemble_expert
from .tensors import to_torch

#: kind name (``Family.kind``) -> class
KINDS: dict[str, type["ExpertKind"]] = {}


def register(name: str) -> Callable[[type["ExpertKind"]], type["ExpertKind"]]:
    """Class decorator: the kind that architecture records name ``name``."""
    def deco(cls: type[ExpertKind]) -> type[ExpertKind]:
        KINDS[name] = cls
        cls.name = name
        return cls
    return deco


def supported_model_types() -> list[str]:
    """The transformers model types the runtime builds (their record's kind is registered)."""
    return sorted(t for t, f in BY_MODEL_TYPE.items() if f.kind in KINDS)


def kind_for(config) -> "ExpertKind":
    """The expert kind of a transformers config (RmoeRuntimeError listing the supported ones)."""
    t = getattr(config, "model_type", None)
    fam = BY_MODEL_TYPE.get(t) if isinstance(t, str) else None
    if fam is None or fam.kind not in KINDS:
        raise RmoeRuntimeError(f"the runtime cannot build model_type {t!r}; "
                               f"supported: {', '.join(supported_model_types())}")
    return KINDS[fam.kind](config, fam)


class ExpertKind:
    """One family of experts modules (subclasses register under the name records use)."""

    name: ClassVar[str] = ""

    def __init__(self, config, family: Family):
        self.config = config
        self.family = family
        self.inputs: tuple[str, ...] = family.matrices[:-1]
        self.output: str = family.matrices[-1]
        self.input_biases: tuple[str, ...] = family.biases[:-1]  # one per input, in the same order, or none
        self.output_bias: str | None = family.biases[-1] if family.biases else None

    @property
    def matrices(self) -> tuple[str, ...]:
        return self.inputs + (self.output,) + self.input_biases + ((self.output_bias,) if self.output_bias else ())

    def activate(self, pre: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def intermediate(self, x: torch.Tensor, mats: dict[str, torch.Tensor]) -> torch.Tensor:
        """h = activate(x W_m^T + b_m) for the input matrices ``mats`` (canonical), in ``x``'s dtype."""
        pre = []
        for j, name in enumerate(self.inputs):
            p = x @ mats[name].to(x.dtype).T
            if self.input_biases:
                p = p + mats[self.input_biases[j]].to(x.dtype)
            pre.append(p)
        return self.activate(pre)

    def routing(self, num_experts: int, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x (T, H), expert index (T, k), weight (T, k)) from the experts module's forward arguments.

        An index equal to ``num_experts`` means "no expert" (transformers' padding convention).
        """
        return hidden, index, weights

    def write_dense(self, module: nn.Module, expert: int, mats: dict[str, np.ndarray], dtype: torch.dtype,
                    device: torch.device | str) -> None:
        """Copy one expert's restored canonical matrices into the transformers experts module, laid
        out as the record's ``module_layout`` says (rules for absent matrices are skipped)."""
        for rule in self.family.module_layout:
            if not set(rule.parts) <= set(mats):
                continue
            piece = to_torch(assemble_expert(rule, mats), dtype, device)
            if rule.per_expert:
                module.get_parameter(rule.name.format(k=expert)).data.copy_(piece)
            else:
                module.get_parameter(rule.name).data[expert] = piece

    def read_dense(self, module: nn.Module, expert: int) -> dict[str, torch.Tensor]:
        """One expert's canonical matrices (neuron axis first) as views of the transformers experts module's
        parameters, the inverse of :meth:`write_dense` (autograd flows into the module's parameters)."""
        out: dict[str, torch.Tensor] = {}
        for rule in self.family.module_layout:
            try:
                t = module.get_parameter(rule.name.format(k=expert) if rule.per_expert else rule.name)
            except AttributeError:
                continue  # an absent optional matrix (bias)
            out.update(_split(rule, t if rule.per_expert else t[expert]))
        return out

    def dense_parameters(self, module: nn.Module) -> list[str]:
        """Names of the experts module's parameters that ``write_dense`` fills."""
        return [n for n, _ in module.named_parameters()]


def _split(rule, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The canonical pieces of one expert's stored tensor ``t`` under ``rule``."""
    p, axis = len(rule.parts), rule.join_axis
    if p == 1:
        pieces = [t]
    elif rule.join == "concat":
        pieces = list(t.chunk(p, dim=axis))
    else:  # interleave: a0 b0 a1 b1 ... along join_axis
        u = t.unflatten(axis, (-1, p))
        pieces = [u.select(axis + 1, j) for j in range(p)]
    return {name: piece.T if rule.transpose and piece.dim() == 2 else piece
            for name, piece in zip(rule.parts, pieces)}


def _act(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


@register("swiglu")
class SwiGLU(ExpertKind):
    """``act(x gate^T) * (x up^T) @ down``."""

    def __init__(self, config, family):
        super().__init__(config, family)
        self.act = _act(config.hidden_act)

    def activate(self, pre):
        return self.act(pre[0]) * pre[1]


@register("switch")
class SwitchFFN(ExpertKind):
    """``act(x wi^T) @ wo``; top-1 routing passed as a one-hot mask (T, 1, E) that is all zeros for a
    token over capacity."""

    def __init__(self, config, family):
        super().__init__(config, family)
        self.act = _act(config.dense_act_fn)

    def activate(self, pre):
        return self.act(pre[0])

    def routing(self, num_experts, hidden, index, weights):
        mask = index.reshape(index.shape[0], -1)  # (T, E) one-hot or zero
        chosen = torch.where(mask.any(-1), mask.to(torch.int8).argmax(-1), torch.full_like(mask[:, 0], num_experts,
                                                                                            dtype=torch.long))
        return hidden, chosen.long().unsqueeze(1), weights.reshape(-1, 1)


@register("gpt_oss_glu")
class GptOssGLU(ExpertKind):
    """GPT-OSS's clamped GLU with biases."""

    def __init__(self, config, family):
        super().__init__(config, family)
        self.alpha = config.swiglu_alpha
        self.limit = config.swiglu_limit

    def activate(self, pre):
        gate = pre[0].clamp(min=None, max=self.limit)
        up = pre[1].clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
