"""A small 4.0 file with ``fields`` records (spec 5.11), for the fields and fuzz tests."""
from pathlib import Path

import ml_dtypes
import numpy as np

from resmoe_format import MoELayer, Writer, codecs
from resmoe_format.schema import MatrixSpec, SourceSpec

NP = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}


def upcycled(rng, experts: int, shape: tuple[int, int], dtype: str, noise: float = 0.2):
    """(base, experts): experts = base + relative noise, in ``dtype``."""
    base = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    xs = [(base * (1 + noise * rng.standard_normal(shape))).astype(NP[dtype]) for _ in range(experts)]
    return base.astype(NP[dtype]), xs


def fields_layer(rng, dtype: str = "bf16", experts: int = 3) -> tuple[MoELayer, dict[str, np.ndarray]]:
    """A predictor layer: matrix ``a`` coded against its base, ``b`` raw (no base); and the source tensors."""
    base, xa = upcycled(rng, experts, (6, 40), dtype)
    _, xb = upcycled(rng, experts, (40, 6), dtype)
    xa[0][0, :4] = [0.0, -0.0, np.inf, -np.inf]
    mats = [MatrixSpec("a", (6, 40), dtype, 0), MatrixSpec("b", (40, 6), dtype, 1)]
    residuals = [{"a": codecs.encode(xa[k], "fields", dtype, predictor=base),
                  "b": codecs.encode(xb[k], "fields", dtype)} for k in range(experts)]
    perms = [rng.permutation(6) for _ in range(experts)]
    sources = [SourceSpec(f"e.{k}.{m.name}", dtype, m.shape, k, [m.name]) for k in range(experts) for m in mats]
    layer = MoELayer(0, 6, mats, "predictor", {"a": codecs.encode(base, "fields", dtype)}, residuals, perms, sources)
    want = {}
    for k in range(experts):
        inv = np.argsort(perms[k])
        want[f"e.{k}.a"] = xa[k][inv]
        want[f"e.{k}.b"] = xb[k][:, inv]
    return layer, want


def write_fields_file(path: Path, dtype: str = "bf16") -> tuple[Path, dict[str, np.ndarray]]:
    """Write the file; returns its path and every tensor it restores in original order."""
    layer, want = fields_layer(np.random.default_rng(7), dtype)
    with Writer(path, {"architecture": "t", "source_dtype": dtype}) as w:
        w.add_layer(layer)
    return path, want
