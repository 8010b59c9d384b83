"""Small .rmoe files for tests, built through the public writer API."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from resmoe_format import MoELayer, MatrixSpec, SourceSpec, Writer, codecs
from resmoe_format.dtypes import by_name
from resmoe_format.exact import lossless_split


def random_experts(rng, experts: int, inter: int, hidden: int, dtype: str, noise: float = 0.01):
    """Upcycled-style experts: one base, neurons shuffled per expert, plus noise; in ``dtype``."""
    np_dt = by_name(dtype).np
    base = {"gate": rng.standard_normal((inter, hidden)), "up": rng.standard_normal((inter, hidden)),
            "down": rng.standard_normal((hidden, inter))}
    out, perms = [], []
    for _ in range(experts):
        p = rng.permutation(inter)
        inv = np.argsort(p)
        e = {"gate": base["gate"][inv], "up": base["up"][inv], "down": base["down"][:, inv]}
        out.append({k: (v + noise * rng.standard_normal(v.shape)).astype(np.float32).astype(np_dt)
                    for k, v in e.items()})
        perms.append(p)
    return base, out, perms


MATS = (("gate", 0), ("up", 0), ("down", 1))


def lossless_layer(index: int, experts: list[dict], perms: list[np.ndarray], base: dict, dtype: str,
                   encodings=("csr16", "bitmap", "dense", "bsr"), stacked: bool = False) -> MoELayer:
    """A layer whose residuals restore ``experts`` (original order) bit for bit."""
    inter, hidden = experts[0]["gate"].shape
    shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    mats = [MatrixSpec(n, shapes[n], dtype, ax) for n, ax in MATS]
    aligned = [{n: np.take(e[n], p, axis=ax) for n, ax in MATS} for e, p in zip(experts, perms)]
    base_enc, residuals = {}, [dict() for _ in experts]
    for n, ax in MATS:
        b, res = lossless_split([a[n] for a in aligned], base[n], dtype)
        base_enc[n] = codecs.encode(b.astype(np.float32), "dense", dtype)
        for k, d in enumerate(res):
            residuals[k][n] = codecs.encode(d, encodings[k % len(encodings)], "fp32")
    pre = f"model.layers.{index}.mlp.experts"
    if stacked:  # GPT-OSS style: fused, interleaved gate/up, transposed, stacked over experts
        E = len(experts)
        sources = [SourceSpec(f"{pre}.gate_up_proj", dtype, (E, hidden, 2 * inter), "all", ["gate", "up"],
                              transpose=True, join="interleave", join_axis=1),
                   SourceSpec(f"{pre}.down_proj", dtype, (E, inter, hidden), "all", ["down"], transpose=True)]
    else:
        sources = [SourceSpec(f"{pre}.{k}.{n}_proj.weight", dtype, shapes[n], k, [n])
                   for k in range(len(experts)) for n, _ in MATS]
    return MoELayer(index, inter, mats, "barycenter", base_enc, residuals, perms, sources)


def source_tensors(index: int, experts: list[dict], stacked: bool = False) -> dict[str, np.ndarray]:
    """What the source checkpoint holds for these experts (the reference for restore)."""
    pre = f"model.layers.{index}.mlp.experts"
    if stacked:
        gate_up = [np.stack([e["gate"].T, e["up"].T], axis=2).reshape(e["gate"].shape[1], -1) for e in experts]
        return {f"{pre}.gate_up_proj": np.stack(gate_up), f"{pre}.down_proj": np.stack([e["down"].T for e in experts])}
    return {f"{pre}.{k}.{n}_proj.weight": e[n] for k, e in enumerate(experts) for n, _ in MATS}


def write_lossless_file(path: Path, dtype: str = "bf16", experts: int = 4, inter: int = 24, hidden: int = 16,
                        layers: int = 2, seed: int = 0, stacked: bool = False) -> dict[str, np.ndarray]:
    """Write a lossless file; returns every source tensor it must restore to."""
    rng = np.random.default_rng(seed)
    expected: dict[str, np.ndarray] = {}
    with Writer(path, {"architecture": "TestMoE", "source_dtype": dtype}, {"name": "test", "lossless": True}) as w:
        w.add_file("config.json", json.dumps({"model_type": "test"}).encode())
        emb = rng.standard_normal((32, hidden)).astype(np.float32).astype(by_name(dtype).np)
        w.add_passthrough("model.embed_tokens.weight", emb)
        expected["model.embed_tokens.weight"] = emb
        for i in range(layers):
            base, ex, perms = random_experts(rng, experts, inter, hidden, dtype)
            # a poor base on purpose (shifted, scaled) so many elements need the exact fallback
            w.add_layer(lossless_layer(i, ex, perms, {k: v * 3 + 1e3 * (k == "up") for k, v in base.items()},
                                       dtype, stacked=stacked))
            expected.update(source_tensors(i, ex, stacked))
    return expected
