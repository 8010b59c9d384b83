"""``--calibration FILE``: the inputs each expert sees, for GPTQ and for an output-error allocation.

The text is tokenized with the checkpoint's own tokenizer and run through the source model (float32,
transformers) in windows, one decoder layer at a time (:mod:`.layerwise`); a hook on every compressed
experts module records the tokens routed to each expert, spilled to unnamed temporary files. Per
expert the converter then forms the Hessians of its matrices' inputs: X^T X / N for
the input matrices (gate, up) and h^T h / N for the output matrix (down), h = act(x gate^T) * (x up^T)
computed with the source weights. An expert that the router gives fewer than ``MIN_EXPERT_TOKENS``
tokens is topped up with other calibration tokens (expert-balanced calibration, as MoEQuant argues),
so that no expert is quantized against a handful of samples.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConversionError
from .layerwise import Spill

#: tokens every expert's Hessian is built from at least (routed ones first, then others)
MIN_EXPERT_TOKENS = 256
#: calibration tokens used at most (the rest of a longer file is ignored)
MAX_TOKENS = 65536
WINDOW = 256


def read_text(path: str | Path, flag: str = "--calibration") -> str:
    """The text of the file ``flag`` names; refuses a missing, empty or binary (NUL bytes, not UTF-8) file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConversionError(f"{flag} {p}: {e.strerror or e}") from None
    if not data.strip():
        raise ConversionError(f"{flag} {p}: the file is empty")
    if b"\0" in data:
        raise ConversionError(f"{flag} {p}: a binary file (NUL bytes); give UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConversionError(f"{flag} {p}: not UTF-8 text (byte {e.start}); give UTF-8 text") from None


def encode(text: str, tokenizer_json: bytes | None, where: str, flag: str = "--calibration") -> np.ndarray:
    """Token ids (int64) of ``text`` under the checkpoint's tokenizer.json."""
    if tokenizer_json is None:
        raise ConversionError(f"{flag} {where}: the checkpoint has no tokenizer.json to tokenize it with")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ConversionError(f"{flag} {where}: the checkpoint's tokenizer.json does not load ({e})") from None
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def tokenize(text: str, tokenizer_json: bytes | None, where: str) -> np.ndarray:
    """Token ids of ``text`` under the checkpoint's tokenizer.json; at least MIN_EXPERT_TOKENS of them."""
    ids = encode(text, tokenizer_json, where)
    if ids.size < MIN_EXPERT_TOKENS:
        raise ConversionError(f"--calibration {where}: yields {ids.size} tokens; one expert needs at least "
                              f"{MIN_EXPERT_TOKENS}")
    return ids[:MAX_TOKENS]


@dataclass
class LayerInputs:
    """What one experts module received: ``tokens`` hidden states (spilled to a file) and the routed
    expert indices (T, k)."""

    rows: Spill
    tokens: int
    index: torch.Tensor

    @property
    def x(self) -> torch.Tensor:
        """The hidden states (T, H), read from the spill file."""
        return torch.from_numpy(self.rows.read(0, self.tokens))


def check_model(config: dict) -> None:
    """Refuse, from config.json alone, a model that calibration cannot run one layer at a time."""
    from resmoe_format.torch.load import meta_model

    from .layerwise import decoder_layers, model_class

    cfg, cls = model_class(config)
    decoder_layers(meta_model(cls, cfg, torch.float32))


class _Recorder:
    """A forward pre-hook on one experts module: its input rows go to a spill file, its routing to a list."""

    def __init__(self, lay, kind, capacity: int, width: int):
        self.lay, self.kind = lay, kind
        self.rows = Spill(capacity, width)
        self.filled = 0
        self.index: list[torch.Tensor] = []

    def __call__(self, module, args, kwargs) -> None:
        vals = list(args) + list(kwargs.values())
        if len(vals) < 3 or not torch.is_tensor(vals[0]) or not torch.is_tensor(vals[1]):
            raise ConversionError(f"--calibration: layer {self.lay.index}'s experts module is not called with "
                                  f"(hidden states, expert index, weights); calibration cannot read it")
        x, idx, _ = self.kind.routing(self.lay.num_experts, vals[0], vals[1], vals[2])
        x = x.detach().float().reshape(-1, x.shape[-1])
        if self.filled + x.shape[0] > self.rows.shape[0]:
            raise ConversionError(f"--calibration: layer {self.lay.index}'s experts module received more rows "
                                  f"than there are calibration tokens")
        self.rows.write(self.filled, x.cpu().numpy())
        self.filled += x.shape[0]
        self.index.append(idx.detach().reshape(x.shape[0], -1).cpu())


def collect(ckpt, moe_layouts, layouts, ids: np.ndarray, device: torch.device, progress: bool = False,
            recorded: Callable[[Any, LayerInputs], None] | None = None) -> dict[int, LayerInputs]:
    """Run the source model over ``ids`` one decoder layer at a time and record each compressed
    layer's expert inputs (spilled to unnamed temporary files, not held in memory).

    ``moe_layouts``: every MoE layer of the checkpoint; ``layouts``: the compressed ones (a layer's inputs do
    not depend on which others are recorded); ``recorded``: as for :func:`forward`.
    """
    from .layerwise import LayerwiseModel

    run = LayerwiseModel(ckpt, moe_layouts, device)
    wanted = {lay.index for lay in layouts}
    last = max(i for i, pairs in run.moe.items() for lay, _ in pairs if lay.index in wanted)
    return forward(run, wanted, ids, last, progress, recorded=recorded)[2]


def forward(run, wanted: set[int], ids: np.ndarray, upto: int, progress: bool = False, desc: str = "calibrating",
            before: Callable[[int, Spill], None] | None = None,
            recorded: Callable[[Any, LayerInputs], None] | None = None) -> tuple[Spill, dict, dict[int, LayerInputs]]:
    """Decoder layers 0..``upto`` of ``run`` (a :class:`.layerwise.LayerwiseModel`) over ``ids``, recording the
    experts modules of the MoE layers ``wanted``: (the last layer's output hidden states, what the layers are
    passed, the recorded inputs by layer). ``before(i, hidden)`` sees each layer's input; ``recorded(layout,
    inputs)`` each layer's recording as soon as it is made."""
    from tqdm import tqdm

    hidden, calls = run.embed(ids, WINDOW, upto)
    got: dict[int, LayerInputs] = {}
    for i in tqdm(range(upto + 1), desc=desc, unit="layer", disable=not progress, leave=False):
        layer = run.load_layer(i)
        here = [(lay, path) for lay, path in run.moe.get(i, []) if lay.index in wanted]
        rec = [_Recorder(lay, run.kind, ids.size, hidden.shape[1]) for lay, path in here]
        hooks = [run.model.get_submodule(path).register_forward_pre_hook(r, with_kwargs=True)
                 for r, (_, path) in zip(rec, here)]
        if before is not None:
            before(i, hidden)
        try:
            run.run_layer(layer, i, hidden, calls, WINDOW)
        finally:
            for h in hooks:
                h.remove()
            run.drop_layer(i)
        for r in rec:
            got[r.lay.index] = LayerInputs(r.rows, r.filled, torch.cat(r.index))
            if recorded is not None:
                recorded(r.lay, got[r.lay.index])
    return hidden, calls, got


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
        h = kind.intermediate(xe, mats)
        h_out = h.T @ h / h.shape[0]
        hs = {name: h_in for name in kind.inputs}
        hs[kind.output] = h_out
        # an expert the calibration text barely reaches still counts (held-out text may route to it)
        out.append(ExpertHessians(hs, max(n_routed, MIN_EXPERT_TOKENS // 4) / total, n_routed))
    return out
