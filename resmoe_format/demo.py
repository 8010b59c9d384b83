"""A small synthetic .rmoe file built from known parts, for the quick start and the spec's
worked example. No model, no download.

The experts are built the way upcycled MoEs look: one base expert, its hidden neurons
shuffled per expert, plus a sparse or low-rank perturbation. The file stores that base
as the barycenter, the shuffles as permutations and the perturbations as residuals, in
a different encoding per expert so that every encoding appears. It is a Mixtral model laid
out as its architecture record says (spec 4.14: matrices gate, up, down with the neuron axis
first, prefix the experts module), so ``resmoe_format.torch.load_model`` runs it and
``resmoe-export --to gguf`` exports it.

    python -m resmoe_format.demo demo.rmoe
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from . import codecs
from .architectures import MIXTRAL
from .codecs import Quant
from .container import MoELayer, Writer
from .schema import LayerSpec, MatrixSpec


def _mixtral_config(layers: int, experts: int, hidden: int, inter: int, vocab: int) -> dict:
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_local_experts": experts,
            "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
            "rope_theta": 1e6, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


# (encoding, value dtype, quant, params) per expert, cycled: every encoding appears.
PLAN = [("csr16", "bf16", None, {}), ("bitmap", "bf16", None, {}), ("bsr", "fp16", None, {"block_shape": (8, 8)}),
        ("lowrank", "bf16", None, {"rank": 4}), ("bitmap", "int8", Quant("per_row"), {}),
        ("csr16", "int8", Quant("per_block", block=64), {}), ("rice", "bf16", None, {}), ("auto", "bf16", None, {})]


def build(path: str | Path, layers: int = 2, experts: int = 8, hidden: int = 64, inter: int = 128,
          vocab: int = 256, density: float = 0.1, seed: int = 0) -> Path:
    """Write the demo file; returns its path."""
    rng = np.random.default_rng(seed)
    cfg = _mixtral_config(layers, experts, hidden, inter, vocab)
    model = {"architecture": "MixtralForCausalLM", "model_type": "mixtral", "adapter": "demo", "source_dtype": "bf16"}
    method = {"name": "demo", "note": "synthetic experts: permuted base + sparse/low-rank residual"}
    with Writer(path, model, method) as w:
        w.add_file("config.json", json.dumps(cfg, indent=2).encode())
        w.add_passthrough("model.embed_tokens.weight", _bf16(rng.standard_normal((vocab, hidden)) * 0.02))
        for i in range(layers):
            p = f"model.layers.{i}"
            for proj, shape in (("q_proj", (hidden, hidden)), ("k_proj", (hidden // 2, hidden)),
                                ("v_proj", (hidden // 2, hidden)), ("o_proj", (hidden, hidden))):
                w.add_passthrough(f"{p}.self_attn.{proj}.weight", _bf16(rng.standard_normal(shape) * 0.05))
            w.add_passthrough(f"{p}.input_layernorm.weight", _bf16(np.ones(hidden)))
            w.add_passthrough(f"{p}.post_attention_layernorm.weight", _bf16(np.ones(hidden)))
            w.add_passthrough(f"{p}.block_sparse_moe.gate.weight", _bf16(rng.standard_normal((experts, hidden)) * 0.1))
            w.add_layer(_layer(rng, i, experts, hidden, inter, density))
        w.add_passthrough("model.norm.weight", _bf16(np.ones(hidden)))
        w.add_passthrough("lm_head.weight", _bf16(rng.standard_normal((vocab, hidden)) * 0.02))
    return Path(path)


def _bf16(a: np.ndarray) -> np.ndarray:
    return codecs.base.to_value_dtype(np.asarray(a, dtype=np.float32), "bf16")


def _layer(rng, i: int, experts: int, hidden: int, inter: int, density: float) -> MoELayer:
    shapes = dict.fromkeys(MIXTRAL.matrices, (inter, hidden))  # canonical: neuron axis first
    mats = [MatrixSpec(n, shapes[n], "bf16", 0) for n in MIXTRAL.matrices]
    base = {n: _bf16(rng.standard_normal(shapes[n]) * 0.05).astype(np.float32) for n in shapes}
    residuals, perms = [], []
    for k in range(experts):
        enc, vd, q, params = PLAN[k % len(PLAN)]
        perms.append(rng.permutation(inter))
        res = {}
        for n in MIXTRAL.matrices:
            if enc == "lowrank":
                m, c = shapes[n]
                r = params["rank"]
                res[n] = codecs.encode(None, "lowrank", vd, q, u=rng.standard_normal((m, r)) * 0.02,
                                       v=rng.standard_normal((r, c)) * 0.02)
            else:
                d = rng.standard_normal(shapes[n]).astype(np.float32) * 0.02
                d[rng.random(shapes[n]) >= density] = 0
                res[n] = codecs.encode(d, enc, vd, q, **params)
        residuals.append(res)
    prefix = MIXTRAL.prefixes[0].format(i=i)
    skeleton = LayerSpec(i, prefix, experts, inter, mats, "barycenter", {}, None, [{} for _ in range(experts)], [])
    sources = MIXTRAL.source_specs(prefix, skeleton)  # w1, w3 as stored; w2 (hidden, inter) transposed
    base_enc = {n: codecs.encode(base[n], "dense", "bf16") for n in shapes}
    return MoELayer(i, inter, mats, "barycenter", base_enc, residuals, perms, sources, prefix=prefix)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resmoe_format.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="path of the .rmoe file to write")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    p = build(a.out, a.layers, a.experts, a.hidden, a.intermediate, seed=a.seed)
    print(f"wrote {p} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
