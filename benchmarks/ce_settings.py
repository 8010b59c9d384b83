"""Score resmoe-tune-ce outputs for choosing its options (results/compressed_experts_settings.txt): for each file,
held-out perplexity and mean KLD (against the full top-k of the same file, n_ce=0) of the file's vectors and of
vectors of ones (the auxiliary experts dropped), on the first N windows of heldout.txt, and the share of the
perplexity gap the vectors close.

    python benchmarks/ce_settings.py N CE1.rmoe CE2.rmoe ...
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import kld  # noqa: E402


def main(argv: list[str]) -> int:
    warnings.simplefilter("ignore")
    import resmoe_format
    from resmoe_format.compressed_experts import ones_vectors, write_with_vectors
    from resmoe_format.torch import load_model

    limit, files = int(argv[0]), argv[1:]
    windows = kld.heldout_windows(limit)
    ref = None
    for f in files:
        t = time.perf_counter()
        if ref is None:
            full = load_model(f, "materialize", dtype="fp32", n_ce=0)
            ref = kld.Reference(Path(f).with_name("reference.npy"), windows, kld.torch_logits(full, windows))
            print("full", ref.result, flush=True)
        ones = Path(f + ".ones")
        with resmoe_format.open(f) as r:
            n_ce = r.layers[0].ce.n_ce
            write_with_vectors(r, ones, ones_vectors(r), n_ce)
        d = ref.score(kld.torch_logits(load_model(ones, "materialize", dtype="fp32"), windows))
        v = ref.score(kld.torch_logits(load_model(f, "materialize", dtype="fp32"), windows))
        closed = (d["ppl"] - v["ppl"]) / (d["ppl"] - ref.result["ppl"])
        print(f, f"n_ce={n_ce} dropped {d['ppl']:.4f} vec {v['ppl']:.4f} kld {d['kld']:.5f}->{v['kld']:.5f} "
              f"closed {closed:.1%} ({time.perf_counter() - t:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
