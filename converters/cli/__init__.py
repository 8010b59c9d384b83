"""Command-line entry points (thin: parse flags, call the libraries, print)."""
