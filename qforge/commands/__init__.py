"""Command modules of the `qforge` CLI (see qforge/cli.py)."""
