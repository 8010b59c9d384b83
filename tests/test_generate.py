"""load_tokenizer, resmoe-generate and README's runtime example, on real tokenizers and the torch runtime."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from converters.convert import ConvertOptions, convert
from converters.example import write_mixtral_checkpoint
from resmoe_format.errors import RmoeRuntimeError
from resmoe_format.torch import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("quiet_warnings")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The README's example (with its byte-level tokenizer), 2 layers, converted as README set-up command 1."""
    d = tmp_path_factory.mktemp("gen")
    write_mixtral_checkpoint(d / "tiny-mixtral", layers=2, inter=64, experts=4, tokenizer=True)
    convert(d / "tiny-mixtral", d / "tiny.rmoe", ConvertOptions(), progress=False)
    return d / "tiny.rmoe"


def test_load_tokenizer_is_the_embedded_tokenizer(tiny):
    from tokenizers import Tokenizer

    tok = load_tokenizer(tiny)
    ref = Tokenizer.from_file(str(tiny.parent / "tiny-mixtral" / "tokenizer.json"))
    text = "def main(argv): return 'ż'\n"
    assert tok(text).input_ids == ref.encode(text).ids
    assert tok.decode(tok(text).input_ids) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 256


def test_load_tokenizer_without_one_is_a_clear_error(tmp_path):
    from resmoe_format.demo import build

    p = build(tmp_path / "d.rmoe", layers=1, experts=2, hidden=8, inter=8)
    with pytest.raises(RmoeRuntimeError, match=r"embeds no tokenizer \(none of tokenizer.json"):
        load_tokenizer(p)


@pytest.mark.parametrize("mode", ["fused", pytest.param("lazy", marks=pytest.mark.slow)])
def test_generate_streams_the_greedy_tokens_and_reports_speed_and_memory(tiny, capsys, mode):
    """resmoe-generate prints the prompt, then the same greedy continuation as the restored model's generate()."""
    from converters.cli.generate import main

    n = 12
    assert main([str(tiny), "def main():", "--mode", mode, "--max-new-tokens", str(n), "--dtype", "fp32"]) == 0
    out, err = capsys.readouterr()
    tok, model = load_tokenizer(tiny), load_model(tiny, mode="materialize", dtype="fp32")
    ids = tok("def main():", return_tensors="pt").input_ids
    with torch.no_grad():
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=256)
    want = tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True)
    assert out == "def main():" + want + "\n"
    m = re.search(r"(\d+) tokens in [\d.]+ s: ([\d.]+) tokens/s \((\w+), (\d+) prompt tokens\); peak RSS ([\d,]+) MiB",
                  err)
    assert m, err
    assert int(m[1]) == seq.shape[1] - ids.shape[1] and float(m[2]) > 0 and m[3] == mode
    assert int(m[4]) == ids.shape[1] and int(m[5].replace(",", "")) > 100


def test_generate_lazy_reports_its_cache(tiny, capsys):
    from converters.cli.generate import main

    assert main([str(tiny), "def", "--mode", "lazy", "--cache-bytes", str(64 << 20), "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    m = re.search(r"lazy cache: hit rate ([\d.]+)% of (\d+) expert uses, (\d+) experts resident "
                  r"\(([\d.]+) of 64\.0 MiB\)", err)
    assert m, err
    assert 0 < float(m[1]) < 100 and int(m[2]) > int(m[3]) > 0
    with pytest.raises(SystemExit):
        main([str(tiny), "def", "--mode", "fused", "--cache-bytes", "100"])  # lazy only


def test_generate_bad_input_is_one_line(tiny, tmp_path, capsys):
    from converters.cli.generate import MODES, main
    from resmoe_format.demo import build
    from resmoe_format.torch import MODES as RUNTIME_MODES

    assert MODES == RUNTIME_MODES  # the command lists them without importing torch

    assert main([str(tiny), "x", "--device", "cuda:7"]) == 2
    assert "resmoe-generate: error: device 'cuda:7'" in capsys.readouterr().err
    p = build(tmp_path / "d.rmoe", layers=1, experts=2, hidden=8, inter=8)
    assert main([str(p), "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resmoe-generate: error:") and "embeds no tokenizer" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main([str(tiny), "x", "--max-new-tokens", "0"])


def test_readme_runtime_example_runs_as_written(tiny, monkeypatch, capsys):
    """The README's python block of 'Running a .rmoe model', verbatim, beside README set-up command 1's tiny.rmoe."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Running a `.rmoe` model"):]
    block = re.search(r"```python\n(.*?)```", section, re.S)[1]
    assert "input_ids = tokenizer(" in block
    monkeypatch.chdir(tiny.parent)
    exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("def main():")
