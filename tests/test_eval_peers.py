"""benchmarks/peers.py: HQQ and GPTQ on the expert weights only, with their stored bytes."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import peers  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet_warnings")
FIXTURE = Path(__file__).resolve().parent.parent / "benchmarks" / "fixtures" / "mixtral_upcycled"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Mixtral with 4 experts whose matrices are multiples of the group size, saved in float32."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny")
    T.MixtralForCausalLM(cfg).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # llm-compressor wants a processor; ids are given
        (path / f).write_bytes((FIXTURE / f).read_bytes())
    return path


def load(path):
    import transformers as T

    return T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def rel_errors(model, original) -> list[float]:
    return [float((a - b).norm() / b.norm())
            for (*_, a), (*_, b) in zip(peers.expert_matrices(model), peers.expert_matrices(original))]


def others_unchanged(model, original) -> bool:
    ref = dict(original.named_parameters())
    return all(torch.equal(p, ref[n]) for n, p in model.named_parameters() if ".experts." not in n)


def test_expert_matrices_are_views_of_every_expert_projection(tiny):
    m = load(tiny)
    mats = list(peers.expert_matrices(m))
    assert len(mats) == 2 * 4 * 3 and peers.expert_weight_count(m) == 2 * 4 * 3 * 64 * 128
    assert {(tuple(w.shape), p) for *_, p, w in mats} == {((128, 64), "gate"), ((128, 64), "up"), ((64, 128), "down")}
    i, e, proj, w = mats[4]
    w.zero_()
    assert (i, e, proj) == (0, 1, "up") and not m.model.layers[0].mlp.experts.gate_up_proj[1, 128:].any()


def test_hqq_counts_packed_codes_and_fp16_scales_and_zeros(tiny):
    pytest.importorskip("hqq")
    original = load(tiny)
    n = peers.expert_weight_count(original)
    m = load(tiny)
    assert 8 * peers.hqq(m, 4) / n == 4 + 2 * 16 / 64  # 4-bit codes, fp16 scale and zero per 64 weights
    assert max(rel_errors(m, original)) < 0.15 and others_unchanged(m, original)
    m = load(tiny)
    bits = 8 * peers.hqq(m, 2) / n
    assert bits == 2.5 and 0.3 < np.mean(rel_errors(m, original)) < 0.6


@pytest.mark.slow
def test_gptq_quantizes_only_experts_and_counts_pack_quantized_bytes(tiny):
    pytest.importorskip("llmcompressor")
    original = load(tiny)
    n = peers.expert_weight_count(original)
    ids = np.random.default_rng(0).integers(0, 64, 16 * 32)
    m, nbytes = peers.gptq(tiny, 4, ids, 32)
    # per weight: 4-bit code, a fp16 scale and a packed 4-bit zero point per 64; 8 bytes of shape per matrix
    assert nbytes == n // 2 + n // 64 * 2 + n // 64 // 2 + 24 * 2 * 8
    assert max(rel_errors(m, original)) < 0.15 and others_unchanged(m, original)
    for *_, w in peers.expert_matrices(m):  # 16 levels per group of 64
        assert all(len(torch.unique(g)) <= 16 for g in w.reshape(-1, 64))
