"""The two budget conventions (README "Budgets"; spec section 4.12).

``keep`` F is the fraction of a layer's expert parameters stored *in total*, base
included: a method with a shared base over E experts has F*E*P - P parameters left for
its E residuals, i.e. F - 1/E of P each. ``residual_keep`` F is the paper's convention:
each residual keeps F of P and the base comes on top.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConversionError

DEFAULT_KEEP = 0.25


@dataclass(frozen=True)
class Budget:
    """A validated budget: exactly one of ``keep`` and ``residual_keep``."""

    keep: float | None = None
    residual_keep: float | None = None
    implicit: bool = field(default=False, compare=False)  # the default --keep, not given by the user

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.residual_keep is None):
            raise ConversionError("give exactly one of --keep and --residual-keep")
        for flag, v in (("--keep", self.keep), ("--residual-keep", self.residual_keep)):
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1):
                raise ConversionError(f"{flag} must be in (0, 1], got {v}")

    @classmethod
    def of(cls, keep: float | None, residual_keep: float | None) -> Budget:
        """The budget from the two flags, ``--keep 0.25`` when neither is given."""
        if keep is None and residual_keep is None:
            return cls(DEFAULT_KEEP, None, implicit=True)
        return cls(keep, residual_keep)

    def residual_params(self, params: int, num_experts: int, base_params: int) -> int:
        """Parameters each residual may keep, for experts of ``params`` parameters and a
        shared base of ``base_params`` (0 for methods without a base)."""
        if self.residual_keep is not None:
            return math.floor(self.residual_keep * params)
        total = self.keep * num_experts * params
        if base_params > total * (1 + 1e-9):
            raise ConversionError(
                f"{'the default ' if self.implicit else ''}--keep {self.keep} is below what the shared base "
                f"alone costs with {num_experts} experts "
                f"(1/{num_experts} = {1 / num_experts:.4g}); raise --keep or use --residual-keep")
        return max(0, math.floor((total - base_params) / num_experts + 1e-9))

    def flag(self) -> str:
        """The budget as its command-line flag, e.g. ``--keep 0.25``."""
        return f"--keep {self.keep:g}" if self.keep is not None else f"--residual-keep {self.residual_keep:g}"

    def to_json(self) -> dict:
        return {"keep": self.keep} if self.keep is not None else {"residual_keep": self.residual_keep}
