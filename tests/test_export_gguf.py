"""GGUF export, verified in llama.cpp itself (llama-cpp-python) against the torch runtime.

f32: max |logit difference| / max |logit| below 2e-3 on the same token ids. Quantized types:
llama.cpp's perplexity on held-out ids stays within a stated band of the f32 file's.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.convert import ConvertOptions, convert
from converters.errors import ConversionError
from converters.exporters.gguf_export import ARCHS, export_gguf
from converters.exporters.llama_eval import run_llama
from hf_models import build_checkpoint
from resmoe_format.torch import load_model

F32_RTOL = 2e-3
# llama.cpp perplexity of a quantized file relative to the f32 file's (random-weight model, random ids)
PPL_BAND = {"f16": 0.002, "bf16": 0.01, "q8_0": 0.01, "q4_0": 0.05, "q4_k_m": 0.05}
# llama.cpp: qwen3moe renormalises the top-k weights; olmoe and deepseek2 (MLA) need as many key/value heads
# as query heads; deepseek2 without q_lora_rank is read only for V2-Lite's 27 layers
GGUF_ARCHS = {"mixtral": {}, "qwen2_moe": {}, "qwen3_moe": {"norm_topk_prob": True},
              "olmoe": {"num_key_value_heads": 2}, "deepseek_v2": {"num_key_value_heads": 2, "q_lora_rank": 8},
              "deepseek_v3": {"num_key_value_heads": 2},
              # llama.cpp's gpt-oss slides the window on the even layers; a window shorter than the test's 24 ids
              "gpt_oss": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8}}
#: rmoe_file(big=True): rows a whole number of 256-blocks for the k-quants. GPT-OSS routes every token to all 4
#: experts here: with top-2 of 4 this random model flips its expert choice under any 0.4% weight noise (the torch
#: model's logits move by 42% of the largest when its embeddings get 0.4% noise), which no perplexity band survives
BIG = {"gpt_oss": dict(GGUF_ARCHS["gpt_oss"], hidden_size=256, intermediate_size=512, vocab_size=512,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts_per_tok=4)}
_files: dict[tuple, Path] = {}


pytestmark = pytest.mark.usefixtures("quiet_warnings")


def rmoe_file(tmp_path_factory, arch: str, big: bool = False) -> Path:
    """A converted tiny checkpoint; ``big`` makes rows a whole number of 256-blocks (k-quants)."""
    key = (arch, big)
    if key not in _files:
        d = tmp_path_factory.mktemp(f"{arch}_gguf")
        if big and arch == "mixtral":
            from converters.example import write_mixtral_checkpoint

            write_mixtral_checkpoint(d, layers=2, hidden=256, inter=512, experts=4, vocab=512, dtype=torch.float32)
        elif big:
            build_checkpoint(arch, d, "fp32", seed=5, overrides=BIG[arch])
        else:
            build_checkpoint(arch, d, "fp32", seed=5, overrides=GGUF_ARCHS[arch])
        out = d.parent / f"{d.name}.rmoe"
        convert(d, out, ConvertOptions(residual_keep=0.25), progress=False)
        _files[key] = out
    return _files[key]


def _llama_cpp():
    """llama-cpp-python; CI sets RESMOE_REQUIRE_LLAMA=1 so a missing install fails instead of skipping."""
    if os.environ.get("RESMOE_REQUIRE_LLAMA"):
        import llama_cpp

        return llama_cpp
    return pytest.importorskip("llama_cpp")


def llama_tokens(path: Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's tokens of each text (no BOS, specials as text), from a child process (llama_eval)."""
    _llama_cpp()
    return run_llama(path, texts=texts, n_threads=2).tokens


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    _llama_cpp()
    return run_llama(path, [ids], n_ctx=64, n_threads=2).logits[0].astype(np.float64)


def torch_logits(rmoe: Path, ids: list[int]) -> np.ndarray:
    model = load_model(rmoe, mode="materialize", dtype="fp32")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def ids_for(path: Path, n: int = 24, seed: int = 0) -> list[int]:
    import resmoe_format

    with resmoe_format.open(path) as r:
        vocab = r.config()["vocab_size"]
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_f32_gguf_gives_the_torch_logits_in_llama_cpp(tmp_path_factory, tmp_path, arch):
    rmoe = rmoe_file(tmp_path_factory, arch)
    out = export_gguf(rmoe, tmp_path / "m.gguf", "f32")
    ids = ids_for(rmoe)
    want, got = torch_logits(rmoe, ids), llama_logits(out, ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < F32_RTOL, f"{arch}: max relative difference {err:.2e}"


def test_bf16_gpt_oss_gives_the_torch_logits_in_llama_cpp(tmp_path):
    """A bf16 source: the restored bf16 weights, widened to f32, run in llama.cpp as in the torch runtime."""
    d = build_checkpoint("gpt_oss", tmp_path / "src", "bf16", seed=6, overrides=GGUF_ARCHS["gpt_oss"])
    convert(d, tmp_path / "m.rmoe", ConvertOptions(residual_keep=0.25), progress=False)
    out = export_gguf(tmp_path / "m.rmoe", tmp_path / "m.gguf", "f32")
    ids = ids_for(tmp_path / "m.rmoe")
    want, got = torch_logits(tmp_path / "m.rmoe", ids), llama_logits(out, ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < F32_RTOL, f"max relative difference {err:.2e}"


def test_kquant_records_export_to_the_torch_logits(tmp_path_factory, tmp_path):
    """A file whose barycenters and residuals (dense and sparse) hold k-quant values (spec 5.10)."""
    from kquant_files import mixed_plan, requantize

    rmoe = requantize(rmoe_file(tmp_path_factory, "mixtral"), tmp_path / "kq.rmoe", mixed_plan)
    out = export_gguf(rmoe, tmp_path / "m.gguf", "f32")
    ids = ids_for(rmoe)
    want, got = torch_logits(rmoe, ids), llama_logits(out, ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < F32_RTOL, f"max relative difference {err:.2e}"


def perplexity(path: Path, ids: list[int]) -> float:
    logits = llama_logits(path, ids)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return math.exp(-np.mean([logp[i, ids[i + 1]] for i in range(len(ids) - 1)]))


@pytest.mark.parametrize("arch", ["mixtral", pytest.param("gpt_oss", marks=pytest.mark.slow)])
def test_quantized_types_stay_within_their_perplexity_band(tmp_path_factory, tmp_path, arch):
    _llama_cpp()
    rmoe = rmoe_file(tmp_path_factory, arch, big=True)
    held_out = ids_for(rmoe, n=60, seed=7)
    base = perplexity(export_gguf(rmoe, tmp_path / "f32.gguf", "f32"), held_out)
    sizes = {"f32": (tmp_path / "f32.gguf").stat().st_size}
    for t, band in PPL_BAND.items():
        out = export_gguf(rmoe, tmp_path / f"{t}.gguf", t)
        sizes[t] = out.stat().st_size
        ppl = perplexity(out, held_out)
        assert abs(ppl / base - 1) <= band, f"{arch} {t}: perplexity {ppl:.3f} vs f32 {base:.3f}"
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_metadata_carries_provenance_and_stacked_experts(tmp_path_factory, tmp_path):
    import gguf

    rmoe = rmoe_file(tmp_path_factory, "qwen2_moe")
    r = gguf.GGUFReader(export_gguf(rmoe, tmp_path / "m.gguf"))
    keys = {f.name: f for f in r.fields.values()}
    assert "resmoe.method" in keys and "resmoe.method.residual_keep" in keys
    names = {t.name: t for t in r.tensors}
    assert {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_down_exps.weight", "blk.0.ffn_gate_shexp.weight",
            "blk.0.ffn_gate_inp.weight"} <= set(names)
    assert list(names["blk.0.ffn_gate_exps.weight"].shape) == [16, 12, 4]  # GGUF order: hidden, n, experts


def test_placeholder_vocabulary_warns(tmp_path_factory, tmp_path):
    rmoe = rmoe_file(tmp_path_factory, "mixtral")
    with pytest.warns(UserWarning, match="placeholder vocabulary"):
        export_gguf(rmoe, tmp_path / "m.gguf")


@pytest.mark.parametrize("arch", ["mixtral", pytest.param("gpt_oss", marks=pytest.mark.slow)])
def test_embedded_bpe_tokenizer_is_exported(tmp_path, arch):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d = build_checkpoint(arch, tmp_path / "src", "fp32", seed=1, overrides={"vocab_size": 300, **GGUF_ARCHS[arch]})
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["the quick brown fox jumps over the lazy dog " * 20, "def main(argv):\n    return 0\n" * 20]
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    tok.save(str(d / "tokenizer.json"))
    rmoe = tmp_path / "m.rmoe"
    convert(d, rmoe, ConvertOptions(residual_keep=0.25), progress=False)
    out = export_gguf(rmoe, tmp_path / "m.gguf")
    s = "the lazy fox jumps"
    assert llama_tokens(out, [s]) == [tok.encode(s).ids]


def test_unsupported_architecture_and_type_are_clear_errors(tmp_path):
    for arch, why in (("switch", "encoder-decoder"), ("phimoe", "RMSNorm where Phi-MoE has LayerNorm")):
        d = build_checkpoint(arch, tmp_path / arch, "fp32")
        rmoe = tmp_path / f"{arch}.rmoe"
        convert(d, rmoe, ConvertOptions(), progress=False)
        with pytest.raises(ConversionError, match=f"{why}.*supported: " + ", ".join(sorted(ARCHS))):
            export_gguf(rmoe, tmp_path / "x.gguf")
        with pytest.raises(ConversionError, match="GGUF type 'q9_9' is not supported"):
            export_gguf(rmoe, tmp_path / "x.gguf", "q9_9")
    d = build_checkpoint("olmoe", tmp_path / "gqa", "fp32")  # 1 key/value head for 2 query heads
    convert(d, tmp_path / "gqa.rmoe", ConvertOptions(), progress=False)
    with pytest.raises(ConversionError, match="key/value heads"):
        export_gguf(tmp_path / "gqa.rmoe", tmp_path / "x.gguf")
    d = build_checkpoint("gpt_oss", tmp_path / "go", "fp32")  # every layer full attention
    convert(d, tmp_path / "go.rmoe", ConvertOptions(), progress=False)
    with pytest.raises(ConversionError, match="slides the window on the even layers only"):
        export_gguf(tmp_path / "go.rmoe", tmp_path / "x.gguf")
    d = build_checkpoint("deepseek_v2", tmp_path / "lite", "fp32")  # no q_lora_rank, 2 layers
    convert(d, tmp_path / "lite.rmoe", ConvertOptions(), progress=False)
    with pytest.raises(ConversionError, match="q_lora_rank"):
        export_gguf(tmp_path / "lite.rmoe", tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


def test_cli_gguf(tmp_path_factory, tmp_path, capsys):
    from converters.cli.export import main

    rmoe = rmoe_file(tmp_path_factory, "olmoe")
    assert main([str(rmoe), "--to", "gguf", str(tmp_path / "m.gguf"), "--type", "f16"]) == 0
    assert (tmp_path / "m.gguf").stat().st_size > 0
    assert main([str(rmoe), "--to", "gguf", str(tmp_path / "n.gguf"), "--type", "q7"]) == 2
    assert "not supported" in capsys.readouterr().err
    assert not (tmp_path / "n.gguf").exists()


def test_embedded_llama_style_tokenizer_is_exported(tmp_path):
    """A BPE with byte fallback and a Metaspace-style normalizer, as Llama/Mistral/Mixtral ship."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    d = build_checkpoint("mixtral", tmp_path / "src", "fp32", seed=2, overrides={"vocab_size": 320})
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    text = ["the quick brown fox jumps over the lazy dog " * 20, "def main(argv):\n    return 0\n" * 20]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=320, special_tokens=specials))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", '
                                             '"eos_token": "</s>", "unk_token": "<unk>"}')
    rmoe = tmp_path / "m.rmoe"
    convert(d, rmoe, ConvertOptions(residual_keep=0.25), progress=False)
    texts = ["the lazy fox jumps", "def main(argv): ż"]
    assert llama_tokens(export_gguf(rmoe, tmp_path / "m.gguf"), texts) == [tok.encode(s).ids for s in texts]


def test_a_crash_in_llama_cpp_is_a_failure_with_its_cause():
    """llama.cpp runs in a child process: a segfault there is a LlamaRunError naming the signal, with the
    child's last output (faulthandler's stack), and this process carries on."""
    import sys

    from converters.exporters.llama_eval import LlamaRunError, run_child

    crash = ("import ctypes, faulthandler; faulthandler.enable(); print('loading m.gguf', flush=True); "
             "ctypes.string_at(0)")
    with pytest.raises(LlamaRunError, match=r"(?s)llama.cpp crashed with SIGSEGV on m.gguf:\n.*loading m.gguf"
                                            r".*Segmentation fault"):
        run_child([sys.executable, "-c", crash], "on m.gguf")
    with pytest.raises(LlamaRunError, match=r"(?s)failed \(exit status 3\) on m.gguf:\nbad file"):
        run_child([sys.executable, "-c", "import sys; print('bad file'); sys.exit(3)"], "on m.gguf")
    run_child([sys.executable, "-c", "pass"], "on m.gguf")


def test_llama_cpp_failure_on_a_bad_file_is_reported(tmp_path):
    from converters.exporters.llama_eval import LlamaRunError

    _llama_cpp()
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(LlamaRunError, match=r"failed \(exit status 1\) on bad.gguf:\n(?s:.*)Error"):
        run_llama(tmp_path / "bad.gguf", [[1, 2, 3]])
