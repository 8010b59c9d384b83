"""Architecture adapters and the checkpoint reader, on checkpoints written by transformers."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_models import ARCHS, build_checkpoint
from safetensors.torch import load_file, save_file

from converters.architectures import SUPPORTED, adapter_for
from converters.checkpoint import Checkpoint
from converters.disassemble import expert_matrices
from converters.errors import ConversionError, UnsupportedArchitecture
from resmoe_format.restore import assemble

EXPECTED_LAYERS = {"deepseek_v2": [1], "deepseek_v3": [1], "switch": [1, 3, 5, 7]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {a: build_checkpoint(a, root / a, "bf16") for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_layers_and_exact_disassembly(checkpoints, arch):
    with Checkpoint(checkpoints[arch]) as ck:
        layers = adapter_for(ck.config, ck.tensors).moe_layers()
        assert [lay.index for lay in layers] == EXPECTED_LAYERS.get(arch, [0, 1])
        compressed = set()
        for lay in layers:
            experts = expert_matrices(lay, ck.get)
            assert len(experts) == lay.num_experts == 4
            for e in experts:
                for m in lay.matrices:
                    assert tuple(e[m.name].shape) == m.shape
                    if len(m.shape) == 2:
                        assert m.neuron_axis == 0 and m.shape[0] == lay.num_neurons
            np_experts = [{k: v.view(torch.int16).numpy() for k, v in e.items()} for e in experts]
            for src in lay.sources:
                want = ck.get(src.name).view(torch.int16).numpy()
                got = assemble(None, src, np_experts)
                assert got.shape == want.shape and (got == want).all(), src.name
                compressed.add(src.name)
        rest = set(ck.tensors) - compressed
        assert not any(".experts." in n and "shared" not in n for n in rest), sorted(rest)[:5]
        if arch == "qwen2_moe":
            assert any("shared_expert." in n for n in rest)
        if arch.startswith("deepseek"):
            assert "model.layers.0.mlp.gate_proj.weight" in rest and any("shared_experts" in n for n in rest)


def test_gpt_oss_gate_and_up_are_the_interleaved_columns(checkpoints):
    with Checkpoint(checkpoints["gpt_oss"]) as ck:
        lay = adapter_for(ck.config, ck.tensors).moe_layers()[0]
        e = expert_matrices(lay, ck.get)
        gu = ck.get(f"{lay.prefix}.gate_up_proj")
        b = ck.get(f"{lay.prefix}.gate_up_proj_bias")
        assert torch.equal(e[2]["gate"], gu[2][:, ::2].T) and torch.equal(e[2]["up"], gu[2][:, 1::2].T)
        assert torch.equal(e[1]["gate_bias"], b[1][::2]) and torch.equal(e[1]["up_bias"], b[1][1::2])
        assert torch.equal(e[3]["down"], ck.get(f"{lay.prefix}.down_proj")[3])


def test_unknown_architecture_and_dense_model(checkpoints):
    cfg = dict(json.loads((checkpoints["mixtral"] / "config.json").read_text()), architectures=["FooMoE"])
    with Checkpoint(checkpoints["mixtral"]) as ck:
        with pytest.raises(UnsupportedArchitecture) as e:
            adapter_for(cfg, ck.tensors)
        assert all(name in str(e.value) for name in SUPPORTED)
        dense = {k: v for k, v in ck.tensors.items() if "experts" not in k}
        with pytest.raises(ConversionError, match="not a Mixture-of-Experts"):
            adapter_for(dict(cfg, architectures=["LlamaForCausalLM"]), dense)
        with pytest.raises(ConversionError, match="no expert tensors for it"):
            adapter_for(ck.config, dense).moe_layers()


def test_more_experts_than_config(checkpoints):
    with Checkpoint(checkpoints["olmoe"]) as ck:
        with pytest.raises(ConversionError, match="more experts"):
            adapter_for(dict(ck.config, num_experts=3), ck.tensors).moe_layers()


@pytest.fixture()
def sharded(tmp_path):
    return build_checkpoint("mixtral", tmp_path / "sh", "bf16", shard_size="10KB")


def test_sharded_checkpoint_reads_every_tensor(sharded):
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(idx.values())) > 1
    with Checkpoint(sharded) as ck:
        assert sorted(ck.tensors) == sorted(idx)
        assert {k: v.file.name for k, v in ck.tensors.items()} == idx


def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


def test_index_inconsistencies(sharded, tmp_path):
    idx = _index(sharded)
    name, shard = sorted(idx["weight_map"].items())[0]
    other = next(s for s in set(idx["weight_map"].values()) if s != shard)
    cases = {
        "does not hold it|does not list": lambda d: _set_index(d, {**idx["weight_map"], name: other}),
        "does not list": lambda d: _set_index(d, {k: v for k, v in idx["weight_map"].items() if k != name}),
        "is missing from": lambda d: (d / shard).unlink(),
        "not a valid safetensors": lambda d: (d / shard).write_bytes((d / shard).read_bytes()[:100]),
        "not a readable JSON config": lambda d: (d / "config.json").write_text("{"),
    }
    for i, (match, damage) in enumerate(cases.items()):
        d = tmp_path / f"case{i}"
        shutil.copytree(sharded, d)
        damage(d)
        with pytest.raises(ConversionError, match=match):
            Checkpoint(d)


def _set_index(d, weight_map):
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_tensor_in_two_shards(sharded, tmp_path):
    d = tmp_path / "dup"
    shutil.copytree(sharded, d)
    idx = _index(d)
    shards = sorted(set(idx["weight_map"].values()))
    a = load_file(d / shards[0])
    b = load_file(d / shards[1])
    k = next(iter(a))
    b[k] = a[k]
    save_file(b, d / shards[1], metadata={"format": "pt"})
    with pytest.raises(ConversionError):
        Checkpoint(d)
    (d / "model.safetensors.index.json").unlink()
    with pytest.raises(ConversionError, match="no model.safetensors.index.json"):
        Checkpoint(d)


def test_single_file_and_missing_config(tmp_path, checkpoints):
    f = checkpoints["olmoe"] / "model.safetensors"
    with Checkpoint(f) as ck:
        assert ck.files()["config.json"] == (checkpoints["olmoe"] / "config.json").read_bytes()
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(f.read_bytes())
    with pytest.raises(ConversionError, match="config.json not found"):
        Checkpoint(lone)
    with pytest.raises(ConversionError, match="no such file"):
        Checkpoint(tmp_path / "nope")
