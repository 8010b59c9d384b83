"""True byte accounting of a .rmoe file (spec/FORMAT.md section 8).

Every byte of the file falls in exactly one category; the categories add up to the
file size. Expert costs are also given in bits per expert weight, next to the source dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import dtypes
from .container import Reader

#: Every category of spec section 8, in table order. Float and int8 value parts count as ``barycenters`` /
#: ``residual_values`` and their scales as ``scales``; k-quant value parts (spec 5.10) as ``barycenter_codes`` /
#: ``residual_codes``, ``group_scales`` and ``superblock_scales``; the streams of ``fields`` records (spec 5.11) as
#: ``coded_signs``, ``coded_heads`` (heads and escapes) and ``coded_tails``, base records included.
CATEGORIES = ("header", "barycenters", "barycenter_codes", "permutations", "residual_values", "residual_codes",
              "residual_indices", "scales", "group_scales", "superblock_scales", "coded_signs", "coded_heads",
              "coded_tails", "extensions", "compressed_experts", "checksums", "passthrough", "embedded_files")
#: Categories that make up the stored cost of the compressed experts.
EXPERT_CATEGORIES = ("barycenters", "barycenter_codes", "permutations", "residual_values", "residual_codes",
                     "residual_indices", "scales", "group_scales", "superblock_scales", "coded_signs", "coded_heads",
                     "coded_tails", "extensions", "compressed_experts")


@dataclass
class Accounting:
    file_size: int
    bytes: dict[str, int]
    expert_weights: int  # number of expert weights in compressed layers
    source_expert_bytes: int  # what those weights cost in their source dtype
    layers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def expert_bytes(self) -> int:
        return sum(self.bytes[c] for c in EXPERT_CATEGORIES)

    def bits_per_expert_weight(self, category: str | None = None) -> float:
        b = self.expert_bytes if category is None else self.bytes[category]
        return 8.0 * b / self.expert_weights if self.expert_weights else 0.0

    @property
    def source_bits_per_weight(self) -> float:
        return 8.0 * self.source_expert_bytes / self.expert_weights if self.expert_weights else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "file_size": self.file_size,
            "bytes": self.bytes,
            "bits_per_expert_weight": {c: self.bits_per_expert_weight(c) for c in CATEGORIES},
            "expert_weights": self.expert_weights,
            "expert_bytes": self.expert_bytes,
            "expert_bits_per_weight": self.bits_per_expert_weight(),
            "source_expert_bytes": self.source_expert_bytes,
            "source_bits_per_weight": self.source_bits_per_weight,
            "expert_ratio": self.expert_bytes / self.source_expert_bytes if self.source_expert_bytes else None,
            "layers": self.layers,
        }


def account(reader: Reader) -> Accounting:
    """Attribute every byte of an open .rmoe file (reads the header only). A sharded file (spec 11) sums
    its shards, and its index file counts as ``header``; the categories add up to all of its bytes."""
    shards = getattr(reader, "shards", None)
    if shards is not None:
        parts = [account(r) for r in shards]
        total = {c: sum(a.bytes[c] for a in parts) for c in CATEGORIES}
        total["header"] += reader.index_size
        assert sum(total.values()) == reader.file_size, "accounting does not cover the files"
        return Accounting(reader.file_size, total, sum(a.expert_weights for a in parts),
                          sum(a.source_expert_bytes for a in parts), [lay for a in parts for lay in a.layers])
    total = {c: 0 for c in CATEGORIES}
    total["header"] = reader.header.data_start
    per_layer: dict[int, dict[str, int]] = {}
    for name, t in reader.header.tensors.items():
        role = reader.roles[name]
        total[role.category] += t.nbytes
        if role.layer is not None:
            d = per_layer.setdefault(role.layer, {c: 0 for c in EXPERT_CATEGORIES})
            d[role.category] += t.nbytes
    assert sum(total.values()) == reader.file_size, "accounting does not cover the file"
    weights = src_bytes = 0
    layers = []
    for lay in reader.layers:
        n = sum(_numel(m.shape) for m in lay.matrices) * lay.num_experts
        sb = sum(_numel(m.shape) * dtypes.by_name(m.dtype).itemsize for m in lay.matrices) * lay.num_experts
        weights += n
        src_bytes += sb
        b = per_layer.get(lay.index, {c: 0 for c in EXPERT_CATEGORIES})
        eb = sum(b.values())
        layers.append({"index": lay.index, "num_experts": lay.num_experts, "expert_weights": n,
                       "source_bytes": sb, "bytes": b, "expert_bytes": eb,
                       "bits_per_expert_weight": 8.0 * eb / n if n else 0.0,
                       "encodings": _encodings(lay)})
    return Accounting(reader.file_size, total, weights, src_bytes, layers)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _encodings(lay) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in lay.residuals:
        for ref in r.values():
            key = "none" if ref is None else f"{ref.encoding}/{ref.value_dtype}"
            counts[key] = counts.get(key, 0) + 1
    return counts
