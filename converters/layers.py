"""``--layers``: which MoE layers to compress (the others pass through unchanged)."""
from __future__ import annotations

from .errors import ConversionError


def select_layers(spec: str, available: list[int]) -> list[int]:
    """Parse ``all``, ``top:N`` (the last N MoE layers), ``bottom:N`` (the first N) or a list
    such as ``3,5,8-11`` of layer indices; every index must be an MoE layer of the model."""
    avail = sorted(available)
    s = spec.strip().lower()
    if s == "all":
        return avail
    for kind in ("top", "bottom"):
        if s.startswith(kind + ":"):
            try:
                n = int(s[len(kind) + 1:])
            except ValueError:
                raise ConversionError(f"--layers {spec!r}: {kind}:N needs an integer N") from None
            if not 1 <= n <= len(avail):
                raise ConversionError(f"--layers {spec!r}: N must be between 1 and {len(avail)} (the MoE layers)")
            return avail[-n:] if kind == "top" else avail[:n]
    chosen: set[int] = set()
    for item in s.split(","):
        try:
            lo_s, sep, hi_s = item.strip().partition("-")
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
            if lo < 0 or lo > hi:
                raise ValueError
        except ValueError:
            raise ConversionError(f"--layers {spec!r}: expected all, top:N, bottom:N or a list like 3,5,8-11") from None
        chosen.update(range(lo, hi + 1))
    unknown = sorted(chosen - set(avail))
    if unknown:
        raise ConversionError(f"--layers: {', '.join(map(str, unknown))} is not an MoE layer of this model; "
                              f"MoE layers: {_ranges(avail)}")
    return sorted(chosen)


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out) or "(none)"
