"""A small Mixtral-format checkpoint to try the converter on, built from a seed.

    python -m converters.example tiny-mixtral/        # then: resmoe-convert tiny-mixtral tiny.rmoe

The experts are *upcycled*: every expert of a layer is the same base MLP with its hidden
neurons shuffled, plus a little noise, which is how Mixtral-style models start life and
where ResMoE's barycenter alignment shines. Tensor names, shapes and config are the
Hugging Face hub's (``transformers`` loads the directory with ``from_pretrained``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


#: Checkpoint styles: config and tensor names of a Mixtral (few large experts) or a Qwen3-MoE
#: (many small, "fine-grained" experts) model.
STYLES = {
    "mixtral": {"arch": "MixtralForCausalLM", "model_type": "mixtral", "block": "block_sparse_moe",
                "names": ("w1", "w3", "w2"), "experts_key": "num_local_experts"},
    "qwen3_moe": {"arch": "Qwen3MoeForCausalLM", "model_type": "qwen3_moe", "block": "mlp",
                  "names": ("gate_proj", "up_proj", "down_proj"), "experts_key": "num_experts"},
}


#: The byte-level tokenizer's end-of-text token: the id after the 256 bytes.
BYTE_EOT = 256


def write_byte_tokenizer(d: str | Path, eot: int = BYTE_EOT) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` in ``d``: a byte-level BPE without merges
    (token i is byte i, in GPT-2's byte-to-unicode alphabet) plus ``<|endoftext|>`` as token ``eot``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    assert tok.token_to_id("<|endoftext|>") == eot
    tok.save(str(Path(d) / "tokenizer.json"))
    (Path(d) / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))


def write_mixtral_checkpoint(d: str | Path, layers: int = 4, hidden: int = 64, inter: int = 192, experts: int = 8,
                             vocab: int = 512, noise: float = 0.2, seed: int = 0, sharded: bool = False,
                             dtype: torch.dtype = torch.bfloat16, style: str = "mixtral",
                             tokenizer: bool = False) -> int:
    """Write the checkpoint (one shard per layer when ``sharded``); returns the bytes of weights.

    ``style="qwen3_moe"`` writes the same kind of model with Qwen3-MoE names and config;
    ``tokenizer`` adds a byte-level tokenizer (:func:`write_byte_tokenizer`, needs ``vocab > 256``)."""
    st = STYLES[style]
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    heads = max(1, hidden // 16)
    cfg = {"architectures": [st["arch"]], "model_type": st["model_type"], "hidden_size": hidden,
           "intermediate_size": inter, "moe_intermediate_size": inter, "num_hidden_layers": layers,
           st["experts_key"]: experts, "decoder_sparse_step": 1, "mlp_only_layers": [],
           "num_experts_per_tok": 2, "num_attention_heads": heads, "num_key_value_heads": heads,
           "head_dim": hidden // heads, "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
           "rope_theta": 1e6, "tie_word_embeddings": False, "hidden_act": "silu",
           "dtype": {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]}
    if tokenizer:
        write_byte_tokenizer(d, eot=BYTE_EOT)
        cfg.update(bos_token_id=BYTE_EOT, eos_token_id=BYTE_EOT)
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    weight_map: dict[str, str] = {}
    total = 0
    pending: dict[str, torch.Tensor] = {}

    def flush(name: str) -> None:
        nonlocal total, pending
        tensors = {k: v.to(dtype).contiguous() for k, v in pending.items()}
        save_file(tensors, d / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(v.numel() * v.element_size() for v in tensors.values())
        pending = {}

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    pending.update({"model.embed_tokens.weight": rand(vocab, hidden, scale=0.02),
                    "lm_head.weight": rand(vocab, hidden, scale=hidden ** -0.5),
                    "model.norm.weight": torch.ones(hidden)})
    if sharded:
        flush("model-embed.safetensors")
    for i in range(layers):
        pre = f"model.layers.{i}"
        for p in ("q", "k", "v", "o"):
            pending[f"{pre}.self_attn.{p}_proj.weight"] = rand(hidden, hidden, scale=hidden ** -0.5)
        pending[f"{pre}.input_layernorm.weight"] = torch.ones(hidden)
        pending[f"{pre}.post_attention_layernorm.weight"] = torch.ones(hidden)
        if style == "qwen3_moe":
            pending[f"{pre}.self_attn.q_norm.weight"] = torch.ones(hidden // heads)
            pending[f"{pre}.self_attn.k_norm.weight"] = torch.ones(hidden // heads)
        pending[f"{pre}.{st['block']}.gate.weight"] = rand(experts, hidden, scale=hidden ** -0.5)
        base = {"w1": rand(inter, hidden, scale=hidden ** -0.5), "w3": rand(inter, hidden, scale=hidden ** -0.5),
                "w2": rand(inter, hidden, scale=inter ** -0.5)}  # w2 kept neuron-first until stored
        for e in range(experts):
            perm = torch.randperm(inter, generator=g)
            for w, b in base.items():
                v = b[perm] * (1 + noise * torch.randn(b.shape, generator=g))
                name = dict(zip(("w1", "w3", "w2"), st["names"]))[w]
                pending[f"{pre}.{st['block']}.experts.{e}.{name}.weight"] = v.T if w == "w2" else v
        if sharded:
            flush(f"model-layer-{i:05d}.safetensors")
    if sharded:
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    else:
        flush("model.safetensors")
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters.example", description=__doc__.splitlines()[0])
    ap.add_argument("outdir", help="directory to write (config.json, model.safetensors, a byte-level tokenizer)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=192)
    ap.add_argument("--sharded", action="store_true", help="one safetensors shard per layer, with an index")
    ap.add_argument("--style", choices=sorted(STYLES), default="mixtral", help="names and config (default mixtral)")
    a = ap.parse_args(argv)
    n = write_mixtral_checkpoint(a.outdir, a.layers, a.hidden, a.intermediate, a.experts, sharded=a.sharded,
                                 style=a.style, tokenizer=True)
    print(f"wrote {a.outdir}: {STYLES[a.style]['arch']}, {a.layers} layers x {a.experts} experts, "
          f"{n / 2**20:.2f} MiB of bf16 weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
