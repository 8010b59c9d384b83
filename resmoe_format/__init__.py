"""resmoe_format: the .rmoe file format (spec/FORMAT.md), its codecs and readers.

    import resmoe_format
    with resmoe_format.open("model.rmoe") as r:
        r.verify()
        w = resmoe_format.restore.restore_matrix(r, layer=3, expert=0, matrix="gate")

Reading needs numpy (and ml_dtypes for bf16), never torch.
"""
from . import codecs, restore
from .codecs import Encoded, Quant
from .container import MoELayer, Reader, Writer, open
from .errors import RmoeFormatError
from .schema import (BASE_VERSION_STR, READ_MAJORS, VERSION, VERSION_STR, EncodedRef, LayerSpec, MatrixSpec, Schema,
                     SourceSpec)

__all__ = ["open", "Reader", "Writer", "MoELayer", "RmoeFormatError", "Encoded", "Quant", "EncodedRef",
           "LayerSpec", "MatrixSpec", "Schema", "SourceSpec", "VERSION", "VERSION_STR", "BASE_VERSION_STR",
           "READ_MAJORS", "codecs", "restore"]
__version__ = "0.1.0"
