"""resmoe-generate: stream text from a .rmoe model with its embedded tokenizer (torch runtime)."""
from __future__ import annotations

import argparse
import sys

from .common import run_cli

MODES = ("materialize", "lazy", "fused")  # resmoe_format.torch.MODES, without importing torch for --help


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="resmoe-generate", description="Generate text from a .rmoe model: the "
                                 "prompt is tokenized with the embedded tokenizer, new tokens are streamed to "
                                 "the terminal (greedy decoding), then tokens per second and peak memory.")
    ap.add_argument("file", help=".rmoe file (with an embedded config.json and tokenizer)")
    ap.add_argument("prompt", help="text to continue")
    ap.add_argument("--mode", choices=MODES, default="fused", help="how the experts run (default fused)")
    ap.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most "
                    "(default 64)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default cpu)")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="compute dtype (default: the source dtype)")
    ap.add_argument("--cache-bytes", type=int, metavar="N",
                    help="--mode lazy: bytes of experts its cache may hold (default: twice the experts' records, at "
                         "most half of the memory available); the hit rate is printed after the tokens")
    a = ap.parse_args(argv)
    if a.max_new_tokens < 1:
        ap.error(f"--max-new-tokens {a.max_new_tokens}: must be at least 1")
    if a.cache_bytes is not None and (a.mode != "lazy" or a.cache_bytes < 1):
        ap.error(f"--cache-bytes {a.cache_bytes}: takes a positive number of bytes, with --mode lazy")

    def body() -> int:
        from resmoe_format.torch import cache_stats, generate_text, load_model, load_tokenizer

        tokenizer = load_tokenizer(a.file)
        model = load_model(a.file, mode=a.mode, device=a.device, dtype=a.dtype, cache_bytes=a.cache_bytes)
        sys.stdout.write(a.prompt)
        sys.stdout.flush()
        stats = generate_text(model, tokenizer, a.prompt, a.max_new_tokens, out=sys.stdout)
        dev = f", peak device memory {stats.peak_device_bytes / 2**20:,.0f} MiB" \
            if stats.peak_device_bytes is not None else ""
        print(f"{stats.new_tokens} tokens in {stats.seconds:.2f} s: {stats.tokens_per_second:.1f} tokens/s "
              f"({a.mode}, {stats.prompt_tokens} prompt tokens); peak RSS {stats.peak_rss_bytes / 2**20:,.0f} MiB"
              f"{dev}", file=sys.stderr)
        c = cache_stats(model)
        if c is not None:
            print(f"lazy cache: hit rate {c['hit_rate']:.1%} of {c['uses']} expert uses, {c['resident_experts']} "
                  f"experts resident ({c['resident_bytes'] / 2**20:,.1f} of {c['capacity_bytes'] / 2**20:,.1f} MiB), "
                  f"{c['build_seconds']:.2f} s building experts from the file", file=sys.stderr)
        return 0

    return run_cli("resmoe-generate", body)


if __name__ == "__main__":
    raise SystemExit(main())
