"""Errors the converter reports to users as one clear line."""
from __future__ import annotations


class ConversionError(ValueError):
    """Bad input (checkpoint, architecture, flags): nothing is written."""


class UnsupportedArchitecture(ConversionError):
    """The checkpoint's architecture has no registered adapter."""
