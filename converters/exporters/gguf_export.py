"""``resmoe-export FILE --to gguf OUT.gguf``: restored experts as llama.cpp's stacked expert tensors.

One registered class per architecture (as llama.cpp's ``convert_hf_to_gguf.py`` does) maps the
embedded ``config.json`` to GGUF hyperparameters and fixes tensor layouts where llama.cpp wants
them different from transformers. Expert tensors are restored layer by layer from the
``.rmoe`` file (original neuron order) and written as ``blk.N.ffn_{gate,up,down}_exps``; every
other tensor is renamed with the ``gguf`` package's own HF-to-GGUF name map.

Types: ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1`` are written by
the ``gguf`` package's quantizer; the k-quants (``q2_k``, ``q3_k_m``, ``q4_k_m``, ...) are made by
llama.cpp's own quantizer (``llama_model_quantize`` from llama-cpp-python) from an f32 file.
"""
from __future__ import annotations

import ctypes
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np

import resmoe_format
from resmoe_format import restore
from resmoe_format.architectures import (BY_MODEL_TYPE, DEEPSEEK_V2, DEEPSEEK_V3, GPT_OSS, MIXTRAL, OLMOE, QWEN2_MOE,
                                         QWEN3_MOE, Family, check_layers)
from resmoe_format.publish import atomic_path, scratch_path

from ..errors import ConversionError

#: Types the gguf package writes itself (GGML type names).
DIRECT_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
                "q5_0": "Q5_0", "q5_1": "Q5_1"}
#: Types made by llama.cpp's quantizer: name -> llama_ftype constant name.
LLAMA_TYPES = {"q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K", "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
               "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
               "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
               "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
               "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
TYPES = tuple(DIRECT_TYPES) + tuple(LLAMA_TYPES)

#: transformers model_type -> exporter class
ARCHS: dict[str, type["GgufArch"]] = {}


def register(*families: Family) -> Callable[[type["GgufArch"]], type["GgufArch"]]:
    """Class decorator: the GGUF exporter of these architecture records (their ``gguf`` names one
    llama.cpp architecture)."""
    def deco(cls: type[GgufArch]) -> type[GgufArch]:
        archs = {f.gguf for f in families}
        if len(archs) != 1 or None in archs:
            raise ValueError(f"{cls.__name__}: records {[f.name for f in families]} name GGUF architectures {archs}")
        cls.arch = archs.pop().upper().replace("-", "_")
        for f in families:
            ARCHS.update(dict.fromkeys(f.model_types, cls))
        return cls
    return deco


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConversionError("GGUF export needs the gguf package: pip install 'resmoe[export]'") from None
    return gguf


class GgufArch:
    """How one transformers architecture becomes a llama.cpp GGUF."""

    arch: ClassVar[str]  # gguf.MODEL_ARCH member name: the record's ``gguf``, upper case, - as _ (set by register)
    #: whether llama.cpp's architecture always (True) or never (False) renormalises the top-k
    #: routing weights; None where it follows the file's metadata or the config has no such flag
    renormalises_top_k: ClassVar[bool | None] = None

    def __init__(self, config: dict[str, Any]):
        self.cfg = config
        self.family = BY_MODEL_TYPE[config["model_type"]]
        gguf = _gguf()
        self.gguf = gguf
        self.model_arch = getattr(gguf.MODEL_ARCH, self.arch)
        self.name_map = gguf.get_tensor_name_map(self.model_arch, self.num_layers)

    @property
    def num_layers(self) -> int:
        return self.cfg["num_hidden_layers"]

    @property
    def head_dim(self) -> int:
        return self.cfg.get("head_dim") or self.cfg["hidden_size"] // self.cfg["num_attention_heads"]

    def kv_heads(self) -> int:
        return self.cfg.get("num_key_value_heads", self.cfg["num_attention_heads"])

    def rope_dimensions(self) -> int:
        return self.head_dim

    def rope_theta(self) -> float:
        rp = self.cfg.get("rope_parameters") or {}
        return float(rp.get("rope_theta", self.cfg.get("rope_theta", 10000.0)))

    def check(self) -> None:
        """Refuse configurations llama.cpp would run differently from transformers."""
        rp = self.cfg.get("rope_parameters") or self.cfg.get("rope_scaling") or {}
        if rp.get("rope_type", rp.get("type", "default")) not in ("default", None):
            raise ConversionError(f"rope scaling {rp.get('rope_type', rp.get('type'))!r} is not exported to GGUF")
        norm = bool(self.cfg.get("norm_topk_prob", False))
        if self.renormalises_top_k is not None and norm != self.renormalises_top_k:
            raise ConversionError(f"{self.cfg.get('model_type')} with norm_topk_prob={str(norm).lower()}: llama.cpp's "
                                  f"{self.arch.lower()} {'always' if self.renormalises_top_k else 'never'} "
                                  "renormalises the top-k routing weights")

    def metadata(self, w) -> None:
        c = self.cfg
        w.add_context_length(c.get("max_position_embeddings", 4096))
        w.add_embedding_length(c["hidden_size"])
        w.add_block_count(self.num_layers)
        w.add_feed_forward_length(c.get("intermediate_size", 0))
        w.add_head_count(c["num_attention_heads"])
        w.add_head_count_kv(self.kv_heads())
        w.add_rope_freq_base(self.rope_theta())
        w.add_rope_dimension_count(self.rope_dimensions())
        w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
        w.add_expert_count(self.num_experts)
        w.add_expert_used_count(c["num_experts_per_tok"])
        w.add_vocab_size(c["vocab_size"])

    @property
    def num_experts(self) -> int:
        return self.family.num_experts(self.cfg)

    def tensor_name(self, hf: str) -> str | None:
        return self.name_map.get_name(hf, try_suffixes=(".weight", ".bias"))

    def tensors(self, hf: str, a: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """The GGUF tensors one (non-expert) checkpoint tensor becomes: renamed, and reshaped
        or split where llama.cpp wants another layout."""
        g = self.tensor_name(hf)
        if g is None:
            raise ConversionError(f"tensor {hf}: no llama.cpp name for it in GGUF architecture {self.arch.lower()}")
        yield g, self.transform(g, a)

    def transform(self, gguf_name: str, a: np.ndarray) -> np.ndarray:
        return a


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (``convert_hf_to_gguf.LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@register(MIXTRAL)
class MixtralGguf(GgufArch):
    """Mixtral is a llama-architecture GGUF with experts (as llama.cpp converts it)."""

    def transform(self, gguf_name, a):
        if gguf_name.endswith("attn_q.weight"):
            return _permute_qk(a, self.cfg["num_attention_heads"])
        if gguf_name.endswith("attn_k.weight"):
            return _permute_qk(a, self.kv_heads())
        return a


@register(QWEN2_MOE)
class Qwen2MoeGguf(GgufArch):
    renormalises_top_k = False

    def metadata(self, w):
        super().metadata(w)
        w.add_expert_feed_forward_length(self.cfg["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(self.cfg["shared_expert_intermediate_size"])


@register(QWEN3_MOE)
class Qwen3MoeGguf(GgufArch):
    renormalises_top_k = True

    def metadata(self, w):
        super().metadata(w)
        w.add_expert_feed_forward_length(self.cfg["moe_intermediate_size"])
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)


@register(OLMOE)
class OlmoeGguf(GgufArch):
    renormalises_top_k = False

    def check(self):
        super().check()
        kv = self.kv_heads()
        if kv != self.cfg["num_attention_heads"]:
            raise ConversionError(f"olmoe with {kv} key/value heads for {self.cfg['num_attention_heads']} query heads: "
                                  "llama.cpp's olmoe normalises k over the full width and needs them equal")


@register(DEEPSEEK_V2, DEEPSEEK_V3)
class DeepseekGguf(GgufArch):
    """llama.cpp's ``deepseek2`` (V2 and V3): multi-head latent attention written as MQA with
    ``kv_b_proj`` split into ``k_b`` (transposed) and ``v_b``, as ``convert_hf_to_gguf.py`` does."""

    def check(self):
        super().check()
        if (self.cfg.get("n_group") or 1) > 1:
            raise ConversionError("deepseek with grouped routing (n_group > 1) is not exported to GGUF yet")
        if not self.cfg.get("q_lora_rank") and self.num_layers != 27:
            raise ConversionError("deepseek without q_lora_rank: llama.cpp reads that layout only for "
                                  "DeepSeek-V2-Lite's 27 layers")

    def metadata(self, w):
        c = self.cfg
        super().metadata(w)
        gguf = self.gguf
        w.add_leading_dense_block_count(c.get("first_k_dense_replace", 0))
        if c.get("q_lora_rank"):
            w.add_q_lora_rank(c["q_lora_rank"])
        w.add_kv_lora_rank(c["kv_lora_rank"])
        w.add_key_length(c["kv_lora_rank"] + c["qk_rope_head_dim"])
        w.add_value_length(c["kv_lora_rank"])
        w.add_key_length_mla(c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
        w.add_value_length_mla(c["v_head_dim"])
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
        w.add_expert_shared_count(c.get("n_shared_experts") or 0)
        w.add_expert_weights_scale(float(c.get("routed_scaling_factor", 1.0)))
        w.add_expert_weights_norm(bool(c.get("norm_topk_prob", False)))
        sigmoid = c.get("scoring_func", "softmax" if c.get("model_type") == "deepseek_v2" else "sigmoid") == "sigmoid"
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)

    def kv_heads(self) -> int:
        return 1  # MLA runs as MQA in llama.cpp

    def rope_dimensions(self) -> int:
        return self.cfg["qk_rope_head_dim"]

    def tensors(self, hf, a):
        if hf.endswith("e_score_correction_bias"):
            hf = hf.replace("e_score_correction_bias", "e_score_correction.bias")
        if hf.endswith("kv_b_proj.weight"):
            c = self.cfg
            nope, v = c["qk_nope_head_dim"], c["v_head_dim"]
            kv_b = a.reshape(c["num_attention_heads"], nope + v, a.shape[-1])
            yield from super().tensors(hf.replace("kv_b_proj", "k_b_proj"),
                                       np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1)))
            yield from super().tensors(hf.replace("kv_b_proj", "v_b_proj"), np.ascontiguousarray(kv_b[:, nope:]))
            return
        yield from super().tensors(hf, a)


@register(GPT_OSS)
class GptOssGguf(GgufArch):
    """llama.cpp's ``gpt-oss``: expert biases, attention sinks, sliding-window attention on the even
    layers (llama.cpp's fixed pattern), YaRN rope scaling; gate and up restored apart."""

    def check(self):
        rp = self.cfg.get("rope_parameters") or self.cfg.get("rope_scaling") or {}
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind not in ("yarn", "default", None):
            raise ConversionError(f"gpt_oss with rope scaling {kind!r}: llama.cpp's gpt-oss runs yarn or none")
        want = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_layers)]
        if (self.cfg.get("layer_types") or want) != want:
            raise ConversionError("gpt_oss with layer_types other than sliding and full attention alternating from "
                                  "layer 0: llama.cpp's gpt-oss slides the window on the even layers only")

    def metadata(self, w):
        c = self.cfg
        super().metadata(w)
        w.add_expert_feed_forward_length(c["intermediate_size"])
        w.add_sliding_window(c["sliding_window"])
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)
        rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rp.get("rope_type", rp.get("type")) == "yarn":
            w.add_rope_scaling_type(self.gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rp["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rp.get("original_max_position_embeddings", 4096)))

    def tensors(self, hf, a):
        if hf.endswith(".sinks"):
            hf += ".weight"  # llama.cpp's blk.N.attn_sinks.weight
        yield from super().tensors(hf, a)


def arch_for(config: dict[str, Any], layers=()) -> GgufArch:
    """The GGUF architecture of a config (ConversionError listing the supported ones, with the
    record's reason), once ``layers`` (the file's) are known to follow its layout rules."""
    t = config.get("model_type")
    if t not in ARCHS:
        fam = BY_MODEL_TYPE.get(t) if isinstance(t, str) else None
        why = f" ({fam.gguf_reason})" if fam is not None and fam.gguf_reason else ""
        raise ConversionError(f"GGUF export does not support model_type {t!r}{why}; "
                              f"supported: {', '.join(sorted(ARCHS))}")
    a = ARCHS[t](config)
    a.check()
    check_layers(a.family, layers, ConversionError)
    return a


# --- tokenizer ----------------------------------------------------------------------------

def add_tokenizer(w, files: dict[str, bytes], cfg: dict[str, Any], vocab_size: int) -> None:
    """The embedded tokenizer.json as llama.cpp reads it, else a placeholder vocabulary.

    A BPE with byte fallback (Llama, Mistral, Mixtral) becomes a ``llama`` (SentencePiece-style)
    vocabulary through the gguf package's ``LlamaHfVocab``; a byte-level BPE (GPT-2 style)
    becomes a ``gpt2`` vocabulary with its merges.
    """
    gguf = _gguf()
    raw = files.get("tokenizer.json")
    tok = json.loads(raw.decode("utf-8")) if raw else None
    model = (tok or {}).get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        _add_llama_vocab(w, files, vocab_size)
    elif model.get("type") == "BPE":
        model = tok["model"]
        vocab = dict(model["vocab"])
        for t in tok.get("added_tokens", []):
            vocab[t["content"]] = t["id"]
        if len(set(vocab.values())) != len(vocab) or max(vocab.values(), default=-1) >= vocab_size:
            raise ConversionError(f"tokenizer.json: token ids do not fit the model's vocabulary of {vocab_size}")
        tokens = [f"[PAD{i}]" for i in range(vocab_size)]
        types = [gguf.TokenType.UNUSED] * vocab_size
        special = {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}
        for s, i in vocab.items():
            tokens[i] = s
            types[i] = gguf.TokenType.CONTROL if s in special else gguf.TokenType.NORMAL
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        # llama.cpp refuses a gpt2 vocabulary without merges and GGUF cannot hold an empty array; a
        # pure byte-level BPE gets one merge that can never apply (its left side is never a symbol)
        w.add_token_merges(merges or [f"{tokens[-1]}{tokens[-1]} {tokens[-1]}"])
    else:
        warnings.warn("no byte-level BPE tokenizer.json embedded: writing a placeholder vocabulary "
                      f"({vocab_size} tokens); drive the model by token ids", stacklevel=3)
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
        tokens = tokens[:vocab_size] + [f"<unused{i}>" for i in range(max(0, vocab_size - len(tokens)))]
        types = types[:vocab_size] + [gguf.TokenType.UNUSED] * max(0, vocab_size - len(types))
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * vocab_size)
        w.add_token_types(types)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        v = cfg.get(key)
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int) and 0 <= v < vocab_size:
            add(v)


def _add_llama_vocab(w, files: dict[str, bytes], vocab_size: int) -> None:
    gguf = _gguf()
    from gguf.vocab import LlamaHfVocab

    with tempfile.TemporaryDirectory() as d:
        for rel, data in files.items():
            if "/" not in rel and rel.startswith(("tokenizer", "special_tokens", "config")):
                (Path(d) / rel).write_bytes(data)
        try:
            vocab = LlamaHfVocab(Path(d))
        except (FileNotFoundError, TypeError, ValueError, OSError) as e:
            raise ConversionError(f"embedded tokenizer.json: not a Llama-style BPE tokenizer ({e})") from None
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(ttype)
    if len(tokens) > vocab_size:
        raise ConversionError(f"tokenizer.json has {len(tokens)} tokens, more than the model's {vocab_size}")
    pad = vocab_size - len(tokens)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens + [f"[PAD{i}]".encode() for i in range(pad)])
    w.add_token_scores(scores + [-1000.0] * pad)
    w.add_token_types(types + [gguf.TokenType.UNUSED] * pad)


# --- tensors ------------------------------------------------------------------------------

def _expert_tensors(reader, arch: GgufArch) -> Iterator[tuple[str, np.ndarray]]:
    """Stacked expert tensors of every compressed layer, restored in original neuron order."""
    for lay in reader.layers:
        experts = [restore.restore_expert(reader, lay.index, k, original_order=True) for k in range(lay.num_experts)]
        gate, up, down = arch.family.matrices
        i = lay.index
        yield f"blk.{i}.ffn_gate_exps.weight", np.stack([e[gate] for e in experts])
        yield f"blk.{i}.ffn_up_exps.weight", np.stack([e[up] for e in experts])
        yield f"blk.{i}.ffn_down_exps.weight", np.stack([e[down].T for e in experts])  # (E, hidden, n)
        for role, bias in zip(("gate", "up", "down"), arch.family.biases):  # (E, n) and (E, hidden)
            if bias in experts[0]:
                yield f"blk.{i}.ffn_{role}_exps.bias", np.stack([e[bias] for e in experts])
        del experts
        reader.release()


def _passthrough_tensors(reader, arch: GgufArch) -> Iterator[tuple[str, np.ndarray]]:
    """Non-expert tensors renamed for llama.cpp; experts of uncompressed layers stacked as stored
    (the record's per-expert tensors: down as (hidden, n), which is llama.cpp's layout)."""
    loose: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, t in reader.passthrough_tensors():
        m = arch.family.match_expert_tensor(name)
        if m is not None:
            i, k, rule = m
            loose.setdefault((i, rule.parts[0]), {})[k] = t
            continue
        yield from arch.tensors(name, np.asarray(t))
    for (i, role), by_k in sorted(loose.items()):
        mats = [by_k[k] for k in sorted(by_k)]
        yield f"blk.{i}.ffn_{role}_exps.weight", np.stack(mats)


def _tensor_type(gguf, name: str, a: np.ndarray, qtype: str):
    """(array to write, GGML type) for one tensor at ``qtype``: norms, biases, routers stay f32."""
    t = gguf.GGMLQuantizationType
    a = np.asarray(a)
    if a.dtype != np.float32:
        a = a.astype(np.float32)
    small = a.ndim < 2 or name.endswith(("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", ".bias")) or "norm" in name
    if qtype == "f32" or small:
        return np.ascontiguousarray(a), t.F32
    gt = getattr(t, DIRECT_TYPES[qtype])
    if qtype in ("f16", "bf16"):
        return gguf.quants.quantize(a, gt), gt
    block = gguf.GGML_QUANT_SIZES[gt][0]
    if a.shape[-1] % block:
        return gguf.quants.quantize(a, t.F16), t.F16  # rows not a whole number of blocks
    return gguf.quants.quantize(a, gt), gt


def export_gguf(src: str | os.PathLike, out: str | os.PathLike, qtype: str = "f32", progress: bool = False,
                ignore_ce: bool = False) -> Path:
    """Write ``src`` (.rmoe) as a llama.cpp GGUF at ``out`` with tensors of type ``qtype``. A file with compressed
    experts (spec 4.5) is refused (llama.cpp has no such operation) unless ``ignore_ce``: then the full top-k
    model is written."""
    qtype = qtype.lower()
    if qtype not in TYPES:
        raise ConversionError(f"GGUF type {qtype!r} is not supported; supported: {', '.join(TYPES)}")
    out = Path(out)
    if not out.parent.is_dir():
        raise ConversionError(f"output directory {out.parent} does not exist")
    with resmoe_format.open(src) as reader:
        if not ignore_ce:
            from resmoe_format.compressed_experts import refuse_ce

            refuse_ce(reader, "llama.cpp's GGUF", ConversionError)
        cfg = reader.config()
        if cfg is None:
            raise ConversionError(f"{src} embeds no config.json: GGUF export needs the model's hyperparameters")
        arch = arch_for(cfg, reader.layers)
        direct = "f32" if qtype in LLAMA_TYPES else qtype
        with atomic_path(out) as final:
            if qtype in LLAMA_TYPES:
                with scratch_path(out) as tmp:  # f32 GGUF for llama.cpp's quantizer
                    _write(reader, arch, cfg, tmp, direct, qtype, src)
                    llama_quantize(tmp, final, qtype)
            else:
                _write(reader, arch, cfg, final, direct, qtype, src)
    return out


def _write(reader, arch: GgufArch, cfg: dict, path: Path, direct: str, qtype: str, src) -> None:
    gguf = _gguf()
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch.model_arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(reader.model.get("architecture", "model"))
    arch.metadata(w)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                     "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1}[direct])
    add_tokenizer(w, reader.files, cfg, cfg["vocab_size"])
    method = reader.schema.method or {}
    w.add_string("resmoe.source", Path(src).name)
    w.add_string("resmoe.method", json.dumps(method, sort_keys=True))
    w.add_string("resmoe.format_version", ".".join(map(str, reader.version)))
    w.add_string("resmoe.type", qtype)
    for key in ("name", "keep", "residual_keep", "residual"):
        if method.get(key) is not None:
            w.add_string(f"resmoe.method.{key}", str(method[key]))
    seen: set[str] = set()
    tensors = []
    for name, a in list(_passthrough_tensors(reader, arch)) + list(_expert_tensors(reader, arch)):
        if name in seen:
            raise ConversionError(f"two source tensors map to GGUF tensor {name}")
        seen.add(name)
        data, gt = _tensor_type(gguf, name, a, direct)
        tensors.append(name)
        w.add_tensor(name, data, raw_dtype=gt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_quantize(src: Path, dst: Path, qtype: str) -> None:
    """Quantize an f32 GGUF with llama.cpp's own quantizer (llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        raise ConversionError(f"GGUF type {qtype} needs llama.cpp's quantizer: pip install llama-cpp-python") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_TYPES[qtype])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ConversionError(f"llama.cpp could not quantize to {qtype} (llama_model_quantize returned {rc})")
