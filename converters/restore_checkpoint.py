"""Write a .rmoe file back out as a plain safetensors checkpoint directory."""
from __future__ import annotations

from pathlib import Path

import resmoe_format
from resmoe_format import restore
from resmoe_format.stream import StreamingWriter


def restore_checkpoint(src: str | Path, outdir: str | Path, original_order: bool = False,
                       verify_checksums: bool = True) -> Path:
    """Restore ``src`` into ``outdir``: model.safetensors plus the embedded files.

    Tensors stream layer by layer; the safetensors file appears atomically.
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    with resmoe_format.open(src, verify_checksums) as r:
        w = StreamingWriter(out / "model.safetensors")
        try:
            for name, arr in restore.restore_all(r, original_order):
                w.put(name, arr)
        except BaseException:
            w.abort()
            raise
        w.commit({"format": "pt"})
        for rel, data in r.files.items():
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return out
