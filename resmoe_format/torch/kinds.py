"""What one expert computes, per family of transformers experts modules.

Each kind names the canonical matrices (spec: neuron axis first, shape (n, hidden)) that
multiply the input (``inputs``) and the one the activations multiply (``output``), the
nonlinearity between them, how the transformers experts module passes its routing, and how
dense experts are written into that module's own parameters (``materialize``).

For a token x routed to expert e with weight w, every kind computes

    pre_m = x @ W_m.T + b_m        for m in inputs (b_m only where the kind has biases)
    h     = activate(pre)          (n,)
    y    += w * (h @ W_out + b_out)
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn

from ..errors import RmoeRuntimeError

KINDS: dict[str, type["ExpertKind"]] = {}


def register(*model_types: str) -> Callable[[type["ExpertKind"]], type["ExpertKind"]]:
    """Class decorator: the kind serves these transformers ``model_type`` values."""
    def deco(cls: type[ExpertKind]) -> type[ExpertKind]:
        for t in model_types:
            KINDS[t] = cls
        cls.model_types = model_types
        return cls
    return deco


def kind_for(config) -> "ExpertKind":
    """The expert kind of a transformers config (RmoeRuntimeError listing the supported ones)."""
    cls = KINDS.get(getattr(config, "model_type", None))
    if cls is None:
        raise RmoeRuntimeError(f"the runtime cannot build model_type {getattr(config, 'model_type', None)!r}; "
                               f"supported: {', '.join(sorted(KINDS))}")
    return cls(config)


class ExpertKind:
    """One family of experts modules (subclasses register the model types they serve)."""

    model_types: ClassVar[tuple[str, ...]] = ()
    inputs: ClassVar[tuple[str, ...]]
    output: ClassVar[str]
    input_biases: ClassVar[tuple[str, ...]] = ()  # one per input, in the same order, or none
    output_bias: ClassVar[str | None] = None

    def __init__(self, config):
        self.config = config

    @property
    def matrices(self) -> tuple[str, ...]:
        return self.inputs + (self.output,) + self.input_biases + ((self.output_bias,) if self.output_bias else ())

    def activate(self, pre: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def routing(self, num_experts: int, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x (T, H), expert index (T, k), weight (T, k)) from the experts module's forward arguments.

        An index equal to ``num_experts`` means "no expert" (transformers' padding convention).
        """
        return hidden, index, weights

    def write_dense(self, module: nn.Module, expert: int, mats: dict[str, torch.Tensor]) -> None:
        """Copy one expert's canonical matrices into the transformers experts module."""
        raise NotImplementedError

    def dense_parameters(self, module: nn.Module) -> list[str]:
        """Names of the experts module's parameters that ``write_dense`` fills."""
        return [n for n, _ in module.named_parameters()]


def _act(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


@register("mixtral", "phimoe", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
class SwiGLU(ExpertKind):
    """``act(x gate^T) * (x up^T) @ down``; stacked ``gate_up_proj`` (E, 2n, H), ``down_proj`` (E, H, n)."""

    inputs = ("gate", "up")
    output = "down"

    def __init__(self, config):
        super().__init__(config)
        self.act = _act(config.hidden_act)

    def activate(self, pre):
        return self.act(pre[0]) * pre[1]

    def write_dense(self, module, expert, mats):
        n = mats["gate"].shape[0]
        module.gate_up_proj.data[expert, :n] = mats["gate"]
        module.gate_up_proj.data[expert, n:] = mats["up"]
        module.down_proj.data[expert] = mats["down"].T


@register("switch_transformers")
class SwitchFFN(ExpertKind):
    """``act(x wi^T) @ wo``; one ``expert_k`` module each with ``wi`` and ``wo`` Linear layers, top-1
    routing passed as a one-hot mask (T, 1, E) that is all zeros for a token over capacity."""

    inputs = ("wi",)
    output = "wo"

    def __init__(self, config):
        super().__init__(config)
        self.act = _act(config.dense_act_fn)

    def activate(self, pre):
        return self.act(pre[0])

    def routing(self, num_experts, hidden, index, weights):
        mask = index.reshape(index.shape[0], -1)  # (T, E) one-hot or zero
        chosen = torch.where(mask.any(-1), mask.to(torch.int8).argmax(-1), torch.full_like(mask[:, 0], num_experts,
                                                                                            dtype=torch.long))
        return hidden, chosen.long().unsqueeze(1), weights.reshape(-1, 1)

    def write_dense(self, module, expert, mats):
        e = module[f"expert_{expert}"]
        e.wi.weight.data.copy_(mats["wi"])
        e.wo.weight.data.copy_(mats["wo"].T)


@register("gpt_oss")
class GptOssGLU(ExpertKind):
    """GPT-OSS's clamped GLU with biases; gate and up interleaved in ``gate_up_proj`` (E, H, 2n)."""

    inputs = ("gate", "up")
    output = "down"
    input_biases = ("gate_bias", "up_bias")
    output_bias = "down_bias"

    def __init__(self, config):
        super().__init__(config)
        self.alpha = config.swiglu_alpha
        self.limit = config.swiglu_limit

    def activate(self, pre):
        gate = pre[0].clamp(min=None, max=self.limit)
        up = pre[1].clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def write_dense(self, module, expert, mats):
        module.gate_up_proj.data[expert, :, 0::2] = mats["gate"].T
        module.gate_up_proj.data[expert, :, 1::2] = mats["up"].T
        module.down_proj.data[expert] = mats["down"]
        if "gate_bias" in mats:
            module.gate_up_proj_bias.data[expert, 0::2] = mats["gate_bias"]
            module.gate_up_proj_bias.data[expert, 1::2] = mats["up_bias"]
            module.down_proj_bias.data[expert] = mats["down_bias"]
