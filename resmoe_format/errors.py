"""Exceptions: RmoeFormatError for reading and writing .rmoe files, RmoeRuntimeError for the torch runtime."""


class RmoeFormatError(ValueError):
    """A .rmoe file (or a record about to be written to one) is malformed.

    The message names the tensor or field at fault and what is wrong with it.
    """


class RmoeRuntimeError(RuntimeError):
    """The torch runtime cannot build or run a model as asked (architecture, dtype, device, budget)."""


class GgufRmoeError(RmoeFormatError):
    """A compressed GGUF (spec/GGUF_RMOE.md) cannot be read, rebuilt or written."""
