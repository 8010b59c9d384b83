"""``resmoe-export FILE --to onnx OUT.onnx``: a .rmoe model as an ONNX graph for ONNX Runtime.

The model is built by the torch runtime (:func:`resmoe_format.torch.load_model`) in float32 and
traced by ``torch.onnx.export(dynamo=True)``: inputs ``input_ids`` and ``attention_mask`` (int64,
[batch, sequence], both axes dynamic), output ``logits``; no KV cache.

- ``dense``: experts restored dense, run by transformers' ``batched_mm`` experts code (a Gather of
  each (token, slot)'s expert weights and a batched MatMul; its default grouped-mm custom op has
  no ONNX translation, and its eager loop over experts is data dependent).
- ``lowrank``: every compressed layer keeps its barycenter and each expert's low-rank residual
  factors (:class:`LowRankExperts`), so the graph is about as small as the .rmoe file (k-quant
  barycenters and factors are stored dequantized, in float32).

The output appears atomically (with its ``.data`` file when weights are stored externally).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from resmoe_format import container
from resmoe_format.architectures import BY_MODEL_TYPE
from resmoe_format.errors import RmoeRuntimeError
from resmoe_format.publish import publish, scratch_dir

from ..errors import ConversionError

VARIANTS = ("dense", "lowrank")
#: transformers model types whose models export: the architecture records with ``onnx`` set.
SUPPORTED = tuple(sorted(t for t, f in BY_MODEL_TYPE.items() if f.onnx))
#: (batch, sequence) of the tracing example: torch.export specialises dimensions of size 1.
EXAMPLE_SHAPE = (2, 8)


def export_onnx(src: str | Path, out: str | Path, variant: str = "dense", *, opset: int | None = None,
                external_data: bool | None = None, ignore_ce: bool = False) -> Path:
    """Write ``src`` (.rmoe) as an ONNX model at ``out``; returns ``out``.

    ``variant``: ``dense`` (restored experts) or ``lowrank`` (barycenter + low-rank residual
    factors; needs a file converted with ``--residual svd``). ``opset``: the ONNX opset (default:
    the exporter's). ``external_data``: store weights in ``OUT.data`` (default: only when the
    model is too large for one protobuf). Raises ConversionError for bad input; nothing is left
    at ``out`` after a failure. A file with compressed experts (spec 4.5) is refused (ONNX Runtime has no
    such operation) unless ``ignore_ce``: then the full top-k model is exported.
    """
    src, out = Path(src), Path(out)
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConversionError(f"ONNX export needs {' and '.join(missing)}: pip install 'resmoe[export]'")
    if variant not in VARIANTS:
        raise ConversionError(f"ONNX variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if not out.parent.is_dir():
        raise ConversionError(f"output directory {out.parent} does not exist")
    model_type = check_file(src, variant, ignore_ce)
    try:
        model = build_model(src, variant)
    except RmoeRuntimeError as e:
        raise ConversionError(str(e)) from None
    program = _export(model, model_type, opset)
    _save(program, out, external_data)
    return out


def check_file(src: Path, variant: str, ignore_ce: bool = False) -> str:
    """The file's model type, once it is known that ``variant`` can be exported from it."""
    with container.open(src, verify_checksums=False) as r:  # load_model verifies them
        if not ignore_ce:
            from resmoe_format.compressed_experts import refuse_ce

            refuse_ce(r, "ONNX Runtime", ConversionError)
        model_type = (r.config() or {}).get("model_type") or r.model.get("model_type")
        if model_type not in SUPPORTED:
            fam = BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
            raise ConversionError(f"ONNX export supports model types {', '.join(SUPPORTED)}; not {model_type!r}"
                                  + (f" ({fam.onnx_reason})" if fam is not None and fam.onnx_reason else ""))
        _check_config(model_type, r.config() or {})
        if variant == "lowrank":
            _check_lowrank(r.layers)
    return model_type


def _check_config(model_type: str, cfg: dict) -> None:
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if model_type.startswith("deepseek") and kv is not None and kv != heads:
        # MLA attention has num_attention_heads key/value heads: transformers' traced (math) attention
        # repeats them num_attention_heads / num_key_value_heads times more and fails
        raise ConversionError(f"{model_type}: num_key_value_heads ({kv}) differs from num_attention_heads ({heads}); "
                              f"DeepSeek's attention exports only when they are equal (as in released checkpoints)")


def _check_lowrank(layers) -> None:
    for lay in layers:
        mats = [m.name for m in lay.matrices if len(m.shape) == 2]
        for e, records in enumerate(lay.residuals):
            for m in mats:
                ref = records.get(m)
                if ref is not None and ref.encoding != "lowrank":
                    hint = " --delta-format lowrank" if ref.encoding == "dense" else ""
                    raise ConversionError(f"--variant lowrank needs low-rank residuals, but layer {lay.index} expert "
                                          f"{e} stores {m} as {ref.encoding!r}: convert with resmoe-convert "
                                          f"--residual svd{hint}")


def build_model(src: Path, variant: str) -> nn.Module:
    """The float32 transformers model to trace: dense experts, or :class:`LowRankExperts`."""
    from resmoe_format.torch import FusedExperts, load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(src, mode="materialize" if variant == "dense" else "fused", dtype="fp32", n_ce=0)
    from resmoe_format.torch.ce import CEExperts

    for name, module in list(model.named_modules()):  # --ignore-ce: the full top-k experts
        if isinstance(module, CEExperts):
            model.set_submodule(name, module.inner)
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedExperts):
            model.set_submodule(name, LowRankExperts.from_fused(module))
    model.config.use_cache = False
    model.set_experts_implementation("batched_mm")  # experts layers the file does not compress
    return model


class LowRankExperts(nn.Module):
    """A compressed layer as export-friendly tensor code: no data-dependent control flow.

    For the S = T * k (token, slot) pairs, with expert e = B + U_e V_e per matrix (the weights of
    :class:`FusedExperts`, not rounded to the source dtype: spec 6.7):
    ``pre = x @ B_in.T + (x @ V_in,e.T) @ U_e.T (+ bias_e)``, ``h = activate(pre) * w`` and
    ``y = sum_slots h @ B_out + (h @ U_out,e) @ V_out,e (+ w bias_e)``. The barycenter input product
    is computed once per token and the output one once per token on the weighted sum of h (exact
    by distributivity). Factors are stacked per layer, ranks zero-padded to the layer's largest;
    an expert-scope file's U, shared by an expert's matrices, is stored once.
    """

    def __init__(self, kind, num_experts: int, n: int, u_in: torch.Tensor, v_in: torch.Tensor,
                 u_out: torch.Tensor | None, v_out: torch.Tensor, base_in: torch.Tensor | None,
                 base_out: torch.Tensor | None, bias_in: torch.Tensor | None, bias_out: torch.Tensor | None):
        super().__init__()
        self.kind, self.num_experts, self.n = kind, num_experts, n
        self.rank = v_out.shape[1]
        for name, t in (("u_in", u_in), ("v_in", v_in), ("u_out", u_out), ("v_out", v_out), ("base_in", base_in),
                        ("base_out", base_out), ("bias_in", bias_in), ("bias_out", bias_out)):
            self.register_buffer(name, t)

    @classmethod
    def from_fused(cls, fused) -> "LowRankExperts":
        """Stack a :class:`FusedExperts` layer's low-rank operators (ConversionError for any other); packed
        k-quant barycenters and factors are stored dequantized."""
        from resmoe_format.torch.residuals import as_tensor

        kind, n, E = fused.kind, fused.n, fused.num_experts
        M = len(kind.inputs)
        ops = [_expert_factors(fused, e) for e in range(E)]
        shared = all(len({id(op.u) for op in row if op is not None}) <= 1 for row in ops)
        factors = [[None if op is None else op.factors() for op in row] for row in ops]  # k-quant ones dequantized
        R = max([f[1].shape[0] for row in factors for f in row if f is not None] + [1])
        base_out = as_tensor(fused.base_out) if fused.base_out is not None else None
        base_in = as_tensor(fused.base_in) if fused.base_in is not None else None
        if fused.kept is not None:  # a pruned base (spec 4.7): the graph multiplies by it with zero rows
            base_in = torch.zeros(M * n, base_in.shape[1]).index_copy_(0, fused.kept_cols, base_in)
            base_out = torch.zeros(n, base_out.shape[1]).index_copy_(0, fused.kept, base_out)
        H = base_out.shape[1] if base_out is not None else next(
            f[1].shape[1] for row in factors for f in row if f is not None)  # FusedExperts: base or residuals
        u_in = torch.zeros(E, 1 if shared else M, R, n)  # U.T per expert (and per input unless shared)
        v_in = torch.zeros(E, H, M * R)  # V.T of every input side by side
        u_out = None if shared else torch.zeros(E, n, R)
        v_out = torch.zeros(E, R, H)
        for e, row in enumerate(factors):
            for i, f in enumerate(row):
                if f is None:
                    continue
                u, v = f
                r = v.shape[0]
                if shared or i < M:
                    u_in[e, 0 if shared else i, :r] = u.T
                else:
                    u_out[e, :, :r] = u
                if i < M:
                    v_in[e, :, i * R:i * R + r] = v.T
                else:
                    v_out[e, :r] = v
        base_in = base_in.T.contiguous() if base_in is not None else None
        biases = (fused.bias_in, fused.bias_out) if fused.biased else (None, None)
        return cls(kind, E, n, u_in, v_in, u_out, v_out, base_in, base_out, *biases)

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        x, index, weights = self.kind.routing(self.num_experts, hidden_states, top_k_index, top_k_weights)
        T, H = x.shape
        k = index.shape[1]
        M, n, R = len(self.kind.inputs), self.n, self.rank
        x = x.to(self.v_in.dtype)
        ids = index.clamp(max=self.num_experts - 1).reshape(-1)  # index == num_experts: no expert (weight 0)
        w = (weights * (index < self.num_experts)).reshape(-1, 1).to(x.dtype)
        xs = x.unsqueeze(1).expand(T, k, H).reshape(T * k, H)
        u = self.u_in[ids]  # (S, 1 or M, R, n)
        low = torch.bmm(xs.unsqueeze(1), self.v_in[ids]).reshape(T * k, M, 1, R)
        pre = torch.matmul(low, u).reshape(T * k, M * n)
        if self.base_in is not None:
            pre = pre + (x @ self.base_in).unsqueeze(1).expand(T, k, M * n).reshape(T * k, M * n)
        if self.bias_in is not None:
            pre = pre + self.bias_in[ids]
        h = self.kind.activate([pre[:, i * n:(i + 1) * n] for i in range(M)]) * w
        u_out = u[:, 0].transpose(1, 2) if self.u_out is None else self.u_out[ids]
        y = torch.bmm(torch.bmm(h.unsqueeze(1), u_out), self.v_out[ids]).squeeze(1)
        if self.bias_out is not None:
            y = y + self.bias_out[ids] * w
        out = y.reshape(T, k, H).sum(1)
        if self.base_out is not None:
            out = out + h.reshape(T, k, n).sum(1) @ self.base_out
        return out.to(hidden_states.dtype)


def _expert_factors(fused, e: int) -> list:
    """Expert e's LowRankResidual per input matrix, then the output's (None: no residual)."""
    from resmoe_format.torch.residuals import LowRankResidual

    n, M = fused.n, len(fused.kind.inputs)
    row = [None] * (M + 1)
    for a, b, op in fused.in_ops[e]:
        row[a // n] = op if b - a == n else None  # an operator over several matrices is a sparse CSR
    row[M] = fused.out_ops[e]
    ops = [op for a, b, op in fused.in_ops[e]] + [row[M]]
    bad = next((op for op in ops if op is not None and not isinstance(op, LowRankResidual)), None)
    if bad is not None:
        raise ConversionError(f"layer {fused.layer}: expert {e} has {type(bad).__name__} residuals, not low-rank "
                              f"ones: convert with resmoe-convert --residual svd")
    return row


class _Logits(nn.Module):
    """``(input_ids, attention_mask) -> logits`` without a cache: the traced function."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _export(model: nn.Module, model_type: str, opset: int | None):
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    ids = torch.full(EXAMPLE_SHAPE, 3, dtype=torch.long)
    axes = {0: batch, 1: seq}
    try:
        with warnings.catch_warnings(), _quiet_torch_onnx(), _real_rotary(model), torch.no_grad():
            warnings.simplefilter("ignore")
            return torch.onnx.export(_Logits(model).eval(), (ids, torch.ones_like(ids)), dynamo=True,
                                     input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                     dynamic_shapes=(axes, axes), opset_version=opset, verbose=False)
    except Exception as e:  # torch's exporter errors are pages long: report the root cause's first line
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        lines = str(root).strip().splitlines() or [""]
        raise ConversionError(f"torch.onnx.export failed for {model_type}: {type(root).__name__}: {lines[0]}") from e


@contextlib.contextmanager
def _quiet_torch_onnx():
    """Hide the exporter's warnings about optional packages (torchvision) it does not need here."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _real_rotary(model: nn.Module):
    """DeepSeek-V2's rotary embedding multiplies complex tensors, which ONNX cannot express; while
    tracing, the same rotation runs in real arithmetic (cos and sin pairs)."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if model.config.model_type != "deepseek_v2" or rotary is None:
        yield
        return
    from transformers.modeling_rope_utils import dynamic_rope_update
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as ds2

    original = ds2.apply_rotary_emb
    ds2.apply_rotary_emb = _apply_rotary_real
    rotary.forward = types.MethodType(dynamic_rope_update(_rotary_real), rotary)
    try:
        yield
    finally:
        ds2.apply_rotary_emb = original
        del rotary.forward


def _rotary_real(self, x, position_ids):
    """DeepseekV2RotaryEmbedding.forward with (cos, sin) in a last axis of 2 instead of complex values."""
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack((freqs.cos(), freqs.sin()), -1) * self.attention_scaling


def _apply_rotary_real(xq, xk, freqs):
    """modeling_deepseek_v2.apply_rotary_emb on :func:`_rotary_real`'s output."""
    cos, sin = freqs[..., 0].unsqueeze(1), freqs[..., 1].unsqueeze(1)

    def rotate(t):
        pairs = t.float().reshape(*t.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(3).type_as(t)

    return rotate(xq), rotate(xk)


def _save(program, out: Path, external_data: bool | None) -> None:
    """Save into a temporary folder beside ``out`` under the final names (the .onnx records its
    data file's name), then move the data file and the model into place."""
    with scratch_dir(out) as tmp:
        program.save(tmp / out.name, external_data=external_data)
        data = tmp / f"{out.name}.data"
        moved = data.exists()
        if moved:
            publish(data, out.parent / data.name)
        try:
            publish(tmp / out.name, out)
        except BaseException:
            if moved:
                (out.parent / data.name).unlink(missing_ok=True)
            raise


__all__ = ["export_onnx", "LowRankExperts", "SUPPORTED", "VARIANTS"]
