"""Exporters: a .rmoe file to other runtimes' formats."""
