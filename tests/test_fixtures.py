"""The trained evaluation fixtures (benchmarks/train_fixtures.py) as shipped in the repository."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.convert import ConvertOptions, convert

FIXTURES = Path(__file__).resolve().parent.parent / "benchmarks" / "fixtures"
NAMES = ("mixtral_upcycled", "qwen3_moe_fine")
pytestmark = pytest.mark.usefixtures("quiet_warnings")


def heldout(n: int) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer((FIXTURES / "heldout.txt").read_bytes()[:n], dtype=np.uint8).astype(np.int64))


def ppl(model, ids: torch.Tensor, window: int = 256) -> float:
    nll = 0.0
    with torch.no_grad():
        for i in range(0, ids.numel() - 1, window):
            x = ids[i:i + window + 1][None]
            logits = model(input_ids=x[:, :-1]).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
    return math.exp(nll / (ids.numel() - 1))


@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_trained_and_small(name):
    import transformers

    d = FIXTURES / name
    assert (d / "model.safetensors").stat().st_size <= 25 * 2**20
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    p = ppl(model, heldout(2049))
    recorded = json.loads((d / "train.json").read_text())["heldout_ppl_fp32"]
    assert p < 256 / 10, f"held-out perplexity {p:.2f} per byte is not far below uniform (256)"
    assert recorded < 256 / 10


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_is_byte_level(name):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(FIXTURES / name / "tokenizer.json"))
    text = "def f(x):\n    return x  # ż\n"
    assert tok.encode(text).ids == list(text.encode())
    assert tok.decode(list(text.encode())) == text


def test_resmoe_beats_pruning_on_the_upcycled_fixture(tmp_path):
    # the first MoE layer alone: the claim holds per layer, and a layer is a third of the conversion time
    reports = {m: convert(FIXTURES / "mixtral_upcycled", tmp_path / f"{m}.rmoe",
                          ConvertOptions(method=m, keep=0.25, layers="0"), progress=False)["summary"]
               for m in ("resmoe", "prune")}
    err = {m: r["rel_error_mean"] for m, r in reports.items()}
    assert err["resmoe"] < err["prune"], err


def test_fixture_exports_to_gguf_with_its_byte_tokenizer(tmp_path):
    from converters.exporters.gguf_export import export_gguf
    from test_export_gguf import llama_tokens

    rmoe = tmp_path / "q.rmoe"
    # the tokenizer is the point: prune is the fastest conversion
    convert(FIXTURES / "qwen3_moe_fine", rmoe, ConvertOptions(method="prune", keep=0.5), progress=False)
    text = "import os\n\ndef main():  # ż\n"
    assert llama_tokens(export_gguf(rmoe, tmp_path / "q.gguf", "q8_0"), [text]) == [list(text.encode())]


def test_ce_training_text_is_from_training_files_only():
    """benchmarks/ce_text.py: the text is whole training files (never a held-out one), deterministic for a seed,
    valid UTF-8 of the size asked, and shares (almost) no 64-byte piece with heldout.txt."""
    import sys

    sys.path.insert(0, str(FIXTURES.parent))
    from ce_text import overlap, training_text
    from train_fixtures import corpus

    train, held, _ = corpus()
    text = training_text(200_000, seed=1)
    assert len(text) == 200_000 and text == training_text(200_000, seed=1) and text != training_text(200_000, seed=2)
    text.decode("utf-8")
    held_bytes = [p.read_bytes() for p in held]
    big = [h for h in held_bytes if len(h) > 4096]
    assert not any(h[1024:2048] in text for h in big)  # no held-out file's content
    trained = [p.read_bytes() for p in train]
    first = text[:4096]
    assert any(t.startswith(first[:min(len(first), len(t))]) for t in trained)  # starts with a training file
    hit, n = overlap(text, (FIXTURES / "heldout.txt").read_bytes())
    assert n == len(range(0, len(text) - 64, 64)) and hit <= n // 1000
