"""Evaluate a GGUF in llama.cpp (llama-cpp-python) in a child process.

llama.cpp runs native code that can crash the whole process (a segfault, an abort). Each call
here loads one model file in a fresh Python process, evaluates every sequence and tokenizes
every text it is given, and sends the results back; a crash becomes a :class:`LlamaRunError`
that names the signal and ends with the child's stderr, so it fails the one check that hit it
instead of the test run or the evaluation around it.

The child needs only llama-cpp-python and numpy; it imports nothing of this project.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Characters of the child's stderr quoted in an error.
STDERR_TAIL = 2000


class LlamaRunError(RuntimeError):
    """llama.cpp failed or crashed on a model file (the message says how, with its stderr tail)."""


@dataclass
class LlamaResult:
    """What one model file gave: per sequence its logits (tokens, vocab) in float32, per text its token ids."""

    logits: list[np.ndarray]
    tokens: list[list[int]]


def run_llama(model: str | os.PathLike, sequences: Sequence[Sequence[int]] = (), texts: Sequence[str] = (), *,
              n_ctx: int | None = None, n_threads: int | None = None, add_bos: bool = False,
              special: bool = False, timeout: float | None = None) -> LlamaResult:
    """Load ``model`` once in a child process; evaluate each sequence from an empty context and tokenize each text.

    ``n_ctx`` defaults to the longest sequence (at least 8); ``n_threads`` to llama-cpp-python's
    default. Raises :class:`LlamaRunError` if the child crashes, fails or runs past ``timeout`` seconds.
    """
    model = Path(model)
    longest = max((len(s) for s in sequences), default=0)
    request = {"model": str(model), "sequences": [[int(t) for t in s] for s in sequences], "texts": list(texts),
               "n_ctx": int(n_ctx or max(8, longest)), "n_threads": n_threads, "add_bos": add_bos,
               "special": special}
    with tempfile.TemporaryDirectory(prefix="llama_eval.") as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "result.npz"
        req.write_text(json.dumps(request))
        run_child([sys.executable, __file__, str(req), str(out)], f"on {model.name}", timeout)
        with np.load(out) as z:
            return LlamaResult([z[f"logits_{i}"] for i in range(len(sequences))],
                               [z[f"tokens_{i}"].tolist() for i in range(len(texts))])


def run_child(cmd: list[str], what: str, timeout: float | None = None) -> None:
    """Run ``cmd``; raise :class:`LlamaRunError` ("llama.cpp crashed with SIGSEGV {what}: <output tail>")
    unless it exits with status 0."""
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise LlamaRunError(f"llama.cpp gave no answer within {timeout} s {what}{_tail(e.stdout or b'')}") from None
    if proc.returncode < 0:
        try:
            how = f"crashed with {signal.Signals(-proc.returncode).name}"
        except ValueError:
            how = f"was killed by signal {-proc.returncode}"
        raise LlamaRunError(f"llama.cpp {how} {what}{_tail(proc.stdout)}")
    if proc.returncode > 0:
        raise LlamaRunError(f"llama.cpp failed (exit status {proc.returncode}) {what}{_tail(proc.stdout)}")


def _tail(output: bytes) -> str:
    text = output.decode("utf-8", "replace").strip()
    if not text:
        return " (no output)"
    return ":\n" + ("..." + text[-STDERR_TAIL:] if len(text) > STDERR_TAIL else text)


def _child(request_path: str, result_path: str) -> None:
    import faulthandler

    faulthandler.enable()  # a crash prints the Python stack (which call) before the process dies
    import llama_cpp
    import llama_cpp.llama_cpp as low

    req = json.loads(Path(request_path).read_text())
    defaults = low.llama_model_default_params

    def no_extra_buffers():
        # No "extra" CPU buffer types (llama_model_params.use_extra_bufts): llama.cpp otherwise moves
        # weights into buffers repacked for the CPU it runs on (AMX tiles on Xeons with AMX, interleaved
        # q4/q8 blocks on others), so which kernels run depends on the machine. On a Xeon with AMX,
        # llama-cpp-python 0.3.36 built from source segfaults evaluating q2_k, q3_k_m and q4_k_m files
        # with them and runs every file without them; the plain CPU kernels run on every CPU.
        # Llama() has no argument for it (an unknown keyword is silently dropped), so the default
        # model parameters it starts from are changed here.
        params = defaults()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = no_extra_buffers
    kwargs = {"n_threads": req["n_threads"]} if req["n_threads"] else {}
    m = llama_cpp.Llama(req["model"], logits_all=True, n_ctx=req["n_ctx"], n_batch=req["n_ctx"], verbose=False,
                        **kwargs)
    if m.model_params.use_extra_bufts:
        raise SystemExit("llama.cpp model parameters still ask for extra buffer types")
    arrays = {}
    for i, ids in enumerate(req["sequences"]):
        m.reset()
        m.eval(ids)
        arrays[f"logits_{i}"] = np.array(m.scores[:len(ids)], dtype=np.float32)
    for i, text in enumerate(req["texts"]):
        arrays[f"tokens_{i}"] = np.array(m.tokenize(text.encode("utf-8"), add_bos=req["add_bos"],
                                                    special=req["special"]), dtype=np.int64)
    np.savez(result_path, **arrays)


if __name__ == "__main__":
    _child(*sys.argv[1:3])
