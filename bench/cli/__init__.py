"""The ``bench`` command line (Typer). Heavy modules are imported inside command bodies so
``bench --help`` and ``bench list`` start fast and never import torch."""

from __future__ import annotations

from bench.cli.app import app, main

__all__ = ["app", "main"]
