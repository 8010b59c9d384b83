"""resmoe-tune-ce: train compressed experts on the user's text and write them into a .rmoe file."""
from __future__ import annotations

import argparse
import sys

from .common import run_cli


def parser() -> argparse.ArgumentParser:
    from ..tune_ce import TuneOptions

    d = TuneOptions(n_ce=1)
    ap = argparse.ArgumentParser(
        prog="resmoe-tune-ce",
        description="Compressed experts (spec 4.5, .rmoe 6.0): of each token's top-k experts, the n_ce with the "
                    "smallest routing weights are not computed; learned per-expert vectors stand in for them by "
                    "scaling the other experts (IA3-style). Trains the vectors on TEXT and writes SRC with them.",
        epilog="The run saves its state to OUT.ce-state every --checkpoint-every steps and at the end; --resume "
               "continues from it (also with a larger --steps). Training is deterministic for a --seed.")
    ap.add_argument("src", help="checkpoint directory or model.safetensors file (experts kept exactly), or a .rmoe "
                                "file (its compression kept)")
    ap.add_argument("out", help="output .rmoe file")
    ap.add_argument("--text", required=True, help="UTF-8 training text (keep it apart from any evaluation text)")
    ap.add_argument("--n-ce", type=int, required=True, help="auxiliary experts per token replaced (1 <= n_ce < top-k)")
    ap.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    ap.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate of the vectors (default {d.lr:g})")
    ap.add_argument("--train-experts", action="store_true",
                    help="also fine-tune the experts' matrices (checkpoint SRC only; they are stored exactly)")
    ap.add_argument("--expert-lr", type=float, default=d.expert_lr,
                    help=f"with --train-experts: the experts' learning rate (default {d.expert_lr:g})")
    ap.add_argument("--objective", choices=("lm", "distill", "layer"), default=d.objective,
                    help="lm: next-token loss on TEXT (the paper's fine-tuning); distill: KL divergence from the full "
                         "top-k model on TEXT (its experts as SRC has them, also with --train-experts), which needs no "
                         "labels and aims at the full model; layer: each MoE block's relative squared error against "
                         "the full top-k block on the full model's hidden states, block by block (default distill)")
    ap.add_argument("--schedule", choices=("constant", "cosine"), default=d.schedule,
                    help="learning rates: constant, or decaying to 0 at --steps along a half cosine (then --resume "
                         "needs the same --steps) (default constant)")
    ap.add_argument("--seed", type=int, default=d.seed, help=f"data order and initialisation seed (default {d.seed})")
    ap.add_argument("--window", type=int, default=d.window, help=f"tokens per training window (default {d.window})")
    ap.add_argument("--batch", type=int, default=d.batch, help=f"windows per step (default {d.batch})")
    ap.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu or cuda[:N] (default auto)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT.ce-state when it exists")
    ap.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                    help=f"save OUT.ce-state every N steps (default {d.checkpoint_every})")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    a = ap.parse_args(argv)

    def body() -> int:
        from ..tune_ce import TuneOptions, tune_ce

        opts = TuneOptions(n_ce=a.n_ce, steps=a.steps, lr=a.lr, train_experts=a.train_experts,
                           expert_lr=a.expert_lr, seed=a.seed, window=a.window, batch=a.batch, device=a.device,
                           resume=a.resume, checkpoint_every=a.checkpoint_every, objective=a.objective,
                           schedule=a.schedule)
        rep = tune_ce(a.src, a.out, a.text, opts, progress=not a.quiet)
        if not a.quiet:
            print(f"wrote {a.out}: n_ce={a.n_ce}, {rep['options']['steps']} steps on {rep['tokens']} tokens "
                  f"({rep['device']}), loss {rep['loss_first']:.4f} -> {rep['loss_last']:.4f}"
                  + (f", resumed from step {rep['resumed_from']}" if rep["resumed_from"] else ""), file=sys.stdout)
        return 0

    return run_cli("resmoe-tune-ce", body)


if __name__ == "__main__":
    raise SystemExit(main())
