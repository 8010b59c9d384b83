"""Source assembly rules and the float32 restoration arithmetic."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from builders import write_lossless_file

from resmoe_format import LayerSpec, MatrixSpec, RmoeFormatError, SourceSpec
from resmoe_format.container import source_shape
from resmoe_format.restore import assemble, combine, unpermute


def _layer(E=3, n=4, h=5):
    mats = [MatrixSpec("gate", (n, h), "bf16", 0), MatrixSpec("up", (n, h), "bf16", 0),
            MatrixSpec("down", (h, n), "bf16", 1), MatrixSpec("bias", (n,), "bf16", 0)]
    return LayerSpec(0, "", E, n, mats, "none", {}, None, [{} for _ in range(E)], [])


def _experts(E=3, n=4, h=5):
    rng = np.random.default_rng(0)
    return [{"gate": rng.standard_normal((n, h)), "up": rng.standard_normal((n, h)),
             "down": rng.standard_normal((h, n)), "bias": rng.standard_normal(n)} for _ in range(E)]


def test_concat_of_gate_and_up_rows():  # e.g. a fused (2I, H) gate_up weight, gate rows first
    lay, ex = _layer(), _experts()
    s = SourceSpec("x", "bf16", (8, 5), 1, ["gate", "up"], join="concat", join_axis=0)
    assert source_shape(lay, s) == (8, 5)
    np.testing.assert_array_equal(assemble(lay, s, ex), np.concatenate([ex[1]["gate"], ex[1]["up"]]))


def test_interleave_transposed_and_stacked():  # GPT-OSS gate_up_proj: (E, H, 2I), gate even, up odd
    lay, ex = _layer(), _experts()
    s = SourceSpec("x", "bf16", (3, 5, 8), "all", ["gate", "up"], transpose=True, join="interleave", join_axis=1)
    assert source_shape(lay, s) == (3, 5, 8)
    got = assemble(lay, s, ex)
    for k in range(3):
        np.testing.assert_array_equal(got[k][:, 0::2], ex[k]["gate"].T)
        np.testing.assert_array_equal(got[k][:, 1::2], ex[k]["up"].T)


def test_interleaved_vectors():  # GPT-OSS gate_up_proj_bias: (E, 2I)
    lay, ex = _layer(), _experts()
    ex = [dict(e, up_bias=e["bias"] * 2) for e in ex]
    lay.matrices.append(MatrixSpec("up_bias", (4,), "bf16", 0))
    s = SourceSpec("b", "bf16", (3, 8), "all", ["bias", "up_bias"], join="interleave", join_axis=0)
    got = assemble(lay, s, ex)
    np.testing.assert_array_equal(got[:, 1::2], got[:, 0::2] * 2)


@pytest.mark.parametrize("bad", [
    SourceSpec("x", "bf16", (8, 6), 0, ["gate", "up"], join="concat", join_axis=0),  # wrong declared shape
    SourceSpec("x", "bf16", (9, 5), 0, ["gate", "down"], join="interleave", join_axis=0),  # unequal parts
    SourceSpec("x", "bf16", (4, 5), 7, ["gate"]),  # no expert 7
    SourceSpec("x", "fp16", (4, 5), 0, ["gate"]),  # dtype differs from the matrix
    SourceSpec("x", "bf16", (4, 5), 0, ["gate", "bias"], join="concat", join_axis=0),  # ranks differ
])
def test_inconsistent_assembly_rules_are_rejected(bad):
    lay = _layer()
    with pytest.raises(RmoeFormatError):
        if source_shape(lay, bad) != bad.shape:
            raise RmoeFormatError("shape")


def test_unpermute_inverts_the_alignment():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 3))
    p = rng.permutation(6)
    aligned = w[p]  # aligned neuron i = original neuron p[i]
    np.testing.assert_array_equal(unpermute(aligned, p, 0), w)
    np.testing.assert_array_equal(unpermute(aligned.T, p, 1), w.T)


def test_combine_is_one_float32_add_then_round_to_nearest_even():
    b = np.array([1.0, 1.0, -0.0, 3.0], np.float32)
    d = np.array([2.0**-8, 3 * 2.0**-8, -0.0, 0.0], np.float32)
    got = combine(b, d, "bf16").astype(np.float32)
    # bf16's step at 1 is 2^-7: 1 + 2^-8 ties between 1 and 1 + 2^-7 -> even mantissa (1.0);
    # 1 + 3*2^-8 ties between 1 + 2^-7 and 1 + 2^-6 -> even mantissa (1 + 2^-6)
    np.testing.assert_array_equal(got, np.array([1.0, 1.0 + 2.0**-6, -0.0, 3.0], np.float32))
    assert np.signbit(got[2])
    assert combine(None, d, "fp32") is not None and np.signbit(combine(None, d, "fp32")[2])
    with pytest.raises(RmoeFormatError):
        combine(None, None, "fp32")


# --- the spec's own examples and rules, against the reference ---------------------------------------

SPEC = Path(__file__).resolve().parent.parent / "spec" / "FORMAT.md"


def _spec_gpt_oss_example(E: int, H: int, I: int) -> tuple[str, list[dict], list[dict]]:  # noqa: E741
    """(prefix, matrices, sources) of spec 6.5's GPT-OSS example with E, H, I filled in."""
    text = SPEC.read_text()
    sec = text[text.index("Example (GPT-OSS"):text.index("### 6.6")]
    blocks = re.findall(r"```text\n(.*?)```", sec, re.S)
    sizes = {"E": E, "H": H, "I": I, "2I": 2 * I}

    def numbers(m: re.Match) -> str:
        return "[" + ", ".join(str(sizes[x.strip()]) for x in m.group(1).split(",")) + "]"

    docs = []
    for block in blocks:
        block = re.sub(r"\[((?:\s*(?:E|H|I|2I)\s*,?)+)\]", numbers, block)
        dec, pos, objs = json.JSONDecoder(), 0, []
        block = block.strip()
        while pos < len(block):
            obj, pos = dec.raw_decode(block, pos)
            objs.append(obj)
            while pos < len(block) and block[pos] in " \n:":
                pos += 1
        docs.append(objs)
    (_, prefix, *matrices), sources = docs
    return prefix, matrices, sources


def test_spec_gpt_oss_example_is_what_the_converter_writes(tmp_path):
    import torch
    from safetensors.torch import save_file

    import resmoe_format
    from converters.convert import ConvertOptions, convert

    E, H, I, pre = 4, 8, 12, "model.layers.0.mlp.experts"  # noqa: E741
    src = tmp_path / "src"
    src.mkdir()
    gen = torch.Generator().manual_seed(0)
    shapes = {"gate_up_proj": (E, H, 2 * I), "down_proj": (E, I, H), "gate_up_proj_bias": (E, 2 * I),
              "down_proj_bias": (E, H)}
    save_file({f"{pre}.{k}": torch.randn(*v, generator=gen).bfloat16() for k, v in shapes.items()},
              src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
                                                 "num_hidden_layers": 1, "num_local_experts": E, "hidden_size": H,
                                                 "intermediate_size": I}))
    convert(src, tmp_path / "g.rmoe", ConvertOptions(method="prune"), progress=False)
    with resmoe_format.open(tmp_path / "g.rmoe") as r:
        lay = r.layers[0]
        prefix, matrices, sources = _spec_gpt_oss_example(E, H, I)
        assert lay.prefix == prefix
        assert [m.to_json() for m in lay.matrices] == matrices
        assert [s.to_json() for s in lay.sources] == sources


def test_restore_refuses_a_file_that_restores_one_name_twice(tmp_path):
    from converters.restore_checkpoint import restore_checkpoint
    from filecraft import rewrite

    src = tmp_path / "a.rmoe"
    write_lossless_file(src, layers=1)

    def edit(s):
        s["layers"][0]["sources"][0]["name"] = s["passthrough"][0]

    bad = rewrite(src, tmp_path / "bad.rmoe", edit_schema=edit)
    with pytest.raises(RmoeFormatError, match="restores tensor 'model.embed_tokens.weight', which a passthrough"):
        restore_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_embedded_files_are_restored_inside_the_output_directory(tmp_path):
    from converters.restore_checkpoint import restore_checkpoint

    import resmoe_format

    files = {"config.json": b"{}", "tokenizer/sub/vocab.json": b"[1]", "tok/merges.txt": b"a b"}
    with resmoe_format.Writer(tmp_path / "f.rmoe", {"architecture": "t"}) as w:
        for p, data in files.items():
            w.add_file(p, data)
        w.add_passthrough("x", np.ones(2, np.float32))
    out = restore_checkpoint(tmp_path / "f.rmoe", tmp_path / "out").resolve()
    written = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert written == {**files, "model.safetensors": written["model.safetensors"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.rmoe", "out"]  # nothing written elsewhere


def test_kquant_records_restore_to_their_dequantized_values(tmp_path):
    """resmoe-restore and resmoe-export --to safetensors on records of k-quant values (spec 5.10): every
    weight is cast(B + D) of the values kquant.dequantize gives (scattered by the encoding's mask, U V in
    float64), in original neuron order."""
    from builders import MATS, random_experts
    from converters.cli.export import main as export_main
    from converters.restore_checkpoint import restore_checkpoint
    from safetensors.numpy import load_file

    import resmoe_format
    from resmoe_format import MoELayer, codecs
    from resmoe_format.codecs import kquant
    from resmoe_format.codecs.kquant import KqLayout

    rng = np.random.default_rng(5)
    layout, dtype = KqLayout(16, 3, 6), "fp16"
    _, experts, perms = random_experts(rng, 3, 12, 10, dtype)
    aligned = [{m: np.take(e[m], p, axis=ax).astype(np.float32) for m, ax in MATS} for e, p in zip(experts, perms)]

    def values(enc: codecs.Encoded, part: str, n: int) -> np.ndarray:
        c, gs, ss = kquant.part_names(part)
        grid = kquant.unpack_grid(enc.parts[gs], enc.parts[ss], n, layout)
        return kquant.dequantize(kquant.unpack_codes(enc.parts[c], enc.value_dtype, n), grid, layout)

    base, residuals, want, sources = {}, [{} for _ in experts], {}, []
    for m, ax in MATS:
        mean = np.mean([a[m] for a in aligned], axis=0)
        base[m] = codecs.encode(mean, "dense", "q4", layout)
        b = values(base[m], "values", mean.size).reshape(mean.shape)
        for k, a in enumerate(aligned):
            d = a[m] - b
            if k == 0:
                enc = residuals[k][m] = codecs.encode(d, "dense", "ternary", layout)
                ref = values(enc, "values", d.size).reshape(d.shape)
            elif k == 1:
                mask = np.abs(d) > np.median(np.abs(d))
                enc = residuals[k][m] = codecs.encode(d, "bitmap", "q3", layout, mask=mask)
                ref = np.zeros_like(d)
                ref[mask] = values(enc, "values", int(mask.sum()))
            else:
                enc = residuals[k][m] = codecs.encode(d, "lowrank", "q6", layout, rank=3)
                u = values(enc, "u", d.shape[0] * 3).reshape(-1, 3)
                ref = (u.astype(np.float64) @ values(enc, "v", 3 * d.shape[1]).reshape(3, -1)).astype(np.float32)
            name = f"model.layers.0.mlp.experts.{k}.{m}_proj.weight"
            want[name] = unpermute(combine(b, ref, dtype), perms[k], ax)
            sources.append(SourceSpec(name, dtype, d.shape, k, [m]))
    mats = [MatrixSpec(m, aligned[0][m].shape, dtype, ax) for m, ax in MATS]
    with resmoe_format.Writer(tmp_path / "kq.rmoe", {"architecture": "t", "source_dtype": dtype}) as w:
        w.add_layer(MoELayer(0, 12, mats, "mean", base, residuals, perms, sources))
    restored = load_file(restore_checkpoint(tmp_path / "kq.rmoe", tmp_path / "out", original_order=True)
                         / "model.safetensors")
    assert export_main([str(tmp_path / "kq.rmoe"), "--to", "safetensors", str(tmp_path / "st"),
                        "--original-order"]) == 0
    exported = load_file(tmp_path / "st" / "model.safetensors")
    assert restored.keys() == exported.keys() == want.keys()
    for name, w in want.items():
        assert restored[name].dtype == np.float16
        np.testing.assert_array_equal(restored[name].view(np.uint16), w.view(np.uint16))
        np.testing.assert_array_equal(exported[name].view(np.uint16), w.view(np.uint16))
