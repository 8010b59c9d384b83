"""The one exception type that reading a .rmoe file may raise."""


class RmoeFormatError(ValueError):
    """A .rmoe file (or a record about to be written to one) is malformed.

    The message names the tensor or field at fault and what is wrong with it.
    """
