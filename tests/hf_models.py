"""Tiny real-format MoE checkpoints built with transformers (``save_pretrained`` writes the
hub's tensor names and layout); nothing is downloaded."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from resmoe_format.torch.tensors import TORCH_DTYPES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "phimoe", "switch", "gpt_oss")
DTYPES = TORCH_DTYPES


#: the characters of :func:`tokenizer_json` (ids 3 to 57 of the tiny models' vocabulary of 64)
CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,\n"


def tokenizer_json() -> str:
    """A character-level tokenizer.json for the tiny checkpoints (what --calibration tokenizes with)."""
    from tokenizers import Tokenizer, models

    vocab = {"[UNK]": 0, **{c: i + 3 for i, c in enumerate(CHARS)}}
    return Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]")).to_str()


def _small(layers: int) -> dict:
    return dict(vocab_size=64, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(arch: str, layers: int, experts: int):
    import transformers as T

    small = _small(layers)
    if arch == "mixtral":
        return T.MixtralConfig(**small, intermediate_size=24, num_local_experts=experts, num_experts_per_tok=2)
    if arch == "phimoe":
        return T.PhimoeConfig(**small, intermediate_size=24, num_local_experts=experts, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(**small, intermediate_size=24, moe_intermediate_size=12,
                                shared_expert_intermediate_size=20, num_experts=experts, num_experts_per_tok=2)
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(**small, intermediate_size=24, moe_intermediate_size=12, num_experts=experts,
                                num_experts_per_tok=2, head_dim=8)
    if arch == "olmoe":
        return T.OlmoeConfig(**small, intermediate_size=24, num_experts=experts, num_experts_per_tok=2)
    if arch in ("deepseek_v2", "deepseek_v3"):
        cls = T.DeepseekV2Config if arch == "deepseek_v2" else T.DeepseekV3Config
        return cls(**small, intermediate_size=24, moe_intermediate_size=12, n_routed_experts=experts,
                   n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=8,
                   q_lora_rank=None if arch == "deepseek_v2" else 8, qk_rope_head_dim=4, qk_nope_head_dim=4,
                   v_head_dim=8, n_group=1, topk_group=1)
    if arch == "gpt_oss":
        return T.GptOssConfig(**small, intermediate_size=24, num_local_experts=experts, num_experts_per_tok=2,
                              head_dim=8, layer_types=["full_attention"] * layers)
    if arch == "switch":
        return T.SwitchTransformersConfig(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=layers,
                                          num_decoder_layers=layers, num_heads=2, num_experts=experts,
                                          encoder_sparse_step=2, decoder_sparse_step=2, pad_token_id=0,
                                          eos_token_id=1, decoder_start_token_id=0)
    raise ValueError(arch)


def _model_class(arch: str):
    import transformers as T

    return T.SwitchTransformersForConditionalGeneration if arch == "switch" else T.AutoModelForCausalLM


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _save(model, out_dir: Path, dtype: str, seed: int, shard_size: str | None) -> Path:
    """Perturb every floating weight with seeded noise (transformers initialises biases and
    norms to 0 or 1), cast to ``dtype`` and ``save_pretrained``."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model = model.to(DTYPES[dtype])
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out_dir, **kw)
    return Path(out_dir)


def build_checkpoint(arch: str, out_dir: Path, dtype: str = "fp32", seed: int = 0, num_layers: int = 2,
                     num_experts: int = 4, shard_size: str | None = None, overrides: dict | None = None) -> Path:
    """Save a tiny randomly initialised ``arch`` model in ``dtype``; returns ``out_dir``.

    ``num_layers`` decoder layers (Switch: blocks per stack, sparse every other block, so the
    odd blocks of encoder and decoder are MoE layers); DeepSeek's first layer is dense and
    Qwen2-MoE has a shared expert. ``shard_size`` (e.g. "20KB") gives a sharded checkpoint;
    ``overrides`` sets config attributes (e.g. ``{"mlp_only_layers": [0]}``). Every floating
    weight is perturbed with seeded noise so no tensor is trivially 0 or 1.
    """
    _quiet()
    torch.manual_seed(seed)
    cfg = _config(arch, num_layers, num_experts)
    for k, v in (overrides or {}).items():
        setattr(cfg, k, v)
    cls = _model_class(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_config(cfg) if cls.__name__.startswith("Auto") else cls(cfg)
    return _save(model, out_dir, dtype, seed, shard_size)


def build_dense_checkpoint(out_dir: Path, dtype: str = "fp32", seed: int = 0, shard_size: str | None = None) -> Path:
    """A tiny dense ``LlamaForCausalLM`` (no experts), for the not-an-MoE error paths."""
    import transformers as T

    _quiet()
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(**_small(2), intermediate_size=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = T.LlamaForCausalLM(cfg)
    return _save(model, out_dir, dtype, seed, shard_size)


def load_model(path: Path):
    """The transformers model saved at ``path`` (float32, eval mode; Switch or a causal LM)."""
    import json

    _quiet()
    arch = json.loads((Path(path) / "config.json").read_text())["model_type"]
    cls = _model_class("switch" if arch == "switch_transformers" else arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(path, dtype=torch.float32).eval()
