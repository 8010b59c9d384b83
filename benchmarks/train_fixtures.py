"""Train the evaluation fixtures: two small MoE language models on Python's own standard library.

No download: the corpus is the running interpreter's standard-library ``.py`` files, split by
file into train and held-out sets (a file is held out when crc32 of its relative path is 0 mod
10). The tokenizer is byte-level (token id = byte value, 256 = ``<|endoftext|>`` between files),
saved as ``tokenizer.json`` so exports carry a real tokenizer.

1. ``mixtral_upcycled``: a dense Mistral-style model is trained first, its FFN is copied into 8
   experts (plus a little noise), and training continues as a Mixtral MoE, top-2.
2. ``qwen3_moe_fine``: a Qwen3-MoE with 32 fine-grained experts, top-4, trained from scratch.

Each writes ``benchmarks/fixtures/<name>/`` (config.json, model.safetensors in bf16,
tokenizer.json, train.json with the measured held-out perplexity) and the held-out text to
``benchmarks/fixtures/heldout.txt``.

    python benchmarks/train_fixtures.py [--fixture all|mixtral_upcycled|qwen3_moe_fine] [--minutes 25] [--threads 1]

The shipped fixtures were trained with ``--minutes 25 --threads 1``, the two fixtures in
parallel on the 2 cores of this project's machines.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from converters.example import write_byte_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
VOCAB = 264  # 256 bytes, <|endoftext|>, padding to a multiple of 8
EOT = 256
SEQ = 256
HELDOUT_BYTES = 1 << 18


def corpus() -> tuple[list[Path], list[Path], Path]:
    """(train files, held-out files, stdlib root), sorted, site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "__pycache__" not in p.parts)
    held = [p for p in files if zlib.crc32(str(p.relative_to(root)).encode()) % 10 == 0]
    held_set = set(held)
    return [p for p in files if p not in held_set], held, root


def token_stream(files: list[Path]) -> np.ndarray:
    """Byte ids of the files, each followed by <|endoftext|>."""
    parts = []
    for p in files:
        parts += [np.frombuffer(p.read_bytes(), dtype=np.uint8).astype(np.int16), np.array([EOT], dtype=np.int16)]
    return np.concatenate(parts)


def common(**kw) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, head_dim=64, max_position_embeddings=SEQ * 2, rms_norm_eps=1e-5,
                tie_word_embeddings=False, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT, **kw)


def batches(ids: np.ndarray, batch: int, seed: int):
    g = np.random.default_rng(seed)
    while True:
        starts = g.integers(0, ids.size - SEQ - 1, batch)
        yield torch.from_numpy(np.stack([ids[s:s + SEQ + 1] for s in starts]).astype(np.int64))


def train(model, ids: np.ndarray, seconds: float, lr: float, seed: int, label: str, batch: int = 16) -> dict:
    """AdamW with warm-up and cosine decay over a time budget; returns the log."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    t0, step, log = time.perf_counter(), 0, []
    for x in batches(ids, batch, seed):
        frac = (time.perf_counter() - t0) / seconds
        if frac >= 1:
            break
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = model(input_ids=x, labels=x, use_cache=False).loss  # transformers shifts the labels
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            log.append({"step": step, "seconds": round(time.perf_counter() - t0, 1), "loss": round(loss.item(), 4)})
            print(f"{label} step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"steps": step, "tokens": step * batch * SEQ, "seconds": time.perf_counter() - t0, "log": log}


def heldout_ppl(model, ids: np.ndarray, windows: int = 64) -> float:
    """Perplexity per byte on the first ``windows`` SEQ-byte windows of the held-out text."""
    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(windows):
            x = torch.from_numpy(ids[i * SEQ:(i + 1) * SEQ + 1].astype(np.int64))[None]
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
            n += SEQ
    return math.exp(nll / n)


def mixtral_upcycled(train_ids, held_ids, minutes: float, seed: int):
    import transformers as T

    torch.manual_seed(seed)
    dense_cfg = T.MistralConfig(**common(intermediate_size=512))
    dense = T.MistralForCausalLM(dense_cfg)
    info = {"dense": train(dense, train_ids, minutes * 60 * 0.35, 2e-3, seed, "dense")}
    info["dense_heldout_ppl"] = heldout_ppl(dense, held_ids)
    cfg = T.MixtralConfig(**common(intermediate_size=512, num_local_experts=8, num_experts_per_tok=2,
                                   output_router_logits=True, router_aux_loss_coef=0.01))
    cfg._experts_implementation = "eager"
    moe = T.MixtralForCausalLM(cfg)
    sd = dense.state_dict()
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name in sd:
                p.copy_(sd[name])
        for i, layer in enumerate(moe.model.layers):
            mlp = dense.model.layers[i].mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            ex = layer.mlp.experts
            for e in range(cfg.num_local_experts):
                ex.gate_up_proj[e].copy_(gate_up + 0.01 * gate_up.std() * torch.randn_like(gate_up))
                ex.down_proj[e].copy_(mlp.down_proj.weight + 0.01 * mlp.down_proj.weight.std()
                                      * torch.randn_like(mlp.down_proj.weight))
            layer.mlp.gate.weight.normal_(0, 0.02)
    info["moe"] = train(moe, train_ids, minutes * 60 * 0.65, 1e-3, seed + 1, "moe")
    return moe, info


def qwen3_moe_fine(train_ids, held_ids, minutes: float, seed: int):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.Qwen3MoeConfig(**common(intermediate_size=512, moe_intermediate_size=128, num_experts=32,
                                    num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
                                    mlp_only_layers=[], output_router_logits=True, router_aux_loss_coef=0.01))
    cfg._experts_implementation = "eager"
    model = T.Qwen3MoeForCausalLM(cfg)
    return model, {"moe": train(model, train_ids, minutes * 60, 2e-3, seed, "qwen3")}


TRAINERS = {"mixtral_upcycled": mixtral_upcycled, "qwen3_moe_fine": qwen3_moe_fine}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", default="all", choices=["all", *TRAINERS])
    ap.add_argument("--minutes", type=float, default=25.0, help="training time budget per fixture")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    train_files, held_files, root = corpus()
    FIXTURES.mkdir(exist_ok=True)
    held_text = b"\n".join(p.read_bytes() for p in held_files)[:HELDOUT_BYTES]
    (FIXTURES / "heldout.txt").write_bytes(held_text)
    train_ids, held_ids = token_stream(train_files), np.frombuffer(held_text, dtype=np.uint8).astype(np.int16)
    for name in (TRAINERS if a.fixture == "all" else [a.fixture]):
        model, info = TRAINERS[name](train_ids, held_ids, a.minutes, a.seed)
        ppl = heldout_ppl(model, held_ids)
        out = FIXTURES / name
        model.config.output_router_logits = False
        model.to(torch.bfloat16).save_pretrained(out)
        write_byte_tokenizer(out, eot=EOT)
        info.update({"fixture": name, "heldout_ppl_fp32": ppl, "uniform_ppl": 256, "threads": torch.get_num_threads(),
                     "train_files": len(train_files), "heldout_files": len(held_files),
                     "train_bytes": int(train_ids.size), "python": os.sys.version.split()[0],
                     "params": sum(p.numel() for p in model.parameters())})
        (out / "train.json").write_text(json.dumps(info, indent=1) + "\n")
        print(f"{name}: held-out perplexity {ppl:.3f} per byte (uniform: 256)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
