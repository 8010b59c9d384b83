"""Architecture adapters, the checkpoint reader and disassembly, on checkpoints written by transformers."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from hf_models import ARCHS, build_checkpoint, build_dense_checkpoint
from safetensors.torch import load_file, save_file

from converters.architectures import SUPPORTED, adapter_for
from converters.checkpoint import Checkpoint, TensorInfo
from converters.disassemble import expert_matrices
from converters.errors import ConversionError, UnsupportedArchitecture
from resmoe_format import MatrixSpec, SourceSpec
from resmoe_format.restore import assemble

#: MoE layer indices of the default 2-layer builds (Switch: odd blocks of encoder 0-1 and decoder 2-3).
EXPECTED_LAYERS = {"deepseek_v2": [1], "deepseek_v3": [1], "switch": [1, 3]}
#: Every architecture in at least one dtype, Mixtral (and the fused GPT-OSS layout) in several.
CASES = [("mixtral", "bf16"), ("mixtral", "fp16"), ("mixtral", "fp32"), ("qwen2_moe", "fp16"), ("qwen3_moe", "bf16"),
         ("deepseek_v2", "fp32"), ("deepseek_v3", "bf16"), ("olmoe", "fp16"), ("phimoe", "bf16"), ("switch", "fp32"),
         ("gpt_oss", "bf16"), ("gpt_oss", "fp32")]
assert {a for a, _ in CASES} == set(ARCHS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {(a, dt): build_checkpoint(a, root / f"{a}-{dt}", dt) for a, dt in CASES}


def _bits(t: torch.Tensor) -> np.ndarray:
    """The raw bit patterns (bit-for-bit comparison, NaN-safe)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


@pytest.mark.parametrize("arch,dtype", CASES)
def test_adapter_layers_and_exact_disassembly(checkpoints, arch, dtype):
    with Checkpoint(checkpoints[arch, dtype]) as ck:
        layers = adapter_for(ck.config, ck.tensors).moe_layers()
        assert [lay.index for lay in layers] == EXPECTED_LAYERS.get(arch, [0, 1])
        compressed = set()
        for lay in layers:
            assert lay.num_experts == 4
            assert {m.dtype for m in lay.matrices} == {dtype} and {s.dtype for s in lay.sources} == {dtype}
            experts = expert_matrices(lay, ck.get)
            assert len(experts) == 4
            for e in experts:
                assert set(e) == {m.name for m in lay.matrices}
                for m in lay.matrices:
                    assert tuple(e[m.name].shape) == m.shape and e[m.name].dtype == ck.get(lay.sources[0].name).dtype
                    if len(m.shape) == 2:  # canonical: neuron axis first
                        assert m.neuron_axis == 0 and m.shape[0] == lay.num_neurons
            np_experts = [{k: _bits(v) for k, v in e.items()} for e in experts]
            for src in lay.sources:
                assert src.name.startswith(lay.prefix + ".")
                want = _bits(ck.get(src.name))
                got = assemble(lay.spec(), src, np_experts)
                assert got.shape == want.shape and (got == want).all(), src.name
                assert src.name not in compressed
                compressed.add(src.name)
        rest = set(ck.tensors) - compressed
        assert not any(".experts." in n for n in rest), sorted(rest)[:5]
        if arch == "qwen2_moe":
            assert {n for n in rest if ".shared_expert." in n or "shared_expert_gate" in n}
        if arch.startswith("deepseek"):
            assert "model.layers.0.mlp.gate_proj.weight" in rest and any("shared_experts" in n for n in rest)


def test_canonical_orientation_of_each_family(checkpoints):
    """gate/up/wi are the source as is, down/wo its transpose; GPT-OSS de-interleaves."""
    def first(arch):
        ck = Checkpoint(checkpoints[arch])
        return ck, adapter_for(ck.config, ck.tensors).moe_layers()[0]

    ck, lay = first(("mixtral", "fp32"))
    with ck:
        e = expert_matrices(lay, ck.get)
        assert [m.name for m in lay.matrices] == ["gate", "up", "down"] and lay.num_neurons == 24
        assert torch.equal(e[2]["gate"], ck.get(f"{lay.prefix}.2.w1.weight"))
        assert torch.equal(e[2]["up"], ck.get(f"{lay.prefix}.2.w3.weight"))
        assert torch.equal(e[2]["down"], ck.get(f"{lay.prefix}.2.w2.weight").T)
    ck, lay = first(("switch", "fp32"))
    with ck:
        e = expert_matrices(lay, ck.get)
        assert lay.prefix == "encoder.block.1.layer.1.mlp.experts" and [m.name for m in lay.matrices] == ["wi", "wo"]
        assert torch.equal(e[3]["wo"], ck.get(f"{lay.prefix}.expert_3.wo.weight").T)
    ck, lay = first(("gpt_oss", "bf16"))
    with ck:
        e = expert_matrices(lay, ck.get)
        gu, b = ck.get(f"{lay.prefix}.gate_up_proj"), ck.get(f"{lay.prefix}.gate_up_proj_bias")
        assert torch.equal(e[2]["gate"], gu[2][:, ::2].T) and torch.equal(e[2]["up"], gu[2][:, 1::2].T)
        assert torch.equal(e[1]["gate_bias"], b[1][::2]) and torch.equal(e[1]["up_bias"], b[1][1::2])
        assert torch.equal(e[3]["down"], ck.get(f"{lay.prefix}.down_proj")[3])
        assert torch.equal(e[0]["down_bias"], ck.get(f"{lay.prefix}.down_proj_bias")[0])
        axes = {m.name: m.neuron_axis for m in lay.matrices}
        assert axes == {"gate": 0, "up": 0, "down": 0, "gate_bias": 0, "up_bias": 0, "down_bias": None}


def test_disassemble_concat_and_per_expert_joins():
    """Forms no supported family uses yet: a concatenated per-expert gate_up, a stacked transposed down."""
    E, n, h = 3, 5, 4
    mats = [MatrixSpec("gate", (n, h), "fp32", 0), MatrixSpec("up", (n, h), "fp32", 0),
            MatrixSpec("down", (n, h), "fp32", 0)]
    srcs = [SourceSpec(f"e.{k}.gate_up", "fp32", (2 * n, h), k, ["gate", "up"], join="concat", join_axis=0)
            for k in range(E)]
    srcs += [SourceSpec("e.down", "fp32", (E, h, n), "all", ["down"], transpose=True),
             SourceSpec("e.gate_up_t", "fp32", (E, h, 2 * n), "all", ["gate", "up"], transpose=True, join="concat",
                        join_axis=1)]
    from converters.architectures.base import LayerLayout

    lay = LayerLayout(0, "e", E, n, mats, srcs)
    g = torch.Generator().manual_seed(0)
    ref = [{m.name: torch.randn(m.shape, generator=g) for m in mats} for _ in range(E)]
    np_ref = [{k: v.numpy() for k, v in e.items()} for e in ref]
    store = {s.name: torch.from_numpy(assemble(lay.spec(), s, np_ref)) for s in srcs}
    got = expert_matrices(lay, store.__getitem__)
    assert all(torch.equal(got[k][m], ref[k][m]) for k in range(E) for m in ref[k])
    store["e.down"] = store["e.down"][:, :, 1:]
    with pytest.raises(ConversionError, match="e.down: shape"):
        expert_matrices(lay, store.__getitem__)


def test_model_type_fallback_and_unknown_architecture(checkpoints):
    with Checkpoint(checkpoints["mixtral", "bf16"]) as ck:
        cfg = {k: v for k, v in ck.config.items() if k != "architectures"}
        assert type(adapter_for(cfg, ck.tensors)).__name__ == "Mixtral"
        with pytest.raises(UnsupportedArchitecture) as e:
            adapter_for(dict(cfg, architectures=["FooMoeForCausalLM"]), ck.tensors)
        msg = str(e.value)
        assert "FooMoeForCausalLM" in msg and ", ".join(sorted(SUPPORTED)) in msg
        assert {"MixtralForCausalLM", "GptOssForCausalLM", "Qwen3MoeForCausalLM"} <= set(SUPPORTED)


def test_dense_model_is_rejected(tmp_path, checkpoints):
    with Checkpoint(build_dense_checkpoint(tmp_path / "llama", "bf16")) as ck:
        with pytest.raises(ConversionError, match="LlamaForCausalLM is not a Mixture-of-Experts") as e:
            adapter_for(ck.config, ck.tensors)
        assert not isinstance(e.value, UnsupportedArchitecture)
    with Checkpoint(checkpoints["mixtral", "bf16"]) as ck:  # an MoE config over expert-less tensors
        dense = {k: v for k, v in ck.tensors.items() if ".experts." not in k}
        with pytest.raises(ConversionError, match="MixtralForCausalLM is not a Mixture-of-Experts"):
            adapter_for(ck.config, dense)


def test_qwen2_dense_layers(tmp_path):
    src = build_checkpoint("qwen2_moe", tmp_path / "q", "bf16", num_layers=3, overrides={"mlp_only_layers": [1]})
    with Checkpoint(src) as ck:
        assert [lay.index for lay in adapter_for(ck.config, ck.tensors).moe_layers()] == [0, 2]
        assert "model.layers.1.mlp.gate_proj.weight" in ck.tensors
        # a layer the config makes sparse but whose experts are gone
        gone = {k: v for k, v in ck.tensors.items() if not k.startswith("model.layers.2.mlp.experts.")}
        with pytest.raises(ConversionError, match="layer 2: .*no expert tensors for it"):
            adapter_for(ck.config, gone).moe_layers()


def _tamper(tensors, name, **changes):
    return {**tensors, name: dataclasses.replace(tensors[name], **changes)}


@pytest.mark.parametrize("arch,dtype", [("mixtral", "bf16"), ("olmoe", "fp16"), ("switch", "fp32"),
                                        ("gpt_oss", "bf16"), ("deepseek_v3", "bf16")])
def test_inconsistent_checkpoints(checkpoints, arch, dtype):
    with Checkpoint(checkpoints[arch, dtype]) as ck:
        cfg, ts = ck.config, ck.tensors
        lay = adapter_for(cfg, ts).moe_layers()[-1]
        name = lay.sources[-1].name
        fewer = {k: v for k, v in ts.items() if k != name}
        with pytest.raises(ConversionError, match=f"{name}.*(missing|inconsistent)"):
            adapter_for(cfg, fewer).moe_layers()
        shape = ts[name].shape
        with pytest.raises(ConversionError, match=f"{name}: shape"):
            adapter_for(cfg, _tamper(ts, name, shape=shape[:-1] + (shape[-1] + 2,))).moe_layers()
        other = "fp16" if dtype != "fp16" else "bf16"
        with pytest.raises(ConversionError, match=f"{name}: dtype {other}"):
            adapter_for(cfg, _tamper(ts, name, dtype=other)).moe_layers()
        first = lay.sources[0].name
        with pytest.raises(ConversionError, match="f8_e4m3.*dequantize"):
            adapter_for(cfg, _tamper(ts, first, dtype="f8_e4m3")).moe_layers()
        key = {"switch": "num_experts", "olmoe": "num_experts", "deepseek_v3": "n_routed_experts"}.get(
            arch, "num_local_experts")
        with pytest.raises(ConversionError, match="more experts|expert weight but no MoE layer|shape"):
            adapter_for(dict(cfg, **{key: 3}), ts).moe_layers()
        layers_key = "num_layers" if arch == "switch" else "num_hidden_layers"
        fewer_layers = dict(cfg, **{layers_key: cfg[layers_key] - 1})
        if arch == "switch":
            fewer_layers["num_decoder_layers"] = cfg["num_decoder_layers"] - 1
        with pytest.raises(ConversionError, match="expert weight but no MoE layer"):
            adapter_for(fewer_layers, ts).moe_layers()


# --- the checkpoint reader ----------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return build_checkpoint("mixtral", tmp_path_factory.mktemp("sharded") / "sh", "bf16", shard_size="20KB")


def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


def _set_index(d, weight_map):
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_checkpoint_reads_every_tensor(sharded, checkpoints):
    idx = _index(sharded)["weight_map"]
    assert len(set(idx.values())) > 1
    single = load_file(checkpoints["mixtral", "bf16"] / "model.safetensors")
    with Checkpoint(sharded) as ck:
        assert sorted(ck.tensors) == sorted(idx) == sorted(single)
        assert {k: v.file.name for k, v in ck.tensors.items()} == idx
        assert all(isinstance(v, TensorInfo) and v.dtype == "bf16" for v in ck.tensors.values())
        assert all(torch.equal(ck.get(k), v) for k, v in single.items())  # same seed: same weights
        layers = adapter_for(ck.config, ck.tensors).moe_layers()
        assert [lay.index for lay in layers] == [0, 1]
        assert {lay.sources[0].name for lay in layers} <= set(idx)
        with pytest.raises(ConversionError, match="no tensor nope"):
            ck.get("nope")


@pytest.mark.parametrize("case", ["remapped", "unlisted", "missing shard", "truncated", "truncated header",
                                  "garbage", "bad index", "bad config"])
def test_index_and_shard_inconsistencies(sharded, tmp_path, case):
    d = tmp_path / "ck"
    shutil.copytree(sharded, d)
    wm = _index(d)["weight_map"]
    name, shard = sorted(wm.items())[0]
    other = next(s for s in sorted(set(wm.values())) if s != shard)
    match = {
        "remapped": f"(shard {shard} holds {name}, but model.safetensors.index.json lists it under {other}"
                    f"|{name} is listed in model.safetensors.index.json under {other} but the shard does not hold it)",
        "unlisted": f"shard {shard} holds {name}, but model.safetensors.index.json does not list it",
        "missing shard": f"shard {shard} listed in model.safetensors.index.json is missing",
        "truncated": f"{shard}: not a valid safetensors file",
        "truncated header": f"{shard}: not a valid safetensors file",
        "garbage": f"{shard}: not a valid safetensors file",
        "bad index": "not a valid safetensors index",
        "bad config": "config.json: not a readable JSON config",
    }[case]
    if case == "remapped":
        _set_index(d, {**wm, name: other})
    elif case == "unlisted":
        _set_index(d, {k: v for k, v in wm.items() if k != name})
    elif case == "missing shard":
        (d / shard).unlink()
    elif case == "truncated":  # header intact, data cut short: safetensors' own validation catches it
        (d / shard).write_bytes((d / shard).read_bytes()[:-3])
    elif case == "truncated header":
        (d / shard).write_bytes((d / shard).read_bytes()[:100])
    elif case == "garbage":
        (d / shard).write_bytes(b"\xff" * 8 + b"not json at all" * 10)
    elif case == "bad index":
        (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    else:
        (d / "config.json").write_text("{")
    with pytest.raises(ConversionError, match=match):
        Checkpoint(d)


def test_tensor_in_two_shards(sharded, tmp_path):
    d = tmp_path / "dup"
    shutil.copytree(sharded, d)
    shards = sorted(set(_index(d)["weight_map"].values()))
    a, b = load_file(d / shards[0]), load_file(d / shards[1])
    k = next(iter(a))
    save_file({**b, k: a[k]}, d / shards[1], metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=f"tensor {k} is in both {shards[0]} and {shards[1]}"):
        Checkpoint(d)
    (d / "model.safetensors.index.json").unlink()
    with pytest.raises(ConversionError, match="no model.safetensors.index.json"):
        Checkpoint(d)


def test_single_file_config_and_side_files(tmp_path, checkpoints):
    src = checkpoints["olmoe", "fp16"]
    f = src / "model.safetensors"
    with Checkpoint(f) as ck:
        assert ck.files()["config.json"] == (src / "config.json").read_bytes()
        assert ck.tensors[next(iter(ck.tensors))].file == f
    # a lone file: config.json required, or given explicitly
    lone = tmp_path / "lone" / "weights.safetensors"
    lone.parent.mkdir()
    lone.write_bytes(f.read_bytes())
    with pytest.raises(ConversionError, match="config.json not found"):
        Checkpoint(lone)
    with pytest.raises(ConversionError, match="config.json not found"):
        Checkpoint(lone.parent)
    cfg = tmp_path / "my_config.json"
    cfg.write_bytes((src / "config.json").read_bytes())
    (lone.parent / "tokenizer_config.json").write_text("{}")
    (lone.parent / "merges.txt").write_text("a b\n")
    (lone.parent / "unrelated.txt").write_text("x")
    with Checkpoint(lone.parent, config=cfg) as ck:  # a directory with exactly one *.safetensors
        assert len(ck.tensors) == len(load_file(f))
        files = ck.files()
        assert sorted(files) == ["config.json", "merges.txt", "tokenizer_config.json"]
        assert files["config.json"] == cfg.read_bytes() and files["merges.txt"] == b"a b\n"
    (lone.parent / "second.safetensors").write_bytes(f.read_bytes())
    with pytest.raises(ConversionError, match="2 safetensors files but no model.safetensors.index.json"):
        Checkpoint(lone.parent, config=cfg)
    with pytest.raises(ConversionError, match="no such file"):
        Checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_bytes(cfg.read_bytes())
    with pytest.raises(ConversionError, match="no model.safetensors"):
        Checkpoint(empty)
    save_file({}, empty / "model.safetensors")
    with pytest.raises(ConversionError, match="holds no tensors"):
        Checkpoint(empty)


# --- the architecture records and the registries keyed to them ---------------------------------

def test_every_registry_is_keyed_to_the_records():
    """One record per family: the converter, the runtime and both exporters agree with it."""
    import gguf

    from converters.architectures import ADAPTERS, REGISTRY
    from converters.exporters.gguf_export import ARCHS as GGUF_ARCHS
    from converters.exporters.onnx_export import SUPPORTED as ONNX_SUPPORTED
    from resmoe_format.architectures import BY_ARCHITECTURE, BY_MODEL_TYPE, FAMILIES
    from resmoe_format.torch.kinds import KINDS

    assert len(FAMILIES) == 9 and set(ADAPTERS) == set(FAMILIES)
    assert set(REGISTRY) == set(BY_ARCHITECTURE) == set(SUPPORTED)
    built = {"switch_transformers" if a == "switch" else a for a in ARCHS}  # the test builders cover every record
    assert built == set(BY_MODEL_TYPE)
    for f in FAMILIES.values():
        assert all(REGISTRY[a].family is f for a in f.architectures)
        assert f.kind in KINDS, f.name
        names = set(f.matrices) | set(f.biases)
        for rules in (f.source, f.module_layout):  # every matrix stored exactly once, nothing else
            parts = [p for r in rules for p in r.parts]
            assert sorted(parts) == sorted(names), (f.name, parts)
        if f.gguf is None:
            assert f.gguf_reason and not set(f.model_types) & set(GGUF_ARCHS), f.name
        else:
            member = f.gguf.upper().replace("-", "_")  # "gpt-oss" is gguf.MODEL_ARCH.GPT_OSS
            assert not f.gguf_reason and all(GGUF_ARCHS[t].arch == member for t in f.model_types)
            assert gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, member)] == f.gguf
        assert f.onnx == (set(f.model_types) <= set(ONNX_SUPPORTED)) and bool(f.onnx_reason) != f.onnx, f.name
    assert set(GGUF_ARCHS) <= set(BY_MODEL_TYPE) and set(ONNX_SUPPORTED) <= set(BY_MODEL_TYPE)


def test_converted_layers_follow_the_layout_rules(checkpoints):
    """What the adapters write passes the records' layout check (spec 4.14); a renamed or
    transposed matrix, or a module prefix, does not."""
    from resmoe_format.architectures import MIXTRAL, check_layers, family_for

    for (arch, dtype), path in checkpoints.items():
        with Checkpoint(path) as ck:
            fam = family_for(ck.config)
            assert fam is not None and type(adapter_for(ck.config, ck.tensors)).family is fam
            check_layers(fam, [lay.spec() for lay in adapter_for(ck.config, ck.tensors).moe_layers()])
    with Checkpoint(checkpoints["mixtral", "fp32"]) as ck:
        lay = adapter_for(ck.config, ck.tensors).moe_layers()[0].spec()
    n, h = lay.matrices[0].shape
    renamed = dataclasses.replace(lay, matrices=[dataclasses.replace(m, name=w) for m, w in
                                                 zip(lay.matrices, ("w1", "w3", "w2"))])
    assert "has matrices w1, w2, w3; Mixtral needs matrices gate, up, down" in MIXTRAL.layout_problem(renamed)
    flipped = dataclasses.replace(lay, matrices=lay.matrices[:2] + [MatrixSpec("down", (h, n), "fp32", 1)])
    assert "down [16, 24] axis 1" in MIXTRAL.layout_problem(flipped)
    moved = dataclasses.replace(lay, prefix="model.layers.0.block_sparse_moe")
    assert "prefix 'model.layers.0.block_sparse_moe' is not Mixtral's experts module" in MIXTRAL.layout_problem(moved)
    with pytest.raises(ValueError, match="spec/FORMAT.md 4.14"):
        check_layers(MIXTRAL, [moved], ValueError)


def test_list_architectures(capsys):
    from converters.cli.convert import main
    from resmoe_format.architectures import FAMILIES

    assert main(["--list-architectures"]) == 0  # no SRC needed
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 6}
    for f in FAMILIES.values():
        row = rows[f.architectures[0]]
        assert f.model_types[0] in row and row.count(" yes ") >= 2, row
        assert (f.gguf or "no:") in row and ("yes" if f.onnx else "no:") in row.split("│")[6], row
        for reason in (f.gguf_reason, f.onnx_reason):  # wrapped over several lines
            assert all(word in out for word in reason.split())
    assert "llama" in rows["MixtralForCausalLM"] and "deepseek2" in rows["DeepseekV3ForCausalLM"]
    assert rows["MixtralForCausalLM"].split("│")[7].strip() == "yes"  # compressed-tensors
    assert rows["GptOssForCausalLM"].split("│")[7].strip().startswith("no:")
    with pytest.raises(SystemExit) as e:  # without the flag SRC stays required
        main([])
    assert e.value.code == 2 and "the following arguments are required: src" in capsys.readouterr().err


def test_demo_file_runs_in_the_runtime_and_exports_to_gguf(tmp_path):
    """``python -m resmoe_format.demo`` writes a Mixtral laid out as spec 4.14 says."""
    import warnings

    from converters.exporters.gguf_export import export_gguf
    from converters.restore_checkpoint import restore_checkpoint
    from hf_models import load_model as hf_load
    from resmoe_format.demo import main as demo_main
    from resmoe_format.torch import load_model

    path = tmp_path / "demo.rmoe"
    assert demo_main([str(path), "--layers", "2", "--experts", "8", "--hidden", "32", "--intermediate", "48"]) == 0
    ids = torch.tensor([[1, 5, 9, 200, 3, 7, 42, 0]])
    restore_checkpoint(path, tmp_path / "restored", original_order=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf_load(tmp_path / "restored")(ids).logits
        dense = load_model(path, mode="materialize", dtype="fp32")(ids).logits
        fused = load_model(path, mode="fused", dtype="fp32")(ids).logits
    assert torch.equal(dense, ref)  # materialize is the restored checkpoint that transformers loads
    scale = ref.abs().max()
    # fused skips the rounding of restored experts to the bf16 source dtype (measured 6e-4)
    assert (fused - ref).abs().max() / scale < 2e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the demo embeds no tokenizer: placeholder vocabulary
        out = export_gguf(path, tmp_path / "demo.gguf", "f32")
    import gguf

    shapes = {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(out).tensors}
    assert shapes["blk.1.ffn_gate_exps.weight"] == (32, 48, 8)  # GGUF lists dimensions innermost first
    assert shapes["blk.1.ffn_down_exps.weight"] == (48, 32, 8)


def test_a_file_off_the_layout_rules_is_a_clear_error(tmp_path):
    """The old demo's names (w1, w3, w2): the runtime and the GGUF exporter say what the rule is."""
    from filecraft import rewrite

    from converters.exporters.gguf_export import export_gguf
    from resmoe_format.demo import build
    from resmoe_format.errors import RmoeRuntimeError
    from resmoe_format.torch import load_model

    names = {"gate": "w1", "up": "w3", "down": "w2"}

    def rename(s):
        for lay in s["layers"]:
            for m in lay["matrices"]:
                m["name"] = names[m["name"]]
            lay["base"]["matrices"] = {names[k]: v for k, v in lay["base"]["matrices"].items()}
            lay["residuals"] = [{names[k]: v for k, v in r.items()} for r in lay["residuals"]]
            for src in lay["sources"]:
                src["parts"] = [names[p] for p in src["parts"]]

    path = rewrite(build(tmp_path / "d.rmoe", layers=1, experts=4, hidden=16, inter=24), tmp_path / "w.rmoe",
                   edit_schema=rename)
    want = r"layer 0 has matrices w1, w2, w3; Mixtral needs matrices gate, up, down .*4\.14"
    with pytest.raises(RmoeRuntimeError, match=want):
        load_model(path, mode="fused")
    with pytest.raises(ConversionError, match=want):
        export_gguf(path, tmp_path / "w.gguf")
    assert not (tmp_path / "w.gguf").exists()


def test_the_spec_lists_the_records():
    """spec/FORMAT.md 4.14's table is the records' (regenerate it with spec_table() when a family changes)."""
    from pathlib import Path

    from resmoe_format.architectures import spec_table

    spec = (Path(__file__).parent.parent / "spec" / "FORMAT.md").read_text()
    section = spec[spec.index("### 4.14"):spec.index("## 5.")]
    assert spec_table() in section
