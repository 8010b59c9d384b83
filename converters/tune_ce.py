"""``resmoe-tune-ce``: train compressed experts (spec 4.5, version 6.0) on the user's text and write them into a
``.rmoe`` file.

SRC is a checkpoint (its experts are kept exactly: the file is first converted with ``--lossless``) or a
``.rmoe`` file (its records are copied as they are, whatever compression they hold). The model is built by
the runtime (:func:`resmoe_format.torch.load_model`, materialize mode, float32) from SRC with every vector
set to one, and AdamW trains the vectors (``--train-experts``: also the experts' matrices) on windows of the
text: by default to match the full top-k model's next-token distributions (KL divergence, ``--objective
distill``), on the language modelling loss (``--objective lm``), or block by block to match each MoE
block's full top-k output on the full model's hidden states (``--objective layer``); ``--schedule cosine`` decays
the learning rates. Data order is a function of (seed, step) only, so a run is deterministic for a seed and
resumes bit for bit from its state file ``OUT.ce-state`` (saved every ``checkpoint_every`` steps and at the end;
kept so that a later run with more ``--steps`` (the same with ``--schedule cosine``) and ``--resume`` continues it).
OUT is published atomically when training ends; a failed or killed run leaves none.
"""
from __future__ import annotations

import contextlib

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import ConversionError

STATE_SUFFIX = ".ce-state"
OBJECTIVES = ("lm", "distill", "layer")
SCHEDULES = ("constant", "cosine")


@contextlib.contextmanager
def swapped(params: list, values: list):
    """``params`` hold ``values`` inside the block (their storage exchanged, no copy), their own afterwards."""
    for p, v in zip(params, values):
        p.data, v.data = v.data, p.data
    try:
        yield
    finally:
        for p, v in zip(params, values):
            p.data, v.data = v.data, p.data


@dataclass
class TuneOptions:
    n_ce: int
    steps: int = 120
    #: chosen on the fine-grained fixture among a few settings (benchmarks/results/COMPRESSED_EXPERTS.md)
    lr: float = 3e-3
    train_experts: bool = False
    expert_lr: float = 2e-5
    seed: int = 0
    window: int = 256
    batch: int = 8
    device: str = "auto"
    resume: bool = False
    checkpoint_every: int = 50
    #: "distill": KL(full top-k || compressed) on the text, the full top-k model (the same model with n_ce = 0,
    #: its experts as SRC has them even while --train-experts changes them) as the teacher (the default: it lowers
    #: the held-out KL divergence where "lm" raised it); "lm": next-token loss on the text (the paper's SFT);
    #: "layer": per MoE block, the relative squared error of its output against the full top-k block's on the same
    #: input (the full top-k model's hidden states and routing, its experts as SRC has them), averaged over blocks
    objective: str = "distill"
    #: "constant": --lr (and --expert-lr) at every step; "cosine": both decay from their value at step 0 to 0 at step
    #: ``steps`` along a half cosine (a resumed run must then keep --steps: the schedule depends on it)
    schedule: str = "constant"


def read_text(path: str | os.PathLike) -> str:
    """The training text; refuses a missing, empty or binary (NUL bytes, not UTF-8) file."""
    from .encoders.calibrate import read_text as read

    return read(path, "--text")


def tokenize(text: str, tokenizer_json: bytes | None, window: int, where: str) -> np.ndarray:
    """Token ids of the training text under the model's tokenizer.json; at least one window of them."""
    from .encoders.calibrate import encode

    ids = encode(text, tokenizer_json, where, "--text")
    if ids.size < window + 1:
        raise ConversionError(f"--text {where}: yields {ids.size} tokens; one training window needs {window + 1} "
                              f"(give more text or a smaller --window)")
    return ids


def batch_windows(ids: np.ndarray, window: int, batch: int, seed: int, step: int) -> np.ndarray:
    """The (batch, window + 1) token windows of ``step``: non-overlapping windows of the text, each epoch in
    the order of a permutation drawn from (seed, epoch); a function of its arguments only (resumable)."""
    starts = np.arange(0, ids.size - window, window)
    n = starts.size
    out = []
    for j in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(j, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        s = starts[perm[pos]]
        out.append(ids[s:s + window + 1])
    return np.stack(out)


@dataclass
class Source:
    """What SRC is: its config (dict), the family's kind, its tokenizer.json and whether it is a .rmoe."""

    path: Path
    is_rmoe: bool
    config: dict
    tokenizer: bytes | None


def inspect_source(src: str | os.PathLike) -> Source:
    """Read SRC's config and tokenizer without loading weights (RmoeFormatError for a bad .rmoe)."""
    import resmoe_format

    p = Path(src)
    if p.is_file() and p.suffix != ".json" and not p.name.endswith(".safetensors"):
        with resmoe_format.open(p) as r:
            cfg = r.config()
            files = r.files
            if cfg is None:
                raise ConversionError(f"{p} embeds no config.json: the model cannot be built to train on")
            if not r.layers:
                raise ConversionError(f"{p} has no MoE layers: compressed experts need an MoE model")
            return Source(p, True, cfg, files.get("tokenizer.json"))
    root = p if p.is_dir() else p.parent
    try:
        cfg = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except OSError as e:
        raise ConversionError(f"{root / 'config.json'}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConversionError(f"{root / 'config.json'}: not valid JSON ({e})") from None
    tok = root / "tokenizer.json"
    return Source(p, False, cfg, tok.read_bytes() if tok.is_file() else None)


def check_model(cfg: dict, n_ce: int, where: str):
    """The expert kind of ``cfg`` after checking that it is a top-k (k >= 2) MoE the runtime builds and that
    ``n_ce`` leaves a main expert; RmoeRuntimeError/ConversionError before any work."""
    from resmoe_format.architectures import family_for
    from resmoe_format.torch.ce import check_n_ce
    from resmoe_format.torch.kinds import KINDS

    fam = family_for(cfg)
    if fam is None:
        raise ConversionError(f"{where}: model_type {cfg.get('model_type')!r} is not a Mixture-of-Experts model "
                              f"resmoe knows (a dense model has no experts to compress)")
    if fam.kind not in KINDS:
        raise ConversionError(f"{where}: the runtime cannot build {fam.name} models")
    import transformers

    config = transformers.AutoConfig.for_model(**cfg)
    kind = KINDS[fam.kind](config, fam)
    check_n_ce(config, kind, n_ce, "--n-ce")
    return kind


def _digest(src: Path, opts: TuneOptions, text: str) -> str:
    """What a state file must match to be resumed: everything but the number of steps, the device and the
    checkpoint interval."""
    free = ("steps", "resume", "checkpoint_every", "device") if opts.schedule == "constant" else \
        ("resume", "checkpoint_every", "device")  # a decaying schedule depends on --steps
    keep = {k: v for k, v in asdict(opts).items() if k not in free}
    if opts.schedule == "constant":
        del keep["schedule"]  # as before --schedule existed: such state files still resume
    h = hashlib.sha256(json.dumps(keep, sort_keys=True).encode())
    h.update(str(src.resolve()).encode())
    h.update(text.encode("utf-8"))
    return h.hexdigest()


def tune_ce(src: str | os.PathLike, out: str | os.PathLike, text_path: str | os.PathLike, opts: TuneOptions,
            progress: bool = True) -> dict:
    """Train compressed experts on the text at ``text_path`` and write SRC with them to ``out``; the report."""
    import torch

    from resmoe_format import open as open_rmoe
    from resmoe_format.compressed_experts import ones_vectors, read_vectors, write_with_vectors
    from resmoe_format.publish import atomic_path, scratch_path
    from resmoe_format.torch import load_model
    from resmoe_format.torch.ce import ce_modules, set_n_ce
    from resmoe_format.torch.tensors import resolve_device

    from .paths import check_paths, checkpoint_inputs

    src, out = Path(src), Path(out)
    t0 = time.perf_counter()
    # --- everything checked before any work -------------------------------------------------------------
    for name, v, lo in (("--steps", opts.steps, 1), ("--window", opts.window, 2), ("--batch", opts.batch, 1),
                        ("--checkpoint-every", opts.checkpoint_every, 1)):
        if not isinstance(v, int) or v < lo:
            raise ConversionError(f"{name} {v}: must be an integer >= {lo}")
    if opts.objective not in OBJECTIVES:
        raise ConversionError(f"--objective {opts.objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if opts.schedule not in SCHEDULES:
        raise ConversionError(f"--schedule {opts.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if not (opts.lr > 0 and np.isfinite(opts.lr)) or not (opts.expert_lr > 0 and np.isfinite(opts.expert_lr)):
        raise ConversionError(f"--lr {opts.lr} / --expert-lr {opts.expert_lr}: must be positive")
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory")
    inputs = [src, Path(text_path)] if src.is_file() else checkpoint_inputs(src) + [Path(text_path)]
    state_path = Path(str(out) + STATE_SUFFIX)
    check_paths(inputs, files=[out, state_path], force=True, forceable=False)
    info = inspect_source(src)
    kind = check_model(info.config, opts.n_ce, str(src))
    if opts.train_experts and info.is_rmoe:
        raise ConversionError(f"--train-experts: {src} is a .rmoe file; fine-tuned experts would have to be "
                              f"compressed again, which resmoe-tune-ce does not do: give the checkpoint, or "
                              f"train the vectors only")
    text = read_text(text_path)
    ids = tokenize(text, info.tokenizer, opts.window, str(text_path))
    device = resolve_device(opts.device)
    digest = _digest(src, opts, text)
    state = None
    if opts.resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)  # never unpickle code from a file
        if state.get("digest") != digest:
            raise ConversionError(f"--resume: {state_path} was saved for another SRC, text or other options; "
                                  f"remove it or run without --resume")
        if state["step"] > opts.steps:
            raise ConversionError(f"--resume: {state_path} is at step {state['step']}, beyond --steps {opts.steps}")

    report: dict = {"source": str(src), "output": str(out), "text": str(text_path), "tokens": int(ids.size),
                    "options": asdict(opts), "device": str(device)}
    with scratch_path(out) as lossless, scratch_path(out) as init:
        # --- the .rmoe the vectors are added to, and the model with vectors of ones ---------------------
        base = src
        if not info.is_rmoe:
            from .convert import ConvertOptions, convert

            convert(src, lossless, ConvertOptions(lossless=True), progress=progress)
            base = lossless
        with open_rmoe(base) as r:
            have, have_n = read_vectors(r)
            start = have if have and have_n == opts.n_ce and len(have) == len(r.layers) else ones_vectors(r)
            write_with_vectors(r, init, start, opts.n_ce)
        torch.manual_seed(opts.seed)
        model = load_model(init, "materialize", device=device, dtype="fp32", n_ce=opts.n_ce)
        layers = ce_modules(model)
        vec_params = [m.vectors for m in layers]
        for p in vec_params:
            p.requires_grad_(True)
        groups = [{"params": vec_params, "lr": opts.lr}]
        expert_params: list = []
        if opts.train_experts:
            expert_params = [p for m in layers for p in m.inner.parameters()]
            for p in expert_params:
                p.requires_grad_(True)
            groups.append({"params": expert_params, "lr": opts.expert_lr})
        base_lrs = [g["lr"] for g in groups]
        optim = torch.optim.AdamW(groups, weight_decay=0.0)
        # distill with --train-experts: the teacher is the full top-k of the experts as SRC has them, not of the
        # experts being trained (a teacher that moves with them can agree with the student by getting worse)
        frozen = [p.detach().clone() for p in expert_params] if opts.objective in ("distill", "layer") else []
        step, losses = 0, []
        if state is not None:
            with torch.no_grad():
                for p, v in zip(vec_params + expert_params, state["params"]):
                    p.copy_(v.to(p.device))
            optim.load_state_dict(state["optimizer"])
            step, losses = state["step"], list(state["losses"])
        report["resumed_from"] = step

        def save_state() -> None:
            with atomic_path(state_path) as tmp:
                torch.save({"digest": digest, "step": step, "losses": losses,
                            "params": [p.detach().cpu() for p in vec_params + expert_params],
                            "optimizer": optim.state_dict()}, tmp)

        from tqdm import tqdm

        bar = tqdm(total=opts.steps, initial=step, desc=f"tune-ce n_ce={opts.n_ce}", unit="step",
                   disable=not progress)
        model.train(False)  # no dropout: the loss is a function of the parameters and the data only
        while step < opts.steps:
            x = torch.from_numpy(batch_windows(ids, opts.window, opts.batch, opts.seed, step)).to(device)
            scale = lr_scale(opts.schedule, step, opts.steps)
            for g, lr in zip(optim.param_groups, base_lrs):
                g["lr"] = lr * scale
            if opts.objective == "distill":
                set_n_ce(model, 0)
                with torch.no_grad(), swapped(expert_params, frozen):
                    teacher = torch.log_softmax(model(input_ids=x[:, :-1], use_cache=False).logits.float(), -1)
                set_n_ce(model, opts.n_ce)
            if opts.objective == "layer":
                loss = layer_loss(model, layers, x[:, :-1], opts.n_ce, expert_params, frozen)
            else:
                logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
            if opts.objective == "distill":
                student = torch.log_softmax(logits, -1)
                loss = (teacher.exp() * (teacher - student)).sum(-1).mean()
            elif opts.objective == "lm":
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            if not torch.isfinite(loss):
                raise ConversionError(f"step {step}: the loss is {loss.item()} (lower --lr)")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix_str(f"loss {losses[-1]:.4f}")
            if step % opts.checkpoint_every == 0 or step == opts.steps:
                save_state()
        bar.close()
        vectors = {lay_idx: m.vectors.detach().cpu().numpy().astype(np.float32)
                   for lay_idx, m in zip(_layer_indices(init), layers)}
        method = {"method": "compressed_experts", "n_ce": opts.n_ce, "steps": opts.steps, "lr": opts.lr,
                  "seed": opts.seed, "window": opts.window, "batch": opts.batch, "text_tokens": int(ids.size),
                  "train_experts": opts.train_experts, "objective": opts.objective, "schedule": opts.schedule,
                  "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
        if opts.train_experts:
            with scratch_path(out) as tuned:
                _write_tuned_experts(model, layers, lossless, tuned, kind, progress)
                with open_rmoe(tuned) as r:
                    write_with_vectors(r, out, vectors, opts.n_ce, method)
        else:
            with open_rmoe(base) as r:
                write_with_vectors(r, out, vectors, opts.n_ce, method)
    report.update(losses=losses, seconds=time.perf_counter() - t0, **{k: method[k] for k in ("loss_first",
                                                                                            "loss_last")})
    return report


def lr_scale(schedule: str, step: int, steps: int) -> float:
    """The factor on the learning rates at ``step`` (0-based) of ``steps``: 1 ("constant"), or a half cosine from 1
    at step 0 towards 0 at ``steps`` ("cosine")."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + float(np.cos(np.pi * step / steps)))


def layer_loss(model, layers: list, x, n_ce: int, expert_params: list, frozen: list):
    """The "layer" objective on input ids ``x``: the mean over blocks of :func:`block_errors`."""
    errors = block_errors(model, layers, x, n_ce, expert_params, frozen)
    return sum(errors) / len(errors)


def block_errors(model, layers: list, x, n_ce: int, expert_params: list, frozen: list) -> list:
    """Per compressed-experts block of ``model`` (``layers``, in call order), on input ids ``x``: the full top-k
    model (n_ce = 0, its experts ``frozen``: SRC's) runs once without gradients while hooks keep every block's
    inputs and output; then each block runs again at ``n_ce`` on those same inputs, and its error is
    sum((y - y_full)^2) / sum(y_full^2). A block's vectors so see the hidden states and routing of the model they
    stand in for, and the backward pass goes through the experts blocks only."""
    import torch

    from resmoe_format.torch.ce import set_n_ce

    seen: list = []

    def keep(mod, args, kwargs, out):
        seen.append((args, kwargs, out.detach()))

    handles = [m.register_forward_hook(keep, with_kwargs=True) for m in layers]
    try:
        set_n_ce(model, 0)
        with torch.no_grad(), swapped(expert_params, frozen):
            model(input_ids=x, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        set_n_ce(model, n_ce)
    if len(seen) != len(layers):
        raise ConversionError(f"--objective layer: {len(seen)} experts-block calls in one forward pass for "
                              f"{len(layers)} blocks")
    out = []
    for m, (args, kwargs, target) in zip(layers, seen):
        y = m(*args, **kwargs).float()
        t = target.float()
        out.append(((y - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-30))
    return out


def _layer_indices(path: Path) -> list[int]:
    from resmoe_format import open as open_rmoe

    with open_rmoe(path) as r:  # the order load_model patches layers in, which ce_modules finds them in
        return [lay.index for lay in r.layers]


def _write_tuned_experts(model, layers, lossless: Path, out: Path, kind, progress: bool) -> None:
    """Re-write the lossless file ``lossless`` with the fine-tuned experts of ``layers`` (CEExperts over
    transformers' experts modules, in file order): a checkpoint of the tuned weights in the source dtypes
    (the format's own assembly rules, spec 6.5), converted with ``--lossless`` again."""
    import torch
    from safetensors.torch import save_file

    from resmoe_format import open as open_rmoe
    from resmoe_format.publish import scratch_dir
    from resmoe_format.restore import assemble
    from resmoe_format.torch.tensors import TORCH_DTYPES, to_torch

    from .convert import ConvertOptions, convert

    with open_rmoe(lossless) as r, scratch_dir(out) as ckpt:
        tensors = {}
        for name, arr in r.passthrough_tensors():
            tensors[name] = to_torch(arr, copy=True)
        for lay, mod in zip(r.layers, layers):
            experts = []
            for e in range(lay.num_experts):
                mats = kind.read_dense(mod.inner, e)
                experts.append({m.name: mats[m.name].detach().to("cpu", TORCH_DTYPES[m.dtype]).float().numpy()
                                for m in lay.matrices})
            for s in lay.sources:
                tensors[s.name] = torch.from_numpy(np.ascontiguousarray(assemble(lay, s, experts))).to(
                    TORCH_DTYPES[s.dtype])
        save_file(tensors, str(ckpt / "model.safetensors"))
        for path, data in r.files.items():
            (ckpt / path).parent.mkdir(parents=True, exist_ok=True)
            (ckpt / path).write_bytes(data)
        convert(ckpt, out, ConvertOptions(lossless=True), progress=progress)
