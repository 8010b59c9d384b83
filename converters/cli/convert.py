"""resmoe-convert: a Hugging Face MoE checkpoint to .rmoe (ResMoE or a baseline)."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from .common import missing_extra, run_cli


def parser() -> argparse.ArgumentParser:
    """The command's flags (imports the encoders, so it needs the ``[convert]`` extra: torch, scipy)."""
    from ..emit import DELTA_FORMATS
    from ..encoders.budget import DEFAULT_KEEP
    from ..encoders.compress import SCOPES
    from ..encoders.methods import METHODS, RESIDUALS

    ap = argparse.ArgumentParser(
        prog="resmoe-convert",
        description="Compress the experts of a Hugging Face MoE checkpoint into a .rmoe file.",
        epilog="Budgets: --keep F stores F of each compressed layer's expert parameters in total, the shared "
               "barycenter included (ResMoE residuals then keep F - 1/E each); --residual-keep F is the paper's "
               "convention, each residual keeps F and the barycenter comes on top.")
    ap.add_argument("src", nargs="?", help="model.safetensors file or checkpoint directory (single file or sharded)")
    ap.add_argument("out", nargs="?", help="output .rmoe file")
    ap.add_argument("--config", help="config.json (default: beside SRC)")
    ap.add_argument("--method", default="resmoe", choices=sorted(METHODS), help="encoder (default resmoe)")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=float, help=f"total fraction of expert parameters kept, base included "
                        f"(default {DEFAULT_KEEP})")
    budget.add_argument("--residual-keep", type=float, help="fraction each residual keeps; the base comes on top")
    ap.add_argument("--bits", type=float, metavar="B",
                    help="k-quant bases and residuals at B bits per expert weight in total (codes, scales, base "
                         "and permutations counted as resmoe-inspect counts them); the converter chooses per layer, "
                         "matrix and expert whether to keep a base and every bit width")
    ap.add_argument("--calibration", metavar="FILE.txt",
                    help="with --bits: text (tokenized with the checkpoint's tokenizer) run through the source "
                         "model; GPTQ on each expert's routed inputs and an output-error allocation. With --method "
                         "d2moe (required): Fisher information, routing frequencies and the deltas' whitening")
    ap.add_argument("--sparse-residuals", action="store_true",
                    help="with --bits: also let the allocator store residuals sparse (a bitmap of their largest "
                         "entries, values ternary/q2/q3); off by default: on benchmarks/EVAL.md's upcycled fixture "
                         "it lowers the weight error but raises perplexity and KLD")
    ap.add_argument("--lowrank-residuals", action="store_true",
                    help="with --bits: also let the allocator store residuals as low-rank factors (5, 10 or 25%% of "
                         "the singular directions, q3/q4 factors); off by default (see benchmarks/results/EVAL.md)")
    ap.add_argument("--share-v", action="store_true",
                    help="d2moe: one input-side factor per delta matrix, shared by all experts of a layer")
    ap.add_argument("--prune-base", type=float, metavar="F",
                    help="d2moe: remove the fraction F of the base's intermediate channels (calibration scores, in "
                         "multiples of 64 where the size allows); the budget's freed parameters go to the deltas")
    ap.add_argument("--allow-unrouted-experts", action="store_true",
                    help="d2moe: convert even when the calibration text routes no token to some expert (a dead "
                         "expert): it gets no weight in the Fisher merge and an unwhitened delta; the report lists it")
    ap.add_argument("--residual", choices=RESIDUALS, help="residual compression (default prune; svd for --method svd)")
    ap.add_argument("--residual-scope", choices=SCOPES, default="expert",
                    help="expert: one pruning threshold / one SVD over each expert's whole residual design matrix "
                         "(as the ResMoE reference); matrix: each matrix on its own")
    ap.add_argument("--rank", type=int, help="fixed SVD rank instead of the budget's")
    ap.add_argument("--layers", default="all", help="MoE layers to compress: all, top:N, bottom:N or a list such as "
                    "3,5,8-11 (the others pass through)")
    ap.add_argument("--value-dtype", choices=("bf16", "fp16", "fp32", "int8"),
                    help="dtype of stored residual values (default: the source dtype)")
    ap.add_argument("--base-dtype", choices=("bf16", "fp16", "fp32", "int8"),
                    help="dtype of the stored barycenter (default: the source dtype; int8 with per-row scales)")
    ap.add_argument("--delta-format", choices=DELTA_FORMATS, default="auto",
                    help="residual encoding (auto: the smallest for each matrix)")
    ap.add_argument("--lossless", action="store_true", help="keep everything, entropy coded (spec 5.11); "
                    "resmoe-restore --original-order then gives the source back bit for bit")
    ap.add_argument("--compress-passthrough", action="store_true", help="with --lossless: code the non-expert "
                    "tensors (embeddings, attention, norms) too, where that saves bytes")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto: CUDA when present)")
    ap.add_argument("--max-iter", type=int, help="resmoe: barycenter iterations at most (default 100)")
    ap.add_argument("--max-shard-size", metavar="SIZE", help="shards OUT-00001-of-0000N.rmoe ... and "
                    "OUT.rmoe.index.json of at most SIZE (50GB, 500MB, 1.5GiB) of tensor data each (spec 11)")
    ap.add_argument("--workers", type=int, metavar="N", help="N local ranks on torch.distributed, the same bytes "
                    "(under torchrun every process is a rank; every method and flag, --bits and calibration "
                    "included); finished layers, calibration records and --bits tables wait in OUT.parts/")
    ap.add_argument("--resume", action="store_true", help="reuse the finished layers and records in OUT.parts/ of "
                    "a failed --workers, torchrun or --resume run")
    ap.add_argument("--report", metavar="FILE.json", help="write per-layer, per-matrix errors, sizes and times")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary table")
    ap.add_argument("--list-layers", action="store_true", help="print the model's MoE layers (the indices --layers "
                    "takes) and exit without writing anything")
    ap.add_argument("--list-architectures", action="store_true", help="print the supported architectures (convert, "
                    "runtime, GGUF and ONNX export) and exit; needs no SRC")
    return ap


def summary_table(report: dict) -> Table:
    m = report["method"]
    budget = f"keep {m['keep']}" if "keep" in m else f"residual-keep {m.get('residual_keep')}"
    if "bits" in m:
        a = report["allocation"]
        budget = f"{a['bits_per_expert_weight']:.3f} of {m['bits']:g} bits per expert weight"
    if m.get("lossless"):
        budget = "lossless"
    t = Table(title=f"{report['model']['architecture']} -> {report['output']} ({m['name']}, {budget})")
    bits = "bits" in m

    def kept(lay: dict) -> str:  # --bits: bits per expert weight; otherwise the share of parameters kept
        return f"{8 * lay['bytes'] / lay['params']:.3f}" if bits else f"{lay['keep']:.1%}"

    for col in ("layer", "experts", "bits" if bits else "kept", "stored", "of source", "error mean", "error max",
                "seconds"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for lay in report["layers"]:
        errs = [e for s in lay["matrices"].values() for e in s["rel_error"]]
        t.add_row(str(lay["index"]), str(lay["num_experts"]), kept(lay),
                  f"{lay['bytes'] / 2**20:,.2f} MiB", f"{lay['bytes'] / lay['source_bytes']:.1%}",
                  f"{sum(errs) / len(errs):.4f}", f"{max(errs):.4f}", f"{lay['seconds']:.2f}")
    s = report["summary"]
    if s["expert_params"]:
        t.add_section()
        t.add_row("all", "", f"{8 * s['expert_bytes_stored'] / s['expert_params']:.3f}" if bits
                  else f"{s['kept_fraction']:.1%}", f"{s['expert_bytes_stored'] / 2**20:,.2f} MiB",
                  f"{s['expert_bytes_fraction']:.1%}", f"{s['rel_error_mean']:.4f}", f"{s['rel_error_max']:.4f}",
                  f"{report['seconds']:.2f}")
    first = ("bits: stored bits per expert weight (codes, scales, base, permutations)" if bits else
             "kept: expert parameters stored (base included)")
    t.caption = (f"file {s['file_bytes']:,} bytes. {first}; stored: their bytes (indices, permutations included); "
                 f"error: ||T W - W_hat|| / ||W|| per expert matrix")
    return t


def list_layers(src: str, config: str | None) -> Table:
    """The MoE layers of a checkpoint, as --layers numbers them."""
    from ..architectures import adapter_for
    from ..checkpoint import Checkpoint

    with Checkpoint(src, config) as ck:
        layers = adapter_for(ck.config, ck.tensors).moe_layers()
        arch = (ck.config.get("architectures") or [ck.config.get("model_type")])[0]
    t = Table(title=f"{arch}: {len(layers)} MoE layers")
    for col in ("layer", "experts", "neurons", "matrices", "dtype", "prefix"):
        t.add_column(col)
    for lay in layers:
        t.add_row(str(lay.index), str(lay.num_experts), str(lay.num_neurons),
                  ", ".join(f"{m.name} {'x'.join(map(str, m.shape))}" for m in lay.matrices), lay.matrices[0].dtype,
                  lay.prefix)
    return t


def architectures_table() -> Table:
    """One row per architecture record: what converts, runs in the torch runtime and exports."""
    from resmoe_format.architectures import FAMILIES
    from resmoe_format.torch.kinds import KINDS

    from ..architectures import ADAPTERS
    from ..exporters.ct_export import refusal as ct_refusal
    from ..exporters.gguf_export import ARCHS as GGUF
    from ..exporters.onnx_export import SUPPORTED as ONNX

    t = Table(title="Supported architectures (one record each: resmoe_format/architectures.py)")
    for col in ("architecture", "model_type", "convert", "runtime", "gguf", "onnx", "compressed-tensors"):
        t.add_column(col, no_wrap=col == "architecture")
    for f in FAMILIES.values():
        types = f.model_types
        gguf = f.gguf if all(m in GGUF for m in types) else f"no: {f.gguf_reason or 'no exporter class'}"
        onnx = "yes" if all(m in ONNX for m in types) else f"no: {f.onnx_reason or 'not supported'}"
        ct = f"no: {ct_refusal(f)}" if ct_refusal(f) else "yes"
        t.add_row("\n".join(f.architectures), ", ".join(types), "yes" if f.name in ADAPTERS else "no",
                  "yes" if f.kind in KINDS else "no", gguf, onnx, ct)
    return t


def main(argv: list[str] | None = None) -> int:
    try:
        ap = parser()
    except ModuleNotFoundError as e:
        return missing_extra("resmoe-convert", e)
    a = ap.parse_args(argv)
    if a.list_architectures:
        out = Console(file=sys.stdout)
        out.width = max(out.width, 160)  # the class names stay whole on an 80-column terminal
        return run_cli("resmoe-convert", lambda: out.print(architectures_table()) or 0)
    if a.src is None:
        ap.error("the following arguments are required: src")
    if a.out is None and not a.list_layers:
        ap.error("the output file OUT is required (or --list-layers)")

    def body() -> int:
        from ..convert import ConvertOptions, check_shard_size, convert, output_files, write_report
        from ..errors import ConversionError
        from ..paths import check_paths, checkpoint_inputs

        if a.list_layers:
            Console(file=sys.stdout).print(list_layers(a.src, a.config))
            return 0
        check_paths(checkpoint_inputs(a.src, a.config),
                    files=[*output_files(a.out, check_shard_size(a.max_shard_size)), a.report])
        opts = ConvertOptions(method=a.method, keep=a.keep, residual_keep=a.residual_keep, residual=a.residual,
                              residual_scope=a.residual_scope, rank=a.rank, layers=a.layers,
                              value_dtype=a.value_dtype, base_dtype=a.base_dtype, delta_format=a.delta_format,
                              lossless=a.lossless, compress_passthrough=a.compress_passthrough,
                              device=a.device, max_iter=a.max_iter, bits=a.bits, calibration=a.calibration,
                              sparse_residuals=a.sparse_residuals, lowrank_residuals=a.lowrank_residuals,
                              max_shard_size=a.max_shard_size, share_v=a.share_v,
                              prune_base=a.prune_base, allow_unrouted_experts=a.allow_unrouted_experts)
        from ..distributed import convert_workers, in_torchrun, run_rank

        if in_torchrun():
            if a.workers is not None:
                raise ConversionError("--workers starts its own ranks; under torchrun give --nproc-per-node instead")
            report = run_rank(a.src, a.out, opts, a.config, not a.quiet, a.resume)
            if report is None:  # not rank 0: rank 0 writes the output, the report and the summary
                return 0
        elif a.workers is not None or a.resume:
            report = convert_workers(a.src, a.out, opts, a.config, a.workers or 1, not a.quiet, a.resume)
        else:
            report = convert(a.src, a.out, opts, a.config, progress=not a.quiet)
        if a.report:
            write_report(report, a.report)
        if not a.quiet:
            Console(file=sys.stdout).print(summary_table(report))
        return 0

    return run_cli("resmoe-convert", body)


if __name__ == "__main__":
    raise SystemExit(main())
