"""``--calibration FILE``: the inputs each expert sees, for GPTQ and for an output-error allocation.

The text is tokenized with the checkpoint's own tokenizer and run through the source model (float32,
transformers) in windows; a hook on every compressed experts module records the tokens routed to
each expert. Per expert the converter then forms the Hessians of its matrices' inputs: X^T X / N for
the input matrices (gate, up) and h^T h / N for the output matrix (down), h = act(x gate^T) * (x up^T)
computed with the source weights. An expert that the router gives fewer than ``MIN_EXPERT_TOKENS``
tokens is topped up with other calibration tokens (expert-balanced calibration, as MoEQuant argues),
so that no expert is quantized against a handful of samples.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConversionError

#: tokens every expert's Hessian is built from at least (routed ones first, then others)
MIN_EXPERT_TOKENS = 256
#: calibration tokens used at most (the rest of a longer file is ignored)
MAX_TOKENS = 65536
WINDOW = 256


def read_text(path: str | Path) -> str:
    """The calibration text; refuses an empty or binary file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConversionError(f"--calibration {p}: {e.strerror or e}") from None
    if not data.strip():
        raise ConversionError(f"--calibration {p}: the file is empty")
    if b"\0" in data:
        raise ConversionError(f"--calibration {p}: a binary file (NUL bytes); give UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConversionError(f"--calibration {p}: not UTF-8 text (byte {e.start}); give UTF-8 text") from None


def tokenize(text: str, tokenizer_json: bytes | None, where: str) -> np.ndarray:
    """Token ids of ``text`` under the checkpoint's tokenizer.json; at least MIN_EXPERT_TOKENS of them."""
    if tokenizer_json is None:
        raise ConversionError(f"--calibration {where}: the checkpoint has no tokenizer.json to tokenize it with")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ConversionError(f"--calibration {where}: the checkpoint's tokenizer.json does not load ({e})") from None
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    if ids.size < MIN_EXPERT_TOKENS:
        raise ConversionError(f"--calibration {where}: yields {ids.size} tokens; one expert needs at least "
                              f"{MIN_EXPERT_TOKENS}")
    return ids[:MAX_TOKENS]


@dataclass
class LayerInputs:
    """What one experts module received: hidden states (T, H) and routed expert indices (T, k)."""

    x: torch.Tensor
    index: torch.Tensor


def _source_model(src: Path, config: dict):
    import transformers

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None:
        raise ConversionError(f"--calibration: transformers has no model class {arch!r} to run the source model")
    import json

    with tempfile.TemporaryDirectory(prefix="resmoe-calib-") as tmp:
        files = [src] if src.is_file() else [p for p in src.iterdir() if p.suffix == ".safetensors"
                                               or p.name.endswith(".safetensors.index.json")]
        for p in files:
            name = "model.safetensors" if src.is_file() else p.name
            os.symlink(p.resolve(), Path(tmp) / name)
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_pretrained(tmp, dtype=torch.float32).eval()


def collect(src: str | Path, config: dict, layouts, ids: np.ndarray, device: torch.device) -> dict[int, LayerInputs]:
    """Run the source model over ``ids`` and record each compressed layer's expert inputs."""
    from resmoe_format.torch.kinds import kind_for
    from resmoe_format.torch.load import _Names

    model = _source_model(Path(src), config).to(device)
    kind = kind_for(model.config)
    names = _Names(model)
    got: dict[int, list] = {lay.index: [] for lay in layouts}
    hooks = []

    def hook_for(lay):
        def pre(module, args, kwargs):
            vals = list(args) + list(kwargs.values())
            if len(vals) < 3 or not torch.is_tensor(vals[0]) or not torch.is_tensor(vals[1]):
                raise ConversionError(f"--calibration: layer {lay.index}'s experts module is not called with "
                                      f"(hidden states, expert index, weights); calibration cannot read it")
            x, index, _ = kind.routing(lay.num_experts, vals[0], vals[1], vals[2])
            got[lay.index].append((x.detach().float().reshape(-1, x.shape[-1]).cpu(),
                                   index.detach().reshape(x.shape[0] if x.dim() == 2 else -1, -1).cpu()))
        return pre

    try:
        for lay in layouts:
            hooks.append(model.get_submodule(names.module(lay.prefix)).register_forward_pre_hook(
                hook_for(lay), with_kwargs=True))
        with torch.no_grad():
            for i in range(0, ids.size, WINDOW):
                window = torch.from_numpy(ids[i:i + WINDOW])[None].to(device)
                model(input_ids=window)
    finally:
        for h in hooks:
            h.remove()
        del model
    return {k: LayerInputs(torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for k, v in got.items()}


@dataclass
class ExpertHessians:
    """Per matrix name, the input Hessian (for GPTQ) and the expert's share of routed tokens."""

    hessians: dict[str, torch.Tensor]
    share: float
    tokens: int


def expert_hessians(inputs: LayerInputs, experts: list[dict[str, torch.Tensor]], kind, device: torch.device
                    ) -> list[ExpertHessians]:
    """Hessians of every expert's matrices from its routed (and, below MIN_EXPERT_TOKENS, topped-up)
    tokens, with the source weights in canonical orientation (original expert order)."""
    x = inputs.x.to(device)
    total = x.shape[0]
    out = []
    for e, mats in enumerate(experts):
        routed = (inputs.index == e).any(dim=1).to(device)
        n_routed = int(routed.sum())
        rows = torch.nonzero(routed).reshape(-1)
        if n_routed < MIN_EXPERT_TOKENS:
            others = torch.nonzero(~routed).reshape(-1)[:MIN_EXPERT_TOKENS - n_routed]
            rows = torch.cat([rows, others])
        xe = x[rows]
        h_in = xe.T @ xe / xe.shape[0]
        pre = []
        for j, name in enumerate(kind.inputs):
            p = xe @ mats[name].T
            if kind.input_biases:
                p = p + mats[kind.input_biases[j]]
            pre.append(p)
        h = kind.activate(pre)
        h_out = h.T @ h / h.shape[0]
        hs = {name: h_in for name in kind.inputs}
        hs[kind.output] = h_out
        # an expert the calibration text barely reaches still counts (held-out text may route to it)
        out.append(ExpertHessians(hs, max(n_routed, MIN_EXPERT_TOKENS // 4) / total, n_routed))
    return out
