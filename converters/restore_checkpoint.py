"""Write a .rmoe file back out as a plain safetensors checkpoint directory."""
from __future__ import annotations

import os
from pathlib import Path

import resmoe_format
from resmoe_format import publish, restore
from resmoe_format.stream import StreamingWriter

from .paths import check_paths, check_written, rmoe_inputs

WEIGHTS = "model.safetensors"


def restore_checkpoint(src: str | Path, outdir: str | Path, original_order: bool = False,
                       verify_checksums: bool = True, force: bool = False, ignore_ce: bool = False) -> Path:
    """Restore ``src`` into ``outdir``: model.safetensors plus the embedded files.

    ``outdir`` must not exist or be empty: the checkpoint is built in a hidden directory beside
    it and renamed into place, so a failure leaves nothing. With ``force`` it may be a non-empty
    directory; each file is then replaced atomically, and none may be an input. Tensors stream
    layer by layer. Unsafe paths raise :class:`converters.paths.PathError` before any work.
    """
    inputs = rmoe_inputs(src)
    check_paths(inputs, dirs=[outdir], force=force)
    out = Path(outdir)
    with resmoe_format.open(src, verify_checksums) as r:
        if not ignore_ce:
            from resmoe_format.compressed_experts import refuse_ce

            from .errors import ConversionError

            refuse_ce(r, "a safetensors checkpoint", ConversionError)
        if out.is_dir() and any(out.iterdir()):
            check_written(out, [WEIGHTS, *r.files], inputs)
            _write(r, out, original_order)
        else:
            with publish.atomic_dir(os.path.realpath(out)) as tmp:
                _write(r, tmp, original_order)
    return out


def _write(r, base: Path, original_order: bool) -> None:
    w = StreamingWriter(base / WEIGHTS)
    try:
        for name, arr in restore.restore_all(r, original_order):
            w.put(name, arr)
    except BaseException:
        w.abort()
        raise
    w.commit({"format": "pt"})
    for rel, data in r.files.items():
        target = base / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        publish.write_bytes(target, data)
