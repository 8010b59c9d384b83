"""The encoders behind ``--method``: resmoe (barycenter + aligned residuals) and the
baselines prune, svd and merge, all under the same budget semantics."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from resmoe_format import MatrixSpec
from resmoe_format.codecs import keep_mask
from resmoe_format.dtypes import by_name
from resmoe_format.exact import lossless_split

from ..errors import ConversionError
from . import compress
from .budget import Budget
from .parts import LayerResult, SparsePart

RESIDUALS = ("prune", "svd")
#: resmoe's barycenter iterations at most, unless --max-iter says otherwise
DEFAULT_MAX_ITER = 100

METHODS: dict[str, type[Encoder]] = {}


def register(cls: type[Encoder]) -> type[Encoder]:
    """Class decorator: make an encoder available as ``--method cls.name``."""
    METHODS[cls.name] = cls
    return cls


def get_encoder(name: str, options: EncoderOptions) -> Encoder:
    """The encoder registered as ``name``."""
    try:
        return METHODS[name](options)
    except KeyError:
        raise ConversionError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


@dataclass(frozen=True)
class EncoderOptions:
    """What an encoder needs from the command line: budget, residual compression and scope."""

    budget: Budget
    residual: str = "prune"  # "prune" or "svd" (the CLI defaults it to "svd" for --method svd)
    scope: str = "expert"  # "expert" or "matrix"
    rank: int | None = None
    lossless: bool = False
    max_iter: int = DEFAULT_MAX_ITER

    def __post_init__(self) -> None:
        if self.residual not in RESIDUALS:
            raise ConversionError(f"--residual must be one of {', '.join(RESIDUALS)}, got {self.residual!r}")
        if self.scope not in compress.SCOPES:
            raise ConversionError(f"--residual-scope must be one of {', '.join(compress.SCOPES)}, got {self.scope!r}")
        if self.rank is not None and self.rank < 1:
            raise ConversionError(f"--rank must be a positive integer, got {self.rank}")


def round_to(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """``x`` rounded (RNE) to a source dtype and back to float32."""
    td = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    return x.to(td).float()


def params_of(specs: list[MatrixSpec]) -> int:
    return sum(int(np.prod(m.shape)) for m in specs)


def neuron_specs(specs: list[MatrixSpec]) -> list[MatrixSpec]:
    """Matrices indexed by hidden neuron (axis 0 in the converter's canonical layout)."""
    return [m for m in specs if m.neuron_axis == 0]


def design(expert: dict[str, torch.Tensor], specs: list[MatrixSpec]) -> torch.Tensor:
    """One row per hidden neuron: its rows of every neuron-indexed matrix, side by side."""
    return torch.cat([expert[m.name].reshape(expert[m.name].shape[0], -1) for m in specs], dim=1)


def split_design(d: torch.Tensor, specs: list[MatrixSpec]) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for m in specs:
        w = m.shape[1] if len(m.shape) == 2 else 1
        out[m.name] = d[:, at:at + w].reshape(m.shape).contiguous()
        at += w
    return out


class Encoder:
    """Turns one layer's experts (canonical float32 tensors on a device) into a LayerResult."""

    name: ClassVar[str]
    base_kind: ClassVar[str]

    def __init__(self, options: EncoderOptions):
        self.options = options
        if options.lossless and not self.supports_lossless:
            raise ConversionError(f"--lossless is not available with --method {self.name}")
        if self.residual_kind and options.residual != self.residual_kind:
            other = "svd" if self.residual_kind == "prune" else "prune"
            raise ConversionError(f"--method {self.name} uses --residual {self.residual_kind}; "
                                  f"use --method {other} for {options.residual}")

    supports_lossless: ClassVar[bool] = True
    #: the only residual compression a baseline allows (None: either)
    residual_kind: ClassVar[str | None] = None

    def base_params(self, specs: list[MatrixSpec]) -> int:
        return params_of(specs) if self.base_kind != "none" else 0

    def residual_budget(self, specs: list[MatrixSpec], num_experts: int) -> int:
        """Parameters each residual may keep (raises if the budget cannot hold the base)."""
        return self.options.budget.residual_params(params_of(specs), num_experts, self.base_params(specs))

    def check_layer(self, specs: list[MatrixSpec], num_experts: int) -> None:
        """Refuse, before any work, a budget or ``--rank`` this layer's shapes cannot honour; warn
        when the budget buys more SVD rank than the file can store."""
        o = self.options
        if o.lossless:
            return
        budget = self.residual_budget(specs, num_experts)  # raises if the base does not fit
        params = params_of(specs)
        total = (self.base_params(specs) + num_experts * budget) / (num_experts * params)
        if total >= 1:
            exact = "; for an exact file use --lossless" if self.supports_lossless else ""
            raise ConversionError(f"{o.budget.flag()} keeps {total:.1%} of the expert parameters with {num_experts} "
                                  f"experts: nothing is saved (the file would be at least as large as the source); "
                                  f"lower it{exact}")
        if o.residual != "svd":
            return
        limit = compress.rank_limit(specs, o.scope)
        if o.rank is not None and o.rank > limit:
            raise ConversionError(f"--rank {o.rank}: must be between 1 and {limit} for these experts (matrices "
                                  f"{', '.join(f'{m.name} {m.shape}' for m in specs)}, --residual-scope {o.scope})")
        want = compress.shared_rank(specs, budget) if compress.shares_u(specs, o.scope) else 0
        if o.rank is None and want > limit:
            warnings.warn(f"{o.budget.flag()} buys SVD rank {want}, but one shared U stores rank {limit} at most: "
                          f"residuals keep rank {limit}, less than the budget", stacklevel=2)

    def encode(self, experts: list[dict[str, torch.Tensor]], specs: list[MatrixSpec], dtype: str,
               progress: Callable[[str], None] | None = None) -> tuple[LayerResult, list[dict[str, torch.Tensor]]]:
        """Encode one layer; returns the result and the experts in the order it describes.

        ``experts`` is consumed (its tensors may be released to save memory)."""
        base, perms, aligned = self.base(experts, specs, dtype, progress)
        if self.options.lossless:
            return self._lossless(base, perms, aligned, specs, dtype), aligned
        budget = self.residual_budget(specs, len(experts))
        residuals = []
        for a in aligned:
            r = {m.name: (a[m.name] - base[m.name]) if base else a[m.name] for m in specs}
            residuals.append(self.compress(r, specs, budget))
        return LayerResult(self.base_kind, base, perms, residuals), aligned

    def base(self, experts, specs, dtype, progress):
        """(base matrices rounded to ``dtype``, permutations or None, experts in aligned order)."""
        return {}, None, experts

    def compress(self, residual: dict[str, torch.Tensor], specs: list[MatrixSpec], budget: int):
        """One expert's residual parts under ``budget`` parameters (pruned or low rank)."""
        o = self.options
        if budget <= 0 and o.rank is None:
            return {m.name: None for m in specs}
        if o.residual == "svd":
            return compress.svd(residual, specs, budget, o.scope, o.rank)
        return compress.prune(residual, specs, budget, o.scope)

    def _lossless(self, base, perms, aligned, specs, dtype) -> LayerResult:
        np_dt = by_name(dtype).np
        new_base, residuals = {}, [{} for _ in aligned]
        for m in specs:
            xs = [a[m.name].cpu().numpy().astype(np_dt) for a in aligned]
            guess = base[m.name].cpu().numpy() if base else np.zeros(m.shape, np.float32)
            b, res = lossless_split(xs, guess, dtype)
            if base:
                new_base[m.name] = torch.from_numpy(b.astype(np.float32))
            else:  # no base: the residual is the expert itself, exactly representable in float32
                res = [x.astype(np.float32) for x in xs]
            for k, d in enumerate(res):
                t = torch.from_numpy(np.ascontiguousarray(d))
                residuals[k][m.name] = SparsePart(t, torch.from_numpy(keep_mask(d)))
        return LayerResult(self.base_kind, new_base, perms, residuals, lossless=True)


@register
class ResMoE(Encoder):
    """Wasserstein barycenter of the experts' neurons, permutation alignment, compressed residuals."""

    name = "resmoe"
    base_kind = "barycenter"

    def base(self, experts, specs, dtype, progress):
        from .barycenter import wasserstein_barycenter

        neur = neuron_specs(specs)
        designs = torch.stack([design(e, neur) for e in experts])
        for e in experts:  # the designs hold them now: free the originals (encode consumes its input)
            for m in neur:
                del e[m.name]
        res = wasserstein_barycenter(designs, max_iter=self.options.max_iter)
        perms = [np.asarray(p, dtype=np.int64) for p in res.permutations]
        base = split_design(res.barycenter, neur)
        for m in specs:
            if m.neuron_axis != 0:
                base[m.name] = torch.stack([e[m.name] for e in experts]).mean(0)
        aligned = []
        for k, (e, p) in enumerate(zip(experts, perms)):
            idx = torch.from_numpy(p).to(designs.device)
            aligned.append({**split_design(designs[k].index_select(0, idx), neur),
                            **{m.name: e[m.name] for m in specs if m.neuron_axis != 0}})
        del designs
        self.last_barycenter = {"objective": res.objective, "iterations": res.iterations}
        return {k: round_to(v, dtype) for k, v in base.items()}, perms, aligned


@register
class Prune(Encoder):
    """Vanilla magnitude pruning of each expert (no base)."""

    name = "prune"
    base_kind = "none"
    residual_kind = "prune"


@register
class Svd(Encoder):
    """Vanilla truncated SVD of each expert (no base)."""

    name = "svd"
    base_kind = "none"
    supports_lossless = False
    residual_kind = "svd"


@register
class Quant(Encoder):
    """k-quant codes of every expert, no base: ``--bits`` without sharing (converters.encoders.bits)."""

    name = "quant"
    base_kind = "none"
    supports_lossless = False


@register
class Merge(Encoder):
    """Every expert replaced by the experts' average (no residuals)."""

    name = "merge"
    base_kind = "mean"

    def residual_budget(self, specs, num_experts):
        if self.options.budget.residual_keep is not None:
            raise ConversionError("--method merge stores no residuals; --residual-keep does not apply")
        super().residual_budget(specs, num_experts)  # checks the mean fits in --keep
        return 0

    def base(self, experts, specs, dtype, progress):
        return ({m.name: round_to(torch.stack([e[m.name] for e in experts]).mean(0), dtype) for m in specs},
                None, experts)
