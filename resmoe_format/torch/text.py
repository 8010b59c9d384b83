"""Text in and out of a ``.rmoe`` model: the embedded tokenizer, and streamed generation.

    from resmoe_format.torch import load_model, load_tokenizer
    tok = load_tokenizer("model.rmoe")
    model = load_model("model.rmoe", mode="fused")
    ids = tok("def main():", return_tensors="pt").input_ids
    print(tok.decode(model.generate(ids, max_new_tokens=20)[0]))
"""
from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .. import container
from ..errors import RmoeRuntimeError

#: Embedded files a transformers tokenizer is read from (the source checkpoint's side files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "config.json")
#: At least one of these holds the vocabulary itself.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | os.PathLike, verify_checksums: bool = True):
    """The transformers tokenizer of the files embedded in the ``.rmoe`` file at ``path``.

    Built offline with ``AutoTokenizer`` from the embedded ``tokenizer.json`` (or
    ``tokenizer.model`` / ``vocab.json``) and ``tokenizer_config.json``; no remote code runs.
    A file that embeds no tokenizer is an :class:`RmoeRuntimeError` naming the files it has.
    """
    from .load import _transformers

    transformers = _transformers()
    with container.open(Path(path), verify_checksums) as r:
        files = r.files
    if not any(f in files for f in VOCABULARY_FILES):
        raise RmoeRuntimeError(f"{path} embeds no tokenizer (none of {', '.join(VOCABULARY_FILES)}; it embeds "
                               f"{', '.join(sorted(files)) or 'no files'}): convert a checkpoint that has its "
                               "tokenizer files, or load the tokenizer from the source model")
    with tempfile.TemporaryDirectory(prefix="resmoe_tokenizer.") as d:
        for name in TOKENIZER_FILES:
            if name in files:
                (Path(d) / name).write_bytes(files[name])
        try:
            return transformers.AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
            raise RmoeRuntimeError(f"{path}: transformers cannot build a tokenizer from the embedded files: "
                                   f"{' '.join(str(e).split())}") from None


@dataclass
class GenerationStats:
    """What one :func:`generate_text` call produced and cost."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float  # generation only (prompt processing included, loading not)
    peak_rss_bytes: int  # this process's peak resident memory so far
    peak_device_bytes: int | None  # CUDA: peak memory torch allocated on the device; None on the CPU

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, out: TextIO | None = None,
                  ) -> GenerationStats:
    """Greedy-decode up to ``max_new_tokens`` after ``prompt``, writing each piece of text to
    ``out`` (e.g. ``sys.stdout``) as soon as it is decoded; returns the text and its cost."""
    import torch
    from transformers import TextStreamer

    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise RmoeRuntimeError("the prompt gives no tokens")
    streamer = None
    if out is not None:
        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                out.write(text + ("\n" if stream_end else ""))
                out.flush()

        streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    with torch.no_grad():
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, streamer=streamer, pad_token_id=pad)
    seconds = time.perf_counter() - start
    new = seq[0, ids.shape[1]:]
    return GenerationStats(tokenizer.decode(new, skip_special_tokens=True), ids.shape[1], int(new.numel()), seconds,
                           peak_rss_bytes(),
                           int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None)
