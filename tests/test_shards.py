"""Sharded .rmoe files (spec section 11): --max-shard-size, the index, and every reader entry point."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import resmoe_format
from converters.cli.convert import main as convert_main
from converters.cli.inspect import main as inspect_main
from converters.convert import ConvertOptions, check_shard_inputs, convert
from converters.errors import ConversionError
from converters.example import write_mixtral_checkpoint
from converters.paths import PathError
from converters.restore_checkpoint import restore_checkpoint
from resmoe_format import accounting, publish
from resmoe_format.errors import RmoeFormatError
from resmoe_format.shards import ShardedReader, index_path, parse_size, shard_path

LIMIT = "60KB"  # the example's passthrough (about 42 KB) in one shard, then one layer (50 KB) per shard


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("shards")
    write_mixtral_checkpoint(d / "src", layers=2, hidden=32, inter=256, experts=4, vocab=128)  # spec 11.8's
    convert(d / "src", d / "one.rmoe", ConvertOptions(), progress=False)
    report = convert(d / "src", d / "ex.rmoe", ConvertOptions(max_shard_size=LIMIT), progress=False)
    return {"dir": d, "src": d / "src", "one": d / "one.rmoe", "index": index_path(d / "ex.rmoe"), "report": report}


def shards_of(index: Path) -> list[Path]:
    return [index.parent / s["file"] for s in json.loads(index.read_text())["shards"]]


def test_sharded_file_restores_what_the_unsharded_one_does(outputs, tmp_path):
    d, index = outputs["dir"], outputs["index"]
    files = shards_of(index)
    assert [f.name for f in files] == [f"ex-0000{i}-of-00003.rmoe" for i in range(1, 4)]
    assert not (d / "ex.rmoe").exists()
    assert outputs["report"]["index"] == str(index)
    doc = json.loads(index.read_text())
    assert doc["metadata"]["total_size"] == sum(f.stat().st_size for f in files)
    assert [s["layers"] for s in doc["shards"]] == [[], [0], [1]]
    with resmoe_format.open(outputs["one"]) as one:
        want = set(one.schema.passthrough) | {s.name for lay in one.layers for s in lay.sources}
        acc_one = accounting.account(one)
    assert set(doc["weight_map"]) == want
    for i, f in enumerate(files):  # every shard is a valid file on its own, at most LIMIT of tensor data
        with resmoe_format.open(f, shard_only=True) as r:
            r.verify()
            assert r.version == (1, 1)
            assert r.header.metadata["rmoe_shard"] == str(i + 1)
            assert bool(r.files) == (i == 0)  # config and tokenizer in the first shard
            assert sum(t.nbytes for t in r.header.tensors.values()) <= parse_size(LIMIT)
    restore_checkpoint(outputs["one"], tmp_path / "a", original_order=True)
    for entry in (index, files[2]):  # the index or any shard opens the whole set
        out = tmp_path / entry.name
        restore_checkpoint(entry, out, original_order=True)
        assert (out / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "a").iterdir())
    with resmoe_format.open(files[1]) as r:
        assert isinstance(r, ShardedReader)
        acc = accounting.account(r)
    assert acc.file_size == sum(f.stat().st_size for f in files) + index.stat().st_size
    assert sum(acc.bytes.values()) == acc.file_size and acc.expert_bytes == acc_one.expert_bytes
    assert outputs["report"]["summary"]["file_bytes"] == acc.file_size


def test_sharded_logits_equal_unsharded(outputs):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from resmoe_format.torch import load_model

    ids = torch.tensor([[1, 5, 9, 100, 3]])
    with torch.no_grad():
        want = load_model(outputs["one"], mode="fused")(input_ids=ids).logits
        for entry in (outputs["index"], shards_of(outputs["index"])[-1]):
            got = load_model(entry, mode="fused")(input_ids=ids).logits
            assert torch.equal(got, want)


def test_spec_worked_example(outputs):
    """Spec 11.8 quotes this conversion's index: every number must be this output's."""
    text = (Path(__file__).parents[1] / "spec" / "FORMAT.md").read_text(encoding="utf-8")
    section = " ".join(text[text.index("### 11.8 Worked example"):].split())
    doc = json.loads(outputs["index"].read_text())
    for s in doc["shards"]:
        assert json.dumps(s) in section, s
    meta = doc["metadata"]
    for key in ("total_size", "shard_count", "shard_set", "max_shard_size"):
        assert f'"{key}": {json.dumps(meta[key])}' in section, key
    assert f"{len(doc['weight_map'])} entries" in section
    assert f"the index is {outputs['index'].stat().st_size:,} bytes" in section


def test_inspect_sums_the_shards_and_the_index(outputs, capsys):
    assert inspect_main([str(shards_of(outputs["index"])[0]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["file_size"] == sum(doc["bytes"].values())
    assert len(doc["shards"]) == 3 and doc["index_bytes"] == outputs["index"].stat().st_size
    assert inspect_main([str(shards_of(outputs["index"])[0]), "--json", "--shard-only"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["file_size"] == shards_of(outputs["index"])[0].stat().st_size and "shards" not in alone


def test_a_model_that_fits_is_one_plain_file(outputs, tmp_path):
    convert(outputs["src"], tmp_path / "big.rmoe", ConvertOptions(max_shard_size="50GB"), progress=False)
    assert (tmp_path / "big.rmoe").read_bytes() == outputs["one"].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.rmoe"]


@pytest.fixture
def copy(outputs, tmp_path) -> Path:
    """A private copy of the sharded set; returns its index."""
    for f in [outputs["index"], *shards_of(outputs["index"])]:
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / outputs["index"].name


def refused(path: Path, match: str) -> None:
    with pytest.raises(RmoeFormatError, match=match):
        resmoe_format.open(path).close()


def test_missing_truncated_or_foreign_shards_are_named(copy, outputs, tmp_path):
    files = shards_of(copy)
    files[2].rename(tmp_path / "away")
    refused(copy, r"shard 3 of 3, .*ex-00003-of-00003.rmoe, is missing")
    refused(files[0], r"shard 3 of 3, .*ex-00003-of-00003.rmoe, is missing")
    (tmp_path / "away").rename(files[2])
    data = files[2].read_bytes()
    files[2].write_bytes(data[:-100])
    refused(copy, r"shard 3 of 3, .*ex-00003-of-00003.rmoe: \d+ bytes, the index says \d+ \(truncated")
    files[2].write_bytes(data)
    # shards 2 and 3 swapped, the index's sizes made to fit: their __metadata__ tells
    doc = json.loads(copy.read_text())
    doc["shards"][1]["size"], doc["shards"][2]["size"] = doc["shards"][2]["size"], doc["shards"][1]["size"]
    files[1].rename(tmp_path / "x")
    files[2].rename(files[1])
    (tmp_path / "x").rename(files[2])
    copy.write_text(json.dumps(doc))
    refused(copy, r"shard 2 of 3, .*ex-00002-of-00003.rmoe: is not shard 2 of 3 of this set .*shard 3 of 3")
    # a shard of another conversion (other flags), sizes made to fit
    (tmp_path / "other").mkdir()
    convert(outputs["src"], tmp_path / "other" / "ex.rmoe", ConvertOptions(keep=0.3, max_shard_size="70KB"),
            progress=False)
    other = (tmp_path / "other" / files[1].name).read_bytes()
    for f in shards_of(outputs["index"]):
        shutil.copy(f, tmp_path / f.name)
    files[1].write_bytes(other)
    doc = json.loads(outputs["index"].read_text())
    doc["shards"][1]["size"] = len(other)
    doc["metadata"]["total_size"] = sum(s["size"] for s in doc["shards"])
    copy.write_text(json.dumps(doc))
    refused(copy, r"shard 2 of 3, .*: is not shard 2 of 3 of this set .*another conversion")
    copy.unlink()
    refused(files[0], r"shard 1 of 3 of a sharded .rmoe file, and its index .* is missing")
    resmoe_format.open(files[0], shard_only=True).close()


def test_max_shard_size_strings():
    assert parse_size("50GB") == 50 * 10**9 and parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("4096") == 4096 and parse_size("2 kib") == 2048
    for bad in ("5XB", "", "GB", "-1GB", "0", "1e9"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ConversionError, match="--max-shard-size: '12 parsecs' is not a size"):
        convert("nowhere", "x.rmoe", ConvertOptions(max_shard_size="12 parsecs"), progress=False)


def test_items_larger_than_a_shard_get_their_own(outputs, tmp_path):
    with pytest.warns(UserWarning, match=r"--max-shard-size 1.0 KB: 12 item\(s\) are larger than a shard .* and 7 "
                      r"more"):
        convert(outputs["src"], tmp_path / "m.rmoe", ConvertOptions(max_shard_size="1KB"), progress=False)
    with resmoe_format.open(index_path(tmp_path / "m.rmoe")) as r:
        for s in r.shards:  # at most 1 KB of tensor data, or one item alone
            data = sum(t.nbytes for n, t in s.header.tensors.items() if n != "rmoe.checksums")
            assert data <= 1000 or len(s.layers) + len(s.schema.passthrough) == 1
        assert [lay.index for lay in r.layers] == [0, 1]


def test_a_failed_publish_leaves_nothing(outputs, tmp_path, monkeypatch):
    real, calls = publish.publish, []

    def flaky(tmp, target):
        calls.append(target)
        if len(calls) == 3:
            raise OSError("disk full")
        real(tmp, target)

    monkeypatch.setattr(publish, "publish", flaky)
    with pytest.raises(OSError, match="disk full"):
        convert(outputs["src"], tmp_path / "m.rmoe", ConvertOptions(max_shard_size=LIMIT), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_output_shards_never_overwrite_an_input(tmp_path):
    (tmp_path / "m-00001-of-00002.rmoe").write_bytes(b"x")
    with pytest.raises(PathError, match="its shards would be named like the input"):
        check_shard_inputs(tmp_path / "m.rmoe", [tmp_path / "m-00001-of-00002.rmoe"])
    check_shard_inputs(tmp_path / "n.rmoe", [tmp_path / "m-00001-of-00002.rmoe"])
    assert shard_path(tmp_path / "m.rmoe", 3, 12).name == "m-00003-of-00012.rmoe"
    assert convert_main(["nowhere", str(tmp_path / "o.rmoe"), "--max-shard-size", "1 furlong"]) == 2


def test_a_shard_goes_to_gguf_rmoe_and_back(outputs, tmp_path):
    pytest.importorskip("gguf")
    from resmoe_format.errors import GgufRmoeError
    from resmoe_format.gguf_rmoe import gguf_to_rmoe, rmoe_to_gguf

    shard = shards_of(outputs["index"])[1]
    rmoe_to_gguf(shard, tmp_path / "s.gguf")
    gguf_to_rmoe(tmp_path / "s.gguf", tmp_path / shard.name)
    assert (tmp_path / shard.name).read_bytes() == shard.read_bytes()
    with pytest.raises(GgufRmoeError, match="index of a sharded .rmoe file"):
        rmoe_to_gguf(outputs["index"], tmp_path / "i.gguf")
