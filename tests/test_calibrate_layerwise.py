"""--calibration runs the source model one decoder layer at a time: the expert inputs it records equal
those of the whole model's forward, and no two decoder layers hold weights at once."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from converters.architectures import adapter_for
from converters.checkpoint import Checkpoint
from converters.encoders import calibrate
from converters.encoders.layerwise import LayerwiseModel, Spill
from converters.errors import ConversionError
from hf_models import ARCHS, build_checkpoint, load_model

#: the default run covers a plain decoder, one with a dense first layer and MLA, one with sliding-window
#: layers and biases and one with its own router; the rest run with -m slow
_FAST = ("mixtral", "deepseek_v3", "gpt_oss", "phimoe")
DECODERS = [a if a in _FAST else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS if a != "switch"]
#: two window lengths: a full WINDOW and a remainder
TOKENS = calibrate.WINDOW + 37


def _reference(src, moe_layouts, wanted, ids):
    """Each wanted layer's expert inputs recorded on the whole model's forward (transformers loads it)."""
    from resmoe_format.torch.kinds import kind_for
    from resmoe_format.torch.load import CheckpointNames

    model = load_model(src)
    kind = kind_for(model.config)
    names = CheckpointNames(model)
    got = {lay.index: ([], []) for lay in moe_layouts if lay.index in wanted}
    hooks = []
    for lay in moe_layouts:
        if lay.index not in wanted:
            continue

        def pre(module, args, kwargs, lay=lay):
            vals = list(args) + list(kwargs.values())
            x, index, _ = kind.routing(lay.num_experts, vals[0], vals[1], vals[2])
            x = x.reshape(-1, x.shape[-1])
            got[lay.index][0].append(x.detach().clone())
            got[lay.index][1].append(index.detach().reshape(x.shape[0], -1).clone())
        hooks.append(model.get_submodule(names.module(lay.prefix)).register_forward_pre_hook(pre, with_kwargs=True))
    with torch.no_grad():
        for i in range(0, ids.size, calibrate.WINDOW):
            model(input_ids=torch.from_numpy(ids[i:i + calibrate.WINDOW])[None])
    return {k: (torch.cat(a), torch.cat(b)) for k, (a, b) in got.items()}


def _overrides(arch):
    if arch == "gpt_oss":  # a sliding-window layer between full ones: each layer gets its own mask
        return {"layer_types": ["full_attention", "sliding_attention", "full_attention"], "sliding_window": 8}
    return None


@pytest.mark.parametrize("arch", DECODERS)
def test_layerwise_inputs_equal_the_whole_models(tmp_path, arch):
    src = build_checkpoint(arch, tmp_path / "ckpt", "bf16", num_layers=3, overrides=_overrides(arch))
    ids = np.random.default_rng(0).integers(3, 64, TOKENS)
    with Checkpoint(src) as ckpt:
        moe = adapter_for(ckpt.config, ckpt.tensors).moe_layers()
        compressed = moe[1:]  # the first MoE layer is run, not recorded
        got = calibrate.collect(ckpt, moe, compressed, ids, torch.device("cpu"))
    ref = _reference(src, moe, {lay.index for lay in compressed}, ids)
    assert set(got) == set(ref) == {lay.index for lay in compressed}
    for k, (x, index) in ref.items():
        assert got[k].x.shape == x.shape == (TOKENS, x.shape[1])
        torch.testing.assert_close(got[k].x, x, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[k].index, index)


def test_one_decoder_layer_holds_weights_at_a_time(tmp_path, monkeypatch):
    src = build_checkpoint("mixtral", tmp_path / "ckpt", "fp32", num_layers=4)
    ids = np.random.default_rng(1).integers(3, 64, TOKENS)
    seen = []
    run_layer = LayerwiseModel.run_layer

    def spy(self, layer, i, *a):
        seen.append((i, [j for j, lay in enumerate(self.layers)
                          if any(not p.is_meta for p in lay.parameters())]))
        return run_layer(self, layer, i, *a)

    monkeypatch.setattr(LayerwiseModel, "run_layer", spy)
    with Checkpoint(src) as ckpt:
        moe = adapter_for(ckpt.config, ckpt.tensors).moe_layers()
        calibrate.collect(ckpt, moe, moe[2:3], ids, torch.device("cpu"))
    assert seen == [(0, [0]), (1, [1]), (2, [2])]  # layer 3 comes after the last compressed one: not run


def test_spilled_rows_round_trip_and_have_no_name_on_disk(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    s = Spill(1000, 16)
    a = np.random.default_rng(2).standard_normal((1000, 16)).astype(np.float32)
    s.write(0, a[:600])
    s.write(600, a[600:])
    assert np.array_equal(s.read(), a) and np.array_equal(s.read(590, 610), a[590:610])
    assert s.read(990, 2000).shape == (10, 16)
    with pytest.raises(ValueError, match="do not fit"):
        s.write(999, a[:2])
    assert list(tmp_path.iterdir()) == []


def test_encoder_decoder_models_are_refused_before_any_work(tmp_path):
    src = build_checkpoint("switch", tmp_path / "ckpt", "fp32")
    with Checkpoint(src) as ckpt, pytest.raises(ConversionError, match="decoder-only models one layer at a time"):
        calibrate.check_model(ckpt.config)
